"""A shadow (silent trial) compared with the live algorithm it shadows, on the same series.

Masks come from the two jobs' stored DICOM SEGs (the objects the destinations receive), frame by
frame by the source image each frame is derived from; segments are paired by label, or as the
shadow declares (``segments: {Lung: [Left lung, Right lung]}``: the union of the reference's).
Per pair: Dice, each volume (voxels x voxel volume, ml) and their difference (ml and % of the
reference's); per measurement the two jobs' records have in common (1:1 pairs): the difference.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import Dataset

from node.dicomio import decode
from node.errors import AinodeError
from node.storage.index import Index, JobRow, JobState
from node.storage.store import ObjectStore

logger = logging.getLogger(__name__)

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(frozen=True)
class SegMasks:
    """A SEG's segments: label -> (source SOP Instance UID -> frame mask, rows x columns), and
    the volume of one voxel in ml (Pixel Measures: pixel spacing x slice thickness)."""

    frames: dict[str, dict[str, np.ndarray]]
    voxel_ml: float


def seg_masks(seg: Dataset) -> SegMasks:
    """The masks of a binary SEG (PS3.3 A.51), by segment label and source image.

    Raises
    ------
    TypeError, AttributeError
        The SEG lacks the source references or pixel measures this reads.
    """
    labels = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    pixels = seg.pixel_array
    pixels = pixels.reshape((-1, int(seg.Rows), int(seg.Columns))).astype(bool)
    frames: dict[str, dict[str, np.ndarray]] = {label: {} for label in labels.values()}
    shared = seg.SharedFunctionalGroupsSequence[0]

    def item(group: Dataset, keyword: str) -> Dataset:
        """A functional group's macro: the frame's own, else the one shared by every frame."""
        return (group.get(keyword) or shared.get(keyword))[0]

    for number, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        segment = int(item(group, "SegmentIdentificationSequence").ReferencedSegmentNumber)
        derivation = item(group, "DerivationImageSequence")
        source = str(derivation.SourceImageSequence[0].ReferencedSOPInstanceUID)
        frames[labels[segment]][source] = pixels[number]
    measures = item(seg.PerFrameFunctionalGroupsSequence[0], "PixelMeasuresSequence")
    dy, dx = (float(v) for v in measures.PixelSpacing)
    thickness = float(measures.get("SpacingBetweenSlices") or measures.SliceThickness)
    return SegMasks(frames, dy * dx * thickness / 1000.0)


def _union(masks: SegMasks, labels: Sequence[str]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for label in labels:
        for source, frame in masks.frames.get(label, {}).items():
            out[source] = out[source] | frame if source in out else frame
    return out


def _pair(shadow: dict[str, np.ndarray], reference: dict[str, np.ndarray], voxel_ml: float) -> dict[str, Any]:
    a = sum(int(f.sum()) for f in shadow.values())
    b = sum(int(f.sum()) for f in reference.values())
    both = sum(int(np.logical_and(f, reference[s]).sum()) for s, f in shadow.items() if s in reference)
    va, vb = a * voxel_ml, b * voxel_ml
    return {
        "dice": round(2 * both / (a + b), 6) if a + b else None,
        "volume_ml": round(va, 3),
        "reference_volume_ml": round(vb, 3),
        "volume_diff_ml": round(va - vb, 3),
        "volume_diff_pct": round(100 * (va - vb) / vb, 3) if vb else None,
    }


def compare_masks(shadow: SegMasks, reference: SegMasks, pairing: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Per shadow segment: the reference segments it is compared with (``pairing``, else the one
    of its own label) and the Dice and volumes of the pair."""
    rows = []
    for label in shadow.frames:
        against = pairing.get(label, [label])
        if not any(ref in reference.frames for ref in against):
            continue
        row = {"label": label, "against": against}
        row.update(_pair(shadow.frames[label], _union(reference, against), shadow.voxel_ml))
        rows.append(row)
    return rows


def compare_measurements(shadow: dict[str, Any], reference: dict[str, Any]) -> list[dict[str, Any]]:
    """Differences of the outputs both records hold under the same name (segment statistics and
    the algorithms' measurements)."""
    rows = []
    for label, stats in shadow.get("segments", {}).items():
        ref = reference.get("segments", {}).get(label, {})
        for name, value in stats.items():
            if name not in ("voxels", "volume_ml") and name in ref:
                rows.append({"name": f"{label} {name}", "value": value, "reference": ref[name],
                             "diff": round(value - ref[name], 4)})  # fmt: skip
    for name, value in shadow.get("measurements", {}).items():
        if name in reference.get("measurements", {}):
            ref_value = reference["measurements"][name]
            rows.append({"name": name, "value": value, "reference": ref_value, "diff": round(value - ref_value, 4)})
    return rows


def _seg(store: ObjectStore, job: JobRow) -> Dataset | None:
    for object_id in job.result_ids:
        ds = decode(store.get(object_id))
        if str(ds.SOPClassUID) == SEG_SOP_CLASS:
            return ds
    return None


def _reference_job(shadow: JobRow, against: str, jobs: Sequence[JobRow], index: Index) -> JobRow | None:
    """The job of the live algorithm ``against`` on the same route and series (or the canary
    version that served the study in its place)."""
    where = (shadow.route, shadow.series_key, shadow.generation)
    same = [j for j in jobs if (j.route, j.series_key, j.generation) == where and j.id != shadow.id]
    exact = next((j for j in same if j.algorithm == against), None)
    if exact is not None:
        return exact
    canary = [j for j in same if (r := index.model_record(j.id)) is not None and r.role == "canary"]
    return canary[0] if canary else None


def compare_shadows(index: Index, store: ObjectStore, jobs: Sequence[JobRow]) -> int:
    """Compare every finished shadow job among ``jobs`` (one study's generation) that has no
    comparison yet with its reference; the comparison (or why there is none) is stored in the
    shadow's record. Returns how many were compared."""
    done = 0
    for job in jobs:
        record = index.model_record(job.id)
        if record is None or record.role != "shadow" or record.comparison is not None:
            continue
        comparison: dict[str, Any]
        reference = _reference_job(job, record.against or "", jobs, index)
        if job.state != JobState.DELIVERED:
            comparison = {"error": f"the shadow's job ended {job.state}"}
        elif reference is None or reference.state != JobState.DELIVERED:
            state = reference.state if reference is not None else "missing"
            comparison = {"error": f"the reference's job ({record.against}) is {state}"}
        else:
            comparison = _compare(index, store, job, reference, record.against or "")
        index.record_model_run(job.id, comparison=json.dumps(comparison, sort_keys=True))
        done += 1
    return done


def _compare(index: Index, store: ObjectStore, job: JobRow, reference: JobRow, against: str) -> dict[str, Any]:
    try:
        plan = json.loads(job.route_snapshot or "{}")
        mine, theirs = _seg(store, job), _seg(store, reference)
        if mine is None or theirs is None:
            return {"error": "no SEG among the results of " + ("the shadow" if mine is None else "the reference")}
        segments = compare_masks(seg_masks(mine), seg_masks(theirs), plan.get("segments") or {})
    except (AinodeError, ValueError, KeyError, AttributeError, IndexError, TypeError) as exc:
        logger.warning("shadow comparison failed: %s", exc, extra={"job_id": job.id})
        return {"error": f"comparison failed: {type(exc).__name__}: {exc}"[:300]}
    ours, ref_record = index.model_record(job.id), index.model_record(reference.id)
    measurements = compare_measurements(
        json.loads(ours.outputs) if ours else {}, json.loads(ref_record.outputs) if ref_record else {}
    )
    return {"reference_job": reference.id, "reference": reference.algorithm, "against": against,
            "segments": segments, "measurements": measurements}  # fmt: skip
