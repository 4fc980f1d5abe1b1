"""DICOM Segmentation (PS3.3 A.51) from an algorithm's segments, built with highdicom.

Everything comes from what the algorithm returns and declares: labels, property category/type (and
type modifier), anatomic region, colour, the algorithm identification (name, version, weights).
The SEG is BINARY (what every viewer and dciodvfy know; highdicom's LABELMAP SOP class is too new
for both). A model's many non-overlapping labels (a whole-body model's 104) reach highdicom as one
label map of one byte per voxel, never as one mask per segment, so the build's memory stays bounded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset

from ainode_sdk.base import RGB, AlgorithmResult, AlgorithmSpec, Code, Segment
from node.errors import ResultBuildError
from node.results.air import contributing_equipment
from node.results.identity import ObjectIdentity

# Display colours (sRGB) for segments that bring none: blue, green, yellow, red, magenta, cyan.
_COLOURS: tuple[RGB, ...] = ((40, 110, 255), (40, 200, 80), (250, 215, 0), (230, 50, 50), (220, 60, 220), (0, 210, 210))


def coded(code: Code) -> hd.sr.CodedConcept:
    """A highdicom coded concept from a plain ``(value, scheme, meaning)`` tuple."""
    value, scheme, meaning = code
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def algorithm_parameters(spec: AlgorithmSpec, parameters: dict[str, str]) -> dict[str, str]:
    """The algorithm's parameters, with the checksum of its trained weights when it has them."""
    return {**parameters, **({"weights_sha256": spec.weights_sha256} if spec.weights_sha256 else {})}


def algorithm_identification(spec: AlgorithmSpec, parameters: dict[str, str]) -> hd.AlgorithmIdentificationSequence:
    """Segmentation Algorithm Identification (PS3.3 10.16) for ``spec``."""
    return hd.AlgorithmIdentificationSequence(
        name=spec.name,
        family=coded(("123109", "DCM", "Artificial Intelligence")),
        version=spec.version,
        source="ainode",
        parameters=algorithm_parameters(spec, parameters) or None,
    )


def content_label(spec: AlgorithmSpec) -> str:
    """Content Label (CS, at most 16 characters of upper case, digits, space, underscore) from the
    algorithm's name."""
    label = re.sub(r"[^A-Z0-9_ ]", "_", spec.name.upper())[:16].strip("_ ")
    return label or "SEGMENTATION"


def segment_colour(segment: Segment, number: int) -> RGB:
    """The display colour (sRGB) of segment ``number`` (from 1): its own, else the node's palette.
    The SEG, the presentation state and the key images show a segment in this one colour."""
    return segment.colour if segment.colour is not None else _COLOURS[(number - 1) % len(_COLOURS)]


def cielab(rgb: RGB) -> hd.color.CIELabColor:
    """An sRGB colour as the CIELab value DICOM stores (PS3.3 C.10.7.1.1)."""
    return hd.color.CIELabColor.from_rgb(*rgb)


def _description(
    number: int, segment: Segment, algorithm: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=segment.label,
        segmented_property_category=coded(segment.category),
        segmented_property_type=coded(segment.property_type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[coded(segment.anatomic_region)] if segment.anatomic_region else None,
        display_color=cielab(segment_colour(segment, number)),
    )
    if segment.type_modifier is not None:  # e.g. "Kidney" + "Left" (PS3.3 C.8.20.4)
        item = description.SegmentedPropertyTypeCodeSequence[0]
        item.SegmentedPropertyTypeModifierCodeSequence = [coded(segment.type_modifier)]
    return description


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


class _Segmentation(hd.seg.Segmentation):
    """highdicom's Segmentation (pinned 0.28.2) whose check of a 4-D binary stack (frames, rows,
    columns, segments) runs over a few frames at a time in one byte per voxel: highdicom's own
    check sums the whole stack into int64 (8 bytes per voxel: 1 GB for 500 slices of 512 x 512),
    the peak of a large study's build. Every other input takes highdicom's own path."""

    _CHUNK_FRAMES = 16

    @classmethod
    def _check_and_cast_pixel_array(
        cls,
        pixel_array: np.ndarray | hd.Volume,
        segment_numbers: np.ndarray,
        segmentation_type: hd.seg.SegmentationTypeValues,
        dtype: type,
    ) -> tuple[np.ndarray | hd.Volume, hd.seg.SegmentsOverlapValues]:
        if (
            not isinstance(pixel_array, np.ndarray) or pixel_array.ndim != 4
            or pixel_array.dtype not in (np.bool_, np.uint8) or not 1 < pixel_array.shape[-1] < 256
            or pixel_array.shape[-1] != len(segment_numbers)
            or segmentation_type != hd.seg.SegmentationTypeValues.BINARY
        ):  # fmt: skip
            return super()._check_and_cast_pixel_array(pixel_array, segment_numbers, segmentation_type, dtype)
        overlap = False
        for start in range(0, pixel_array.shape[0], cls._CHUNK_FRAMES):
            chunk = pixel_array[start : start + cls._CHUNK_FRAMES]
            if chunk.dtype == np.uint8 and chunk.max() > 1:
                raise ValueError("When passing a 4D stack of segments with an integer pixel type, it must be binary.")
            overlap = overlap or bool((chunk.sum(axis=-1, dtype=np.uint8) > 1).any())
        return pixel_array, hd.seg.SegmentsOverlapValues.YES if overlap else hd.seg.SegmentsOverlapValues.NO


def _pixels(result: AlgorithmResult, shape: tuple[int, int, int]) -> np.ndarray:
    """The pixel array highdicom takes for a BINARY SEG: the algorithm's label map as it is
    (frames, rows, columns of segment numbers; one byte or two per voxel, however many segments), or
    its masks as (frames, rows, columns, segments), segment-major in memory (highdicom's overlap check
    sums over the segment axis, several times faster over whole planes)."""
    segments = list(result.segments)
    label_map = result.label_map
    if label_map is not None:
        if label_map.shape != shape:
            raise ResultBuildError(f"label map has shape {label_map.shape}, sources give {shape}")
        return label_map.astype(np.uint8 if len(segments) < 256 else np.uint16, copy=False)
    for s in segments:
        if s.mask.shape != shape:
            raise ResultBuildError(f"mask {s.label!r} has shape {s.mask.shape}, sources give {shape}")
    return _segment_major([s.mask for s in segments]).transpose(1, 2, 3, 0)


def build_segmentation(
    sources: Sequence[Dataset], result: AlgorithmResult, spec: AlgorithmSpec, *, identity: ObjectIdentity
) -> Dataset:
    """Build a binary SEG whose frames align with ``sources``.

    Parameters
    ----------
    sources
        The single-frame source images, in the slice order of the masks (index 0 = first slice of
        the :class:`~ainode_sdk.base.Volume`).
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
    pixels = _pixels(result, shape)
    algorithm = algorithm_identification(spec, dict(result.parameters))
    descriptions = [_description(i, s, algorithm) for i, s in enumerate(segments, start=1)]
    try:
        seg = _Segmentation(
            source_images=list(sources),
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            **identity.kwargs(spec),
            series_description=f"{spec.name} segmentation",
            content_label=content_label(spec),
            content_description=spec.description[:64],
            contributing_equipment=contributing_equipment(spec),
        )
    except (ValueError, TypeError) as exc:
        raise ResultBuildError(f"SEG: {exc}") from exc
    return seg
