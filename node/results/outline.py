"""Planar geometry of a result's regions: representative slices and outlines in image coordinates.

What viewers without volumetric support draw (the planar SR, the GSPS, the key images) is the
outline of a region on a slice. Everything here works on the algorithm's masks, axis order
``(slices, rows, columns)`` as in :class:`~algorithms.base.Volume`, and writes outlines in DICOM
image coordinates (PS3.3 C.18.6.1.1: column, row; the top left corner of the top left pixel is
0.0/0.0, so the centre of pixel ``(r, c)`` is ``(c + 0.5, r + 0.5)``).

An outline is the iso-line at 0.5 between pixels inside and outside the region (marching squares,
scikit-image), so every point lies on the region's border: half a pixel from the centres of the
inside and the outside pixel it separates. It is simplified (Douglas-Peucker) to within half a pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from skimage import measure

from algorithms.base import AlgorithmResult

MIN_PART_PIXELS = 10
"""Connected parts smaller than this (pixels on the slice) get no outline."""


@dataclass(frozen=True)
class Region:
    """A measured region of a result: a segment, or a group of segments (e.g. "Both kidneys").

    Attributes
    ----------
    label
        The measurement group's label (a segment label or a group label).
    mask
        ``bool`` array ``(slices, rows, columns)``.
    segment_numbers
        The SEG segment numbers (from 1) the region is made of.
    """

    label: str
    mask: npt.NDArray[np.bool_]
    segment_numbers: tuple[int, ...]


def segment_mask(result: AlgorithmResult, number: int) -> npt.NDArray[np.bool_]:
    """The mask of segment ``number`` (from 1), from its own mask or the result's label map."""
    if result.label_map is not None:
        return np.asarray(result.label_map == number)
    return np.asarray(result.segments[number - 1].mask, dtype=bool)


def regions(result: AlgorithmResult) -> dict[str, Region]:
    """The region of every measured label: a segment's own mask; for a group label (one in
    ``group_sites``), the union of its ``group_members``, or of every segment when it names none.

    Returns
    -------
    dict
        Label to :class:`Region`, in the order the labels are first measured; labels without a
        voxel are left out (there is nothing to outline).
    """
    numbers = {s.label: i for i, s in enumerate(result.segments, start=1)}
    labels = list(dict.fromkeys([m.segment_label for m in result.measurements]))
    out: dict[str, Region] = {}
    for label in labels:
        if label in numbers:
            members: tuple[int, ...] = (numbers[label],)
        else:
            named = result.group_members.get(label)
            members = tuple(numbers[n] for n in named if n in numbers) if named else tuple(numbers.values())
        if not members:
            continue
        mask = segment_mask(result, members[0])
        for n in members[1:]:
            mask = mask | segment_mask(result, n)
        if mask.any():
            out[label] = Region(label, mask, members)
    return out


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
    min_fraction: float = 0.0,
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
        outer = measure.approximate_polygon(outer, tolerance=0.5)
        points = np.column_stack([outer[:, 1] - 1 + cols.start + 0.5, outer[:, 0] - 1 + rows.start + 0.5])
        if not np.array_equal(points[0], points[-1]):
            points = np.vstack([points, points[:1]])
        out.append(points)
    return out


def _enclosed_area(contour: npt.NDArray[np.float64]) -> float:
    y, x = contour[:, 0], contour[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
