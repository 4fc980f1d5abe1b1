"""Result objects (DICOM SEG, TID 1500 SR in two designs, GSPS, key-image SC, IOCM rejection notes).
The only package that imports highdicom.

Every object carries a fixed Series Number per kind, so the kind of a stored object is known from
its header (:func:`result_kind`), and the IHE AIR Contributing Equipment item of its algorithm.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence

from pydicom import Dataset

from ainode_sdk.base import AlgorithmResult, AlgorithmSpec, Volume
from node.deid.pseudonyms import derive_uid
from node.errors import ResultBuildError
from node.results.gsps import build_presentation_state
from node.results.identity import ObjectIdentity
from node.results.kos import build_rejection_note
from node.results.outline import has_voxels
from node.results.sc import build_key_images
from node.results.seg import build_segmentation
from node.results.sr import build_measurement_report
from node.results.standard import memoise_iod_lookups
from node.settings.config import ResultKind

__all__ = [
    "RESULT_KINDS",
    "ResultKind",
    "build_measurement_report",
    "build_rejection_note",
    "build_results",
    "build_segmentation",
    "result_kind",
]

logger = logging.getLogger(__name__)
memoise_iod_lookups()  # once per process: highdicom's IOD look-ups kept (node.results.standard)

RESULT_KINDS: tuple[ResultKind, ...] = ("SEG", "SR", "SR-segment", "GSPS", "SC")

SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
SR_SEGMENT_SERIES_NUMBER = 9904
GSPS_SERIES_NUMBER = 9905
SC_SERIES_NUMBER = 9906
KEY_IMAGES = 4
_KIND_BY_SERIES_NUMBER: dict[int, ResultKind] = {
    SEG_SERIES_NUMBER: "SEG", SR_SERIES_NUMBER: "SR", SR_SEGMENT_SERIES_NUMBER: "SR-segment",
    GSPS_SERIES_NUMBER: "GSPS", SC_SERIES_NUMBER: "SC",
}  # fmt: skip


def result_kind(ds: Dataset) -> ResultKind:
    """The kind of a result object this node built, from its Series Number.

    Raises
    ------
    ResultBuildError
        ``ds`` is not one of this node's result objects.
    """
    kind = _KIND_BY_SERIES_NUMBER.get(int(ds.get("SeriesNumber") or 0))
    if kind is None:
        raise ResultBuildError(f"not a result object of this node (series number {ds.get('SeriesNumber')})")
    return kind


def build_results(
    sources: Sequence[Dataset],
    result: AlgorithmResult,
    spec: AlgorithmSpec,
    uid: Callable[[str], str],
    node_ae_title: str,
    kinds: Collection[ResultKind] = ("SEG", "SR"),
    volume: Volume | None = None,
) -> list[Dataset]:
    """The result objects of ``kinds`` that ``result`` can give.

    A SEG needs segments and ``"SEG"`` in the algorithm's outputs; an SR (either design) needs
    ``"SR"`` there (the segment design builds the SEG it references); a GSPS needs a segment voxel
    or a located finding; key images need a segment voxel and ``volume``. A kind the result cannot
    give is left out with a log line.

    Parameters
    ----------
    sources
        The source images (headers suffice, no pixels) in the slice order of the result's masks.
    uid
        Deterministic UID for a kind of object (``"seg"``, ``"seg-series"``, ``"sr"``,
        ``"sr-series"``, ``"sr-segment"``, ``"gsps"``, ``"sc-1"`` ...).
    volume
        The source voxels, for key images.

    Raises
    ------
    ResultBuildError
        Nothing to build, or an object cannot be built.
    """
    wanted = set(kinds)
    segments = bool(result.segments) and "SEG" in spec.outputs
    seg = None
    if segments and ({"SEG", "SR-segment"} & wanted):
        identity = ObjectIdentity(uid("seg-series"), uid("seg"), SEG_SERIES_NUMBER, node_ae_title)
        seg = build_segmentation(sources, result, spec, identity=identity)
    built = [seg] if seg is not None and "SEG" in wanted else []
    device_uid = derive_uid("ainode-device", node_ae_title)
    for kind, design, number in (
        ("SR", "planar", SR_SERIES_NUMBER),
        ("SR-segment", "segment", SR_SEGMENT_SERIES_NUMBER),
    ):
        if kind in wanted and "SR" in spec.outputs:
            built.append(
                build_measurement_report(
                    seg if design == "segment" else None, sources, result, spec, design=design,  # type: ignore[arg-type]
                    series_instance_uid=uid(f"{kind.lower()}-series"), sop_instance_uid=uid(kind.lower()),
                    series_number=number, device_uid=device_uid,
                )
            )  # fmt: skip
    voxels = has_voxels(result)
    if "GSPS" in wanted and (voxels or any(f.location is not None for f in result.findings)):
        built.append(
            build_presentation_state(
                sources, result, spec,
                identity=ObjectIdentity(uid("gsps-series"), uid("gsps"), GSPS_SERIES_NUMBER, node_ae_title),
            )
        )  # fmt: skip
    if "SC" in wanted and voxels and volume is not None:
        built += build_key_images(
            volume, sources, result, spec, series_instance_uid=uid("sc-series"),
            sop_instance_uid=[uid(f"sc-{n}") for n in range(1, KEY_IMAGES + 1)], series_number=SC_SERIES_NUMBER,
        )  # fmt: skip
    left_out = wanted - {result_kind(ds) for ds in built}
    if left_out:
        logger.info("result objects %s not built: %s gives nothing for them", sorted(left_out), spec.name)
    if not built:
        raise ResultBuildError(f"{spec.name} returned nothing the requested objects ({', '.join(sorted(wanted))}) hold")
    return built
