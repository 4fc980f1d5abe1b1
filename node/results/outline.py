"""Planar geometry of a result's regions: representative slices and outlines in image coordinates.

What viewers without volumetric support draw (the planar SR, the GSPS, the key images) is the
outline of a region on a slice. Everything here works on the algorithm's masks, axis order
``(slices, rows, columns)`` as in :class:`~ainode_sdk.base.Volume`, and writes outlines in DICOM
image coordinates (PS3.3 C.18.6.1.1: column, row; the top left corner of the top left pixel is
0.0/0.0, so the centre of pixel ``(r, c)`` is ``(c + 0.5, r + 0.5)``).

An outline is the iso-line at 0.5 between pixels inside and outside the region (marching squares,
scikit-image), so every point lies on the region's border: half a pixel from the centres of the
inside and the outside pixel it separates. Points on straight runs are dropped (losslessly).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from skimage import measure

from ainode_sdk.base import AlgorithmResult, bounding_box

MIN_PART_PIXELS = 10
"""Connected parts smaller than this (pixels on the slice) get no outline."""


@dataclass(frozen=True)
class Region:
    """Where a segment, or a group of segments (e.g. "Both kidneys"), lies: its bounding box and
    its mask inside that box, so that a result of many segments never needs a full-volume mask per
    segment.

    Attributes
    ----------
    label
        The segment's or the measurement group's label.
    box
        The bounding box as index ranges ``(slices, rows, columns)`` of the volume.
    mask
        ``bool`` array of the box's shape: the region inside the box.
    segment_numbers
        The SEG segment numbers (from 1) the region is made of.
    """

    label: str
    box: tuple[slice, slice, slice]
    mask: npt.NDArray[np.bool_]
    segment_numbers: tuple[int, ...]

    def representative_slice(self) -> int:
        """Volume index of the slice where the region covers the largest area."""
        return self.box[0].start + representative_slice(self.mask)

    def axial(self, index: int, shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
        """The region on slice ``index`` as a ``(rows, columns)`` plane of ``shape``."""
        plane = np.zeros(shape, dtype=bool)
        if self.box[0].start <= index < self.box[0].stop:
            plane[self.box[1], self.box[2]] = self.mask[index - self.box[0].start]
        return plane

    def coronal(self, row: int, shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
        """The region in row ``row`` of every slice as a ``(slices, columns)`` plane of ``shape``."""
        plane = np.zeros(shape, dtype=bool)
        if self.box[1].start <= row < self.box[1].stop:
            plane[self.box[0], self.box[2]] = self.mask[:, row - self.box[1].start, :]
        return plane

    def outlines(self, index: int, **kwargs: Any) -> list[npt.NDArray[np.float64]]:
        """:func:`outlines` of the region on slice ``index``, in that image's coordinates."""
        if not self.box[0].start <= index < self.box[0].stop:
            return []
        origin = (self.box[1].start, self.box[2].start)
        return outlines(self.mask[index - self.box[0].start], origin=origin, **kwargs)


def has_voxels(result: AlgorithmResult) -> bool:
    """Whether any segment of ``result`` has a voxel."""
    if result.label_map is not None:
        return bool(result.label_map.any())
    return any(np.asarray(s.mask).any() for s in result.segments)


def _boxes(result: AlgorithmResult) -> list[tuple[slice, slice, slice] | None]:
    """Each segment's bounding box (``None``: no voxel); a label map's in one pass over it."""
    if result.label_map is not None:
        return list(ndimage.find_objects(result.label_map, max_label=len(result.segments)))
    return [cast("tuple[slice, slice, slice] | None", bounding_box(s.mask)) for s in result.segments]


def _crop(result: AlgorithmResult, number: int, box: tuple[slice, slice, slice]) -> npt.NDArray[np.bool_]:
    if result.label_map is not None:
        return np.asarray(result.label_map[box] == number)
    return np.asarray(result.segments[number - 1].mask[box], dtype=bool)


def segment_regions(result: AlgorithmResult) -> Iterator[Region]:
    """The region of each segment that has a voxel, in segment order, one at a time."""
    for number, (segment, box) in enumerate(zip(result.segments, _boxes(result), strict=True), start=1):
        if box is not None:
            yield Region(segment.label, box, _crop(result, number, box), (number,))


def measured_regions(result: AlgorithmResult) -> Iterator[Region]:
    """The region of every measured label, in the order the labels are first measured, one at a
    time: a segment's own; for a group label (one in ``group_sites``), the union of its
    ``group_members``, or of every segment when it names none. Labels without a voxel are left out
    (nothing to outline)."""
    numbers = {s.label: i for i, s in enumerate(result.segments, start=1)}
    boxes = _boxes(result)
    for label in dict.fromkeys([m.segment_label for m in result.measurements]):
        if label in numbers:
            members: tuple[int, ...] = (numbers[label],)
        else:
            named = result.group_members.get(label)
            members = tuple(numbers[n] for n in named if n in numbers) if named else tuple(numbers.values())
        present = [(n, box) for n in members if (box := boxes[n - 1]) is not None]
        if not present:
            continue
        box = (
            slice(min(b[0].start for _, b in present), max(b[0].stop for _, b in present)),
            slice(min(b[1].start for _, b in present), max(b[1].stop for _, b in present)),
            slice(min(b[2].start for _, b in present), max(b[2].stop for _, b in present)),
        )
        mask = np.zeros(tuple(b.stop - b.start for b in box), dtype=bool)
        for n, part in present:
            inner = tuple(slice(part[a].start - box[a].start, part[a].stop - box[a].start) for a in range(3))
            mask[inner] |= _crop(result, n, part)
        yield Region(label, box, mask, members)


def representative_slice(mask: npt.NDArray[np.bool_]) -> int:
    """Index of the slice where ``mask`` ``(slices, rows, columns)`` covers the largest area.

    Raises
    ------
    ValueError
        The mask is empty.
    """
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    if not areas.any():
        raise ValueError("empty mask has no representative slice")
    return int(np.argmax(areas))


def outlines(
    plane: npt.NDArray[np.bool_], min_pixels: int = MIN_PART_PIXELS, max_parts: int | None = None,
    min_fraction: float = 0.0, origin: tuple[int, int] = (0, 0),
) -> list[npt.NDArray[np.float64]]:  # fmt: skip
    """The outer outline of each connected part of a 2D mask, largest part first.

    Parameters
    ----------
    plane
        ``bool`` array ``(rows, columns)``.
    min_pixels
        Parts with fewer pixels are skipped.
    max_parts
        At most this many outlines (the largest parts), or all.
    min_fraction
        Parts smaller than this fraction of the largest part are skipped too.
    origin
        ``(row, column)`` of the plane's first pixel in the image (a crop's offset).

    Returns
    -------
    list of numpy.ndarray
        Closed polylines, each ``(n, 2)`` of image coordinates ``(column, row)``; the first point
        repeats as the last.
    """
    labels, count = ndimage.label(plane)
    if count == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    smallest = max(min_pixels, min_fraction * float(sizes.max()))
    order = [int(i) + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= smallest]
    if max_parts is not None:
        order = order[:max_parts]
    objects = ndimage.find_objects(labels)
    out = []
    for part in order:
        rows, cols = objects[part - 1]
        crop = np.pad(labels[rows, cols] == part, 1)  # padded: an outline at the image edge closes
        contours = measure.find_contours(crop.astype(np.float32), 0.5)
        outer = max(contours, key=_enclosed_area)  # holes give inner contours, the border encloses most
        outer = _drop_collinear(outer)
        points = np.column_stack(
            [outer[:, 1] - 1 + cols.start + origin[1] + 0.5, outer[:, 0] - 1 + rows.start + origin[0] + 0.5]
        )
        if not np.array_equal(points[0], points[-1]):
            points = np.vstack([points, points[:1]])
        out.append(points)
    return out


def _drop_collinear(contour: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The closed contour without the points that lie on a straight run between their neighbours
    (lossless: every point kept is one of the contour's, the shape is unchanged)."""
    ring = contour[:-1] if np.array_equal(contour[0], contour[-1]) else contour
    if len(ring) < 4:
        return contour
    before, after = ring - np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0) - ring
    turns = np.abs(before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) > 1e-9
    kept = ring[turns]
    return np.vstack([kept, kept[:1]]) if len(kept) >= 3 else contour


def _enclosed_area(contour: npt.NDArray[np.float64]) -> float:
    y, x = contour[:, 0], contour[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
