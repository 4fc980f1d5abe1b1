"""Key images: Secondary Capture (PS3.3 A.8.1) with a result burned in, for viewers with neither
SEG, SR nor GSPS support.

A small series: three axial slices of the source series (the representative slice of all the
result's segments together and the slices a quarter and three quarters through their extent) and
one coronal reformat (through the row where they cover the most), each windowed as the source's
first VOI window, with every segment's outlines drawn in its colour (the SEG's), and to the right a
panel with a banner (the algorithm, its version, that the image is derived, not for primary
diagnosis) and a legend (each measured label with its values and units). RGB, 8 bits; the image
part keeps the source's pixel spacing (the coronal one is resampled to square pixels of the
column spacing, or larger to stay within :data:`MAX_REFORMAT_PX`), Patient Orientation from the
image directions, Burned In Annotation YES, Image Type DERIVED\\SECONDARY and Source Image Sequence
naming the slices it was made from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.sr.codedict import codes
from scipy import ndimage

from ainode_sdk.base import RGB, AlgorithmResult, AlgorithmSpec, Volume
from node.errors import ResultBuildError
from node.results.air import contributing_equipment
from node.results.legend import measurement_lines
from node.results.outline import has_voxels, outlines, representative_slice, segment_regions
from node.results.seg import segment_colour

PANEL_PX = 380
BANNER_PX = 64
_FONT_PX = 13
_BANNER_COLOUR = (255, 210, 0)


@dataclass(frozen=True)
class KeyImage:
    """One key image before it is encoded.

    Attributes
    ----------
    pixels
        ``uint8`` RGB array ``(rows, columns, 3)``: the image part, then the panel to its right.
    image_columns
        Columns of the image part (the panel follows).
    masks
        Per segment number, the ``bool`` mask ``(rows, image_columns)`` the outlines were drawn from.
    pixel_spacing
        ``(row, column)`` spacing in mm.
    orientation
        Patient Orientation (row direction, column direction), e.g. ``("L", "P")``.
    sources
        Indices of the source slices the image was made from.
    plane
        ``"axial"`` or ``"coronal"``.
    """

    pixels: npt.NDArray[np.uint8]
    image_columns: int
    masks: dict[int, npt.NDArray[np.bool_]]
    pixel_spacing: tuple[float, float]
    orientation: tuple[str, str]
    sources: tuple[int, ...]
    plane: str


def _direction_letter(vector: npt.NDArray[np.float64]) -> str:
    """The patient direction (LPS: L, P, H or R, A, F) a direction cosine mostly points to."""
    axis = int(np.argmax(np.abs(vector)))
    return ("LPH" if vector[axis] > 0 else "RAF")[axis]


def _window(source: Dataset, voxels: npt.NDArray[np.float32]) -> tuple[float, float]:
    centre, width = source.get("WindowCenter"), source.get("WindowWidth")
    if centre is not None and width is not None:
        return _first(centre), max(_first(width), 1.0)
    low, high = (float(v) for v in np.percentile(voxels, [1, 99]))
    return (low + high) / 2, max(high - low, 1.0)


def _first(value: object) -> float:
    """The first value of a multi-valued DS (Window Center/Width may hold several)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def _grey(plane: npt.NDArray[np.float32], window: tuple[float, float]) -> npt.NDArray[np.uint8]:
    centre, width = window
    scaled = (plane - (centre - width / 2)) / width * 255.0
    return np.clip(scaled, 0, 255).astype(np.uint8)


def choose_slices(union: npt.NDArray[np.bool_]) -> list[int]:
    """The axial slices of the key images: the representative slice of ``union`` ``(slices, rows,
    columns)`` and those a quarter and three quarters through its extent, in slice order."""
    covered = np.flatnonzero(union.reshape(union.shape[0], -1).any(axis=1))
    first, last = int(covered[0]), int(covered[-1])
    picks = {representative_slice(union), first + (last - first) // 4, first + 3 * (last - first) // 4}
    return sorted(picks)


MAX_REFORMAT_PX = 768
"""The coronal key image is at most this many pixels high and wide (a long series is scaled down)."""


def reformat_pixel_mm(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]) -> float:
    """The (square) pixel size in mm of the coronal reformat of a ``(slices, rows, columns)``
    volume: the column spacing, or larger where the reformat would exceed :data:`MAX_REFORMAT_PX`."""
    height_mm, width_mm = shape[0] * spacing_mm[0], shape[2] * spacing_mm[2]
    return max(spacing_mm[2], height_mm / MAX_REFORMAT_PX, width_mm / MAX_REFORMAT_PX)


def coronal_plane(values: npt.NDArray[np.generic], row: int, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """The coronal plane at ``row`` of a ``(slices, rows, columns)`` array: see :func:`reformat`."""
    return reformat(values[:, row, :], values.shape, spacing_mm)


def reformat(plane: npt.NDArray[np.generic], shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]
             ) -> np.ndarray:  # fmt: skip
    """A ``(slices, columns)`` plane of a volume of ``shape`` as displayed: superior at the top,
    resampled to square pixels of :func:`reformat_pixel_mm` (nearest neighbour for masks, linear
    for images)."""
    plane = plane[::-1, :]
    pixel = reformat_pixel_mm(shape, spacing_mm)
    order = 0 if plane.dtype == np.bool_ else 1
    return ndimage.zoom(plane, (spacing_mm[0] / pixel, spacing_mm[2] / pixel), order=order, grid_mode=True,
                        mode="nearest")  # fmt: skip


def render_key_images(volume: Volume, sources: Sequence[Dataset], result: AlgorithmResult, spec: AlgorithmSpec
                      ) -> list[KeyImage]:  # fmt: skip
    """Render the key images of ``result`` (see the module docstring).

    Raises
    ------
    ResultBuildError
        No segment has a voxel.
    """
    if not has_voxels(result):
        raise ResultBuildError("key images: no segment has a voxel")
    if result.label_map is not None:
        union = result.label_map > 0
    else:
        union = np.logical_or.reduce([np.asarray(s.mask, dtype=bool) for s in result.segments])
    chosen = choose_slices(union)
    row = int(np.argmax(union.sum(axis=(0, 2))))
    del union
    shape = volume.voxels.shape
    axial: list[dict[int, npt.NDArray[np.bool_]]] = [{} for _ in chosen]
    coronal: dict[int, npt.NDArray[np.bool_]] = {}
    for region in segment_regions(result):  # one segment at a time: only its planes are kept
        number = region.segment_numbers[0]
        for planes, index in zip(axial, chosen, strict=True):
            if region.box[0].start <= index < region.box[0].stop:
                planes[number] = region.axial(index, (shape[1], shape[2]))
        if region.box[1].start <= row < region.box[1].stop:
            coronal[number] = reformat(region.coronal(row, (shape[0], shape[2])), shape, volume.spacing_mm)
    window = _window(sources[0], volume.voxels)
    orientation = np.asarray(sources[0].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = orientation[:3], orientation[3:]
    spacing = volume.spacing_mm
    images = []
    for index, planes in zip(chosen, axial, strict=True):
        images.append(
            _compose(volume.voxels[index], planes, window, result, spec, (spacing[1], spacing[2]),
                     (_direction_letter(row_dir), _direction_letter(col_dir)), (index,), "axial")
        )  # fmt: skip
    planes = coronal
    pixel = reformat_pixel_mm(shape, spacing)
    normal = np.cross(row_dir, col_dir)
    images.append(
        _compose(coronal_plane(volume.voxels, row, spacing), planes, window, result, spec, (pixel, pixel),
                 (_direction_letter(row_dir), _direction_letter(-normal)), tuple(range(len(sources))), "coronal")
    )  # fmt: skip
    return images


def _compose(
    plane: npt.NDArray[np.float32], masks: dict[int, npt.NDArray[np.bool_]], window: tuple[float, float],
    result: AlgorithmResult, spec: AlgorithmSpec, pixel_spacing: tuple[float, float], orientation: tuple[str, str],
    sources: tuple[int, ...], kind: str,
) -> KeyImage:  # fmt: skip
    rows, columns = plane.shape
    height = max(rows, BANNER_PX + 40)
    canvas = Image.new("RGB", (columns + PANEL_PX, height), (0, 0, 0))
    canvas.paste(Image.fromarray(_grey(plane, window), mode="L").convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    colours: dict[int, RGB] = {}
    for number, mask in masks.items():
        colour = colours[number] = segment_colour(result.segments[number - 1], number)
        for points in outlines(mask):
            draw.line([(float(x) - 0.5, float(y) - 0.5) for x, y in points], fill=colour, width=1)
    font = ImageFont.load_default(size=_FONT_PX)
    left = columns + 8
    draw.rectangle((columns, 0, columns + PANEL_PX - 1, BANNER_PX), fill=(60, 60, 60))
    banner = [f"{spec.name} {spec.version}", f"DERIVED {kind.upper()} IMAGE - ainode AI result",
              "not for primary diagnosis"]  # fmt: skip
    for i, text in enumerate(banner):
        draw.text((left, 4 + i * (_FONT_PX + 6)), text, fill=_BANNER_COLOUR, font=font)
    y = BANNER_PX + 8
    lines = measurement_lines(result)
    labels = list(dict.fromkeys([s.label for n, s in enumerate(result.segments, 1) if n in masks] + list(lines)))
    segment_numbers = {s.label: n for n, s in enumerate(result.segments, start=1)}
    for count, label in enumerate(labels):
        block = [label, *("  " + line for line in lines.get(label, []))]
        if y + (_FONT_PX + 3) * len(block) > height - (_FONT_PX + 6):
            draw.text((left, y), f"... {len(labels) - count} more in the SR", fill=(200, 200, 200), font=font)
            break
        swatch = colours.get(segment_numbers.get(label, 0))
        if swatch is not None:
            draw.rectangle((left, y + 2, left + 10, y + 12), fill=swatch)
        for i, text in enumerate(block):
            draw.text((left + 16, y + i * (_FONT_PX + 3)), text, fill=(255, 255, 255), font=font)
        y += (_FONT_PX + 3) * len(block) + 6
    pixels = np.asarray(canvas, dtype=np.uint8)
    full = {n: np.pad(m, ((0, height - rows), (0, 0))) for n, m in masks.items()}
    return KeyImage(pixels, columns, full, pixel_spacing, orientation, sources, kind)


def build_key_images(
    volume: Volume,
    sources: Sequence[Dataset],
    result: AlgorithmResult,
    spec: AlgorithmSpec,
    *,
    series_instance_uid: str,
    sop_instance_uid: Sequence[str],
    series_number: int,
) -> list[Dataset]:
    """Build the key image series of ``result``.

    Parameters
    ----------
    volume
        The source series' voxels (HU for CT), ``(slices, rows, columns)``, in the order of ``sources``.
    sop_instance_uid
        One SOP Instance UID per key image (four).

    Raises
    ------
    ResultBuildError
        No segment has a voxel, or highdicom refuses an image.
    """
    built: list[Dataset] = []
    try:
        for number, (image, uid) in enumerate(zip(render_key_images(volume, sources, result, spec),
                                                   sop_instance_uid, strict=False), start=1):  # fmt: skip
            ds = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=sources[image.sources[0]],
                pixel_array=image.pixels,
                photometric_interpretation="RGB",
                bits_allocated=8,
                coordinate_system="PATIENT",
                series_instance_uid=series_instance_uid,
                series_number=series_number,
                sop_instance_uid=uid,
                instance_number=number,
                manufacturer="ainode",
                pixel_spacing=image.pixel_spacing,  # type: ignore[arg-type]  # highdicom's hint says int
                patient_orientation=image.orientation,
                contributing_equipment=contributing_equipment(spec),
                transfer_syntax_uid="1.2.840.10008.1.2.1",
            )
            ds.ImageType = ["DERIVED", "SECONDARY"]
            ds.ConversionType = "WSD"  # workstation: rendered by this node, not digitised
            ds.BurnedInAnnotation = "YES"
            ds.Laterality = ""  # General Series, Type 2C: unknown (the source may show a paired organ)
            ds.SeriesDescription = f"{spec.name} key images"
            ds.DerivationDescription = f"{image.plane} key image of {spec.name} {spec.version} with outlines"[:1024]
            derivation = [codes.DCM.Segmentation] + ([codes.DCM.MultiplanarReformatting] if image.plane == "coronal"
                                                     else [])  # fmt: skip
            ds.DerivationCodeSequence = [hd.sr.CodedConcept.from_code(c) for c in derivation]
            ds.SourceImageSequence = [_source_item(sources[i]) for i in image.sources]
            built.append(ds)
    except (ValueError, TypeError) as exc:
        raise ResultBuildError(f"SC: {exc}") from exc
    return built


def _source_item(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    return item
