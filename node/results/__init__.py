"""Result objects (DICOM SEG, TID 1500 SR, IOCM rejection notes). The only package that imports highdicom."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pydicom import Dataset

from algorithms.base import AlgorithmResult, AlgorithmSpec
from node.deid.pseudonyms import derive_uid
from node.errors import ResultBuildError
from node.results.kos import build_rejection_note
from node.results.seg import build_segmentation
from node.results.sr import build_measurement_report

__all__ = ["build_measurement_report", "build_rejection_note", "build_results", "build_segmentation"]

SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902


def build_results(
    sources: Sequence[Dataset],
    result: AlgorithmResult,
    spec: AlgorithmSpec,
    uid: Callable[[str], str],
    node_ae_title: str,
) -> list[Dataset]:
    """The result objects an algorithm declares (``spec.outputs``): a SEG when it returned segments,
    an SR when it declares one (referencing the SEG when there is one).

    Parameters
    ----------
    uid
        Deterministic UID for a kind of object (``"seg"``, ``"seg-series"``, ``"sr"``, ``"sr-series"``).

    Raises
    ------
    ResultBuildError
        Nothing to build, or an object cannot be built.
    """
    seg = None
    if "SEG" in spec.outputs and result.segments:
        seg = build_segmentation(
            sources, result, spec, series_instance_uid=uid("seg-series"), sop_instance_uid=uid("seg"),
            series_number=SEG_SERIES_NUMBER, device_serial_number=node_ae_title,
        )  # fmt: skip
    built = [seg] if seg is not None else []
    if "SR" in spec.outputs:
        built.append(
            build_measurement_report(
                seg,
                sources,
                result,
                spec,
                series_instance_uid=uid("sr-series"),
                sop_instance_uid=uid("sr"),
                series_number=SR_SERIES_NUMBER,
                device_uid=derive_uid("ainode-device", node_ae_title),
            )
        )
    if not built:
        raise ResultBuildError(f"{spec.name} returned nothing its declared outputs ({', '.join(spec.outputs)}) hold")
    return built
