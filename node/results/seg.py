"""DICOM Segmentation (PS3.3 A.51) from an algorithm's binary segments, built with highdicom."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset

from algorithms.base import AlgorithmResult, AlgorithmSpec, Code
from node.errors import ResultBuildError

# CIELab display colours (PS3.3 C.10.7.1.1): left lung blue, right lung green, LAA yellow.
_COLOURS = ((50.0, 20.0, -60.0), (70.0, -60.0, 50.0), (90.0, -5.0, 80.0), (55.0, 70.0, 40.0))


def coded(code: Code) -> hd.sr.CodedConcept:
    """A highdicom coded concept from a plain ``(value, scheme, meaning)`` tuple."""
    value, scheme, meaning = code
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def algorithm_identification(spec: AlgorithmSpec, parameters: dict[str, str]) -> hd.AlgorithmIdentificationSequence:
    """Segmentation Algorithm Identification (PS3.3 10.16) for ``spec``."""
    return hd.AlgorithmIdentificationSequence(
        name=spec.name,
        family=coded(("123109", "DCM", "Artificial Intelligence")),
        version=spec.version,
        source="ainode",
        parameters=parameters or None,
    )


def _segment_major(masks: list[np.ndarray]) -> np.ndarray:
    """The masks as one bool array (segments, frames, rows, columns): the block they are views of
    when they already form one in order (as the isolated runner returns them), else a stacked copy."""
    base = masks[0].base
    if (
        isinstance(base, np.ndarray)
        and base.dtype == np.bool_
        and base.shape == (len(masks), *masks[0].shape)
        and all(m.base is base and m.ctypes.data == base[i].ctypes.data for i, m in enumerate(masks))
    ):
        return base
    return np.stack([m.astype(bool, copy=False) for m in masks], axis=0)


def build_segmentation(
    sources: Sequence[Dataset],
    result: AlgorithmResult,
    spec: AlgorithmSpec,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    device_serial_number: str,
) -> Dataset:
    """Build a binary SEG whose frames align with ``sources``.

    Parameters
    ----------
    sources
        The single-frame source images, in the slice order of the masks (index 0 = first slice of
        the :class:`~algorithms.base.Volume`).
    result
        Masks of shape ``(slices, rows, columns)``, one per segment, numbered from 1 in order.

    Raises
    ------
    ResultBuildError
        Masks do not match the sources, or highdicom refuses the object.
    """
    segments = list(result.segments)
    if not segments:
        raise ResultBuildError("the algorithm returned no segments")
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    for s in segments:
        if s.mask.shape != shape:
            raise ResultBuildError(f"mask {s.label!r} has shape {s.mask.shape}, sources give {shape}")
    # (frames, rows, columns, segments) as highdicom wants it, but segment-major in memory: its
    # overlap check sums over the segment axis, which is several times faster over whole planes
    pixels = _segment_major([s.mask for s in segments]).transpose(1, 2, 3, 0)
    algorithm = algorithm_identification(spec, dict(result.parameters))
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=s.label,
            segmented_property_category=coded(s.category),
            segmented_property_type=coded(s.property_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor(*_COLOURS[(i - 1) % len(_COLOURS)]),
        )
        for i, s in enumerate(segments, start=1)
    ]
    try:
        seg = hd.seg.Segmentation(
            source_images=list(sources),
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer="ainode",
            manufacturer_model_name=spec.name,
            software_versions=spec.version,
            device_serial_number=device_serial_number,
            series_description=f"{spec.name} segmentation",
            content_label="LUNGS" if "lung" in spec.name else "SEGMENTATION",
            content_description=spec.description[:64],
        )
    except (ValueError, TypeError) as exc:
        raise ResultBuildError(f"SEG: {exc}") from exc
    return seg
