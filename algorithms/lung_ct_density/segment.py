"""Left and right lung segmentation on chest CT by thresholding and 3D connected components.

The method follows the classic threshold-based pipeline (Hu, Hoffman & Reinhardt, IEEE TMI 2001):

1. voxels below ``air_threshold_hu`` (default -320 HU) are air-like;
2. air-like 3D components touching the in-plane border of the field of view (air around the body,
   the table) are dropped;
3. the trachea and main bronchi are tracked slice by slice from the most superior slice downward
   and removed while they are a small airway lumen separate from the lung;
4. the largest remaining components are the lungs; if they are joined (anterior junction), they are
   split by iterative erosion, then each voxel goes to the seed that reaches it first by geodesic
   dilation inside the joined mask;
5. holes (vessels, nodules) are filled slice by slice;
6. left and right are assigned from the patient coordinates (LPS +x = patient left), never from
   array order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cc3d
import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from algorithms.base import Volume
from algorithms.errors import SeriesRefused

BoolArray = npt.NDArray[np.bool_]

_STRUCTURE_6 = ndi.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class LungMasks:
    """Left and right lung masks, each ``bool`` of shape ``(slices, rows, columns)``."""

    left: BoolArray
    right: BoolArray


def _drop_border_air(air: BoolArray) -> BoolArray:
    """Remove air components that touch the in-plane border (outside the body).

    The air is framed by one voxel of air around every slice: all components that touch the border
    then join the frame's single component, found by one labelling pass.
    """
    framed = np.pad(air, ((0, 0), (1, 1), (1, 1)), constant_values=True)
    labels, _ = _label_3d(framed)
    outside = labels[0, 0, 0]
    return air & (labels[:, 1:-1, 1:-1] != outside)


def _airway_mask(
    candidate: BoolArray, pixel_area_mm2: float, max_area_mm2: float, centre: tuple[float, float], radius: float
) -> BoolArray:
    """Track the trachea and main bronchi from the most superior slice down.

    In each axial slice (``candidate[k]``), airway lumen is a small 2D component; the tracking starts
    at the small component nearest the slice centre in the top slice that has one and follows
    overlapping small components downward. Components larger than ``max_area_mm2`` are lung and
    stop the tracking of that branch. ``centre`` (row, column) and ``radius`` (pixels) bound where
    the trachea may start: around the centre of the image.
    """
    airway = np.zeros_like(candidate)
    max_pixels = max_area_mm2 / pixel_area_mm2
    previous: BoolArray | None = None
    for k in range(candidate.shape[0] - 1, -1, -1):
        labels, n = ndi.label(candidate[k])
        if n == 0:
            if previous is not None:
                break
            continue
        sizes = _component_sizes(labels, n)
        if previous is None:
            # Start: the small component closest to the image centre, if any.
            centres = ndi.center_of_mass(np.ones_like(labels), labels, index=np.arange(1, n + 1))
            best, best_d = 0, np.inf
            for i, (size, (r, c)) in enumerate(zip(sizes, centres, strict=True), start=1):
                d = np.hypot(r - centre[0], c - centre[1])
                if size <= max_pixels and d < radius and d < best_d:
                    best, best_d = i, d
            if best == 0:
                if sizes.max() > max_pixels:
                    break  # reached lung without an isolated airway: nothing to remove
                continue
            current = labels == best
        else:
            touching = np.unique(labels[previous & (labels > 0)])
            small = [t for t in touching if sizes[t - 1] <= max_pixels]
            if not small:
                break
            current = np.isin(labels, small)
        airway[k] = current
        previous = current
    return airway


def _component_sizes(labels: npt.NDArray[np.integer], n: int) -> npt.NDArray[np.int64]:
    """Voxel count of components ``1..n`` of a label image."""
    counts = np.asarray(cc3d.statistics(labels)["voxel_counts"], dtype=np.int64)
    return np.pad(counts, (0, max(0, n + 1 - len(counts))))[1 : n + 1]


def _centroid(mask: BoolArray) -> npt.NDArray[np.float64]:
    """Mean voxel index (slice, row, column) of ``mask``'s true voxels."""
    total = float(np.count_nonzero(mask))
    axes = ((1, 2), (0, 2), (0, 1))
    return np.array(
        [(mask.sum(axis=a, dtype=np.int64) * np.arange(n)).sum() / total for a, n in zip(axes, mask.shape, strict=True)]
    )


def _label_3d(mask: BoolArray) -> tuple[npt.NDArray[np.unsignedinteger[Any]], int]:
    """6-connected components of a 3D mask (cc3d: about twice as fast as SciPy here)."""
    labels, n = cc3d.connected_components(mask, connectivity=6, return_N=True)
    return labels, int(n)


def _box(mask: BoolArray, margin: int = 1) -> tuple[slice, ...]:
    """Bounding box of ``mask``'s true voxels, grown by ``margin`` voxels within the array."""
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if present.size == 0:
            return tuple(slice(0, n) for n in mask.shape)
        box.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _split_joined(mask: BoolArray, min_voxels: int, max_erosions: int = 8) -> list[BoolArray]:
    """Split one joined lung component into two by eroding until it separates."""
    box = _box(mask)
    parts = _split_joined_cropped(mask[box], min_voxels, max_erosions)
    out = []
    for part in parts:
        full = np.zeros_like(mask)
        full[box] = part
        out.append(full)
    return out


def _split_joined_cropped(mask: BoolArray, min_voxels: int, max_erosions: int) -> list[BoolArray]:
    eroded = mask
    for erosions in range(1, max_erosions + 1):
        eroded = ndi.binary_erosion(eroded, structure=_STRUCTURE_6)
        labels, n = _label_3d(eroded)
        if n < 2:
            continue
        sizes = _component_sizes(labels, n)
        order = np.argsort(sizes)[::-1]
        if sizes[order[1]] < min_voxels / 4:
            continue
        return list(_grow_seeds(labels == order[0] + 1, labels == order[1] + 1, mask, erosions + 1))
    return [mask]


def _grow_seeds(a: BoolArray, b: BoolArray, mask: BoolArray, steps: int) -> tuple[BoolArray, BoolArray]:
    """Give every voxel of ``mask`` to seed ``a`` or ``b``.

    The seeds grow inside ``mask`` one 6-connected step at a time for ``steps`` steps (as far as
    the erosion that separated them reached), so a voxel goes to the seed that reaches it first
    (geodesic nearest seed). What is still unassigned, thin structures the erosion cut off, goes
    by connected piece to the seed it touches most.
    """
    for _ in range(steps):
        a = ndi.binary_dilation(a, structure=_STRUCTURE_6) & mask & ~b
        b = ndi.binary_dilation(b, structure=_STRUCTURE_6) & mask & ~a
    rest = mask & ~a & ~b
    labels, n = _label_3d(rest)
    if n:
        touch_a = np.bincount(labels[ndi.binary_dilation(a, structure=_STRUCTURE_6) & rest], minlength=n + 1)
        touch_b = np.bincount(labels[ndi.binary_dilation(b, structure=_STRUCTURE_6) & rest], minlength=n + 1)
        to_a = touch_a >= touch_b
        to_a[0] = False
        to_b = ~to_a
        to_b[0] = False
        a = a | to_a[labels]
        b = b | to_b[labels]
    return a, b


def _fill_holes_per_slice(mask: BoolArray) -> BoolArray:
    """Fill holes (vessels, airways inside the lung, nodules) in each axial slice."""
    filled = np.zeros_like(mask)
    box = _box(mask)
    inside, out = mask[box], filled[box]
    for k in range(inside.shape[0]):
        if inside[k].any():
            out[k] = ndi.binary_fill_holes(inside[k])
    return filled


def segment_lungs(
    volume: Volume,
    air_threshold_hu: float = -320.0,
    min_lung_ml: float = 200.0,
    max_airway_area_mm2: float = 600.0,
) -> LungMasks:
    """Segment the left and right lung of a chest CT.

    Parameters
    ----------
    volume
        CT volume in HU, shape ``(slices, rows, columns)``, slices ordered inferior to superior
        along the slice normal (see :class:`algorithms.base.Volume`).
    air_threshold_hu
        Voxels below this value (HU) are candidate lung or airway.
    min_lung_ml
        A component smaller than this (ml) is not taken as a lung.
    max_airway_area_mm2
        Largest in-plane area (mm^2) of a 2D component still tracked as trachea or main bronchus.

    Returns
    -------
    LungMasks
        ``bool`` masks of shape ``(slices, rows, columns)``; left and right are the patient's
        (LPS +x is the patient's left).

    Raises
    ------
    algorithms.errors.SeriesRefused
        When no lung of at least ``min_lung_ml`` is found.
    """
    hu = volume.voxels
    air = hu < air_threshold_hu
    inside = _drop_border_air(air)
    box = _box(inside, margin=2)  # everything below works on the box around the air inside the body
    candidate = inside[box]
    rows, cols = hu.shape[1:]
    centre = (rows / 2 - box[1].start, cols / 2 - box[2].start)
    pixel_area = volume.spacing_mm[1] * volume.spacing_mm[2]
    airway = _airway_mask(candidate, pixel_area, max_airway_area_mm2, centre, min(rows, cols) / 6)
    candidate &= ~ndi.binary_dilation(airway, iterations=1)
    labels, n = _label_3d(candidate)
    if n == 0:
        raise SeriesRefused("no air-filled region inside the body: no lungs found")
    sizes = _component_sizes(labels, n)
    min_voxels = int(min_lung_ml / volume.voxel_volume_ml)
    big = [int(i) + 1 for i in np.argsort(sizes)[::-1][:2] if sizes[i] >= min_voxels]
    if not big:
        raise SeriesRefused(f"no lung of at least {min_lung_ml:.0f} ml found")
    parts = [labels == i for i in big]
    if len(parts) == 1:
        parts = _split_joined(parts[0], min_voxels)
    if len(parts) < 2:
        raise SeriesRefused("only one lung region found; cannot tell left from right")
    offset = np.array([s.start for s in box])
    centroids_lps = [volume.index_to_lps(_centroid(p) + offset)[0] for p in parts]
    # LPS: +x is towards the patient's left.
    left_i = int(np.argmax([c[0] for c in centroids_lps]))
    left, right = np.zeros_like(air), np.zeros_like(air)
    left[box] = _fill_holes_per_slice(parts[left_i])
    right[box] = _fill_holes_per_slice(parts[1 - left_i]) & ~left[box]
    return LungMasks(left=left, right=right)
