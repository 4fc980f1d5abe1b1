"""What a model saw and what it said, as a job's monitoring record holds them (no PHI).

The input is described by the acquisition attributes that drift with scanners and protocols
(manufacturer, model name, convolution kernel, slice thickness, pixel spacing, kVp, contrast
agent, number of slices), read from the de-identified header; the output by each segment's
volume and intensity statistics inside it, the algorithm's own measurements and its qualitative
findings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from pydicom.multival import MultiValue

from ainode_sdk.base import AlgorithmResult, Volume

MAX_TEXT = 64
"""Characters kept of a text descriptor (a kernel or model name is short; a long value is cut)."""
MAX_SAMPLES = 2_000_000
"""Voxels of a segment its percentiles are estimated from (an even subsample of larger ones)."""
PERCENTILES = (5, 50, 95)
SLAB = 16
"""Slices of a mask read at a time."""
THREADS = 2
"""Segments summarised at once."""


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or value == "":
        return ""
    text = "\\".join(str(v) for v in value) if isinstance(value, MultiValue | list | tuple) else str(value)
    return re.sub(r"[^\x20-\x7e]", "", text)[:MAX_TEXT]


def _number(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    try:
        values = [float(v) for v in value] if isinstance(value, MultiValue | list | tuple) else [float(value)]
    except (TypeError, ValueError):
        return None
    return round(float(np.mean(values)), 4) if values else None


def describe_inputs(headers: Sequence[Dataset]) -> dict[str, Any]:
    """The descriptors of a series (its de-identified headers, one per instance).

    Returns
    -------
    dict
        ``manufacturer``, ``model_name``, ``kernel``, ``contrast`` (``"yes"``/``"no"``: Contrast/Bolus
        Agent present) as text; ``slice_thickness_mm``, ``pixel_spacing_mm`` (mean of row and
        column spacing), ``kvp`` (``None`` when absent) and ``slices`` as numbers.
    """
    first = headers[0]
    return {
        "manufacturer": _text(first, "Manufacturer"),
        "model_name": _text(first, "ManufacturerModelName"),
        "kernel": _text(first, "ConvolutionKernel"),
        "contrast": "yes" if _text(first, "ContrastBolusAgent") else "no",
        "slice_thickness_mm": _number(first, "SliceThickness"),
        "pixel_spacing_mm": _number(first, "PixelSpacing"),
        "kvp": _number(first, "KVP"),
        "slices": len(headers),
    }


class MaskSlabs(Protocol):
    """A segment's mask read a slab of slices at a time, never whole
    (:class:`node.jobs.isolation.PackedMask`: bit-packed as the algorithm's process sent it)."""

    @property
    def shape(self) -> tuple[int, ...]:
        """``(slices, rows, columns)``."""
        ...

    def count(self) -> int:
        """How many voxels the mask holds."""
        ...

    def slab(self, first: int, stop: int) -> npt.NDArray[np.bool_]:
        """``mask[first:stop]`` as ``bool``."""
        ...


Mask = npt.NDArray[np.bool_] | MaskSlabs
"""A segment's mask: whole, or read a slab at a time."""


def _sample(voxels: npt.NDArray[np.float32], mask: Mask) -> tuple[int, npt.NDArray[np.float32]]:
    """How many voxels ``mask`` holds, and every ``n``-th of their values in C order (``n`` the
    count over :data:`MAX_SAMPLES`, plus one): ``voxels[mask][::n]``, gathered a slab of slices at
    a time so the masked values are never all copied out at once."""
    if isinstance(mask, np.ndarray):
        size, slab = int(np.count_nonzero(mask)), lambda first, stop: mask[first:stop]
    else:
        size, slab = mask.count(), mask.slab
    step, taken, parts = size // MAX_SAMPLES + 1, 0, []
    for first in range(0, mask.shape[0], SLAB):
        values = voxels[first : first + SLAB][slab(first, first + SLAB)]
        parts.append(values[(-taken) % step :: step])
        taken += values.size
    return size, np.concatenate(parts) if parts else np.empty(0, np.float32)


class _LabelMask:
    """One label of a label map as a mask read a slab of slices at a time (:class:`MaskSlabs`):
    no whole-volume mask is made for it; its voxel count is given (:func:`_label_counts`)."""

    def __init__(self, label_map: npt.NDArray[np.integer[Any]], number: int, voxels: int) -> None:
        self._labels = label_map
        self._number = number
        self._voxels = voxels

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._labels.shape)

    def count(self) -> int:
        return self._voxels

    def slab(self, first: int, stop: int) -> npt.NDArray[np.bool_]:
        return np.equal(self._labels[first:stop], self._number)


def _label_counts(label_map: npt.NDArray[np.integer[Any]], labels: int) -> npt.NDArray[np.int64]:
    """Voxels of each label ``0..labels`` in one pass over the map, a slab at a time (``bincount``
    works in 8-byte integers: never the whole map at once)."""
    counts = np.zeros(labels + 1, dtype=np.int64)
    for first in range(0, label_map.shape[0], SLAB):
        counts += np.bincount(label_map[first : first + SLAB].ravel(), minlength=labels + 1)[: labels + 1]
    return counts


def _segment_summary(voxels: npt.NDArray[np.float32], mask: Mask, voxel_ml: float) -> dict[str, float]:
    """Voxel count, volume (ml) and, when not empty, the mean and :data:`PERCENTILES` of ``voxels``
    under ``mask``."""
    size, sample = _sample(voxels, mask)
    stats: dict[str, float] = {"voxels": size, "volume_ml": round(size * voxel_ml, 3)}
    if size:
        stats["mean"] = round(float(sample.mean()), 2)
        for q, v in zip(PERCENTILES, np.percentile(sample, PERCENTILES), strict=True):
            stats[f"p{q:02d}"] = round(float(v), 2)
    return stats


def describe_outputs(
    result: AlgorithmResult, volume: Volume, masks: Iterable[Mask] | None = None, threads: int = THREADS
) -> dict[str, Any]:
    """Summaries of an algorithm's result on ``volume``; the segments' masks are ``masks`` when
    given (arrays, or masks read a slab at a time: :func:`node.jobs.isolation.packed_masks`),
    else their own (a label map's labels are read a slab at a time).

    The segments are summarised ``threads`` at a time (NumPy's gathers, unpacking and partitions
    run without the GIL), each from one slab of slices at a time.

    Returns
    -------
    dict
        ``segments``: label -> ``voxels``, ``volume_ml`` and the mean and 5th/50th/95th
        percentiles of the voxel values inside it (HU for CT); ``measurements``:
        ``"label / concept (derivation)"`` -> value in its unit; ``findings``: label -> coded value
        meaning.
    """
    label_map = result.label_map
    if label_map is not None:  # a declared model's labels: the masks are not needed
        counts = _label_counts(label_map, len(result.segments))
        chosen: list[Mask] = [_LabelMask(label_map, n, int(counts[n])) for n in range(1, len(result.segments) + 1)]
    else:
        chosen = list(masks) if masks is not None else [segment.mask for segment in result.segments]
    summarise = partial(_segment_summary, volume.voxels, voxel_ml=volume.voxel_volume_ml)
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="ainode-describe") as pool:
        summaries = list(pool.map(summarise, chosen))
    segments = {segment.label: stats for segment, stats in zip(result.segments, summaries, strict=True)}
    measurements = {}
    for m in result.measurements:
        name = f"{m.segment_label} / {m.concept[2]}" + (f" ({m.derivation[2]})" if m.derivation else "")
        measurements[name] = float(m.value)
    findings = {f.label: f.value[2] for f in result.findings}
    return {"segments": segments, "measurements": measurements, "findings": findings}
