"""Left and right lung segmentation on chest CT by thresholding and 3D connected components.

The method follows the classic threshold-based pipeline (Hu, Hoffman & Reinhardt, IEEE TMI 2001):

1. voxels below ``air_threshold_hu`` (default -320 HU) are air-like;
2. air-like 3D components touching the in-plane border of the field of view (air around the body,
   the table) are dropped;
3. the trachea and main bronchi are tracked slice by slice from the most superior slice downward
   and removed while they are a small airway lumen separate from the lung;
4. the largest remaining components are the lungs; if they are joined (anterior junction), they are
   split by iterative erosion and nearest-seed assignment;
5. holes (vessels, nodules) are filled slice by slice;
6. left and right are assigned from the patient coordinates (LPS +x = patient left), never from
   array order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from algorithms.base import Volume
from node.errors import SeriesRefused

BoolArray = npt.NDArray[np.bool_]

_STRUCTURE_6 = ndi.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class LungMasks:
    """Left and right lung masks, each ``bool`` of shape ``(slices, rows, columns)``."""

    left: BoolArray
    right: BoolArray


def _drop_border_air(air: BoolArray) -> BoolArray:
    """Remove air components that touch the in-plane border (outside the body)."""
    labels, n = ndi.label(air, structure=_STRUCTURE_6)
    if n == 0:
        return air
    border = np.zeros(n + 1, dtype=bool)
    for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        border[np.unique(face)] = True
    border[0] = True
    return ~border[labels] & air


def _airway_mask(candidate: BoolArray, pixel_area_mm2: float, max_area_mm2: float) -> BoolArray:
    """Track the trachea and main bronchi from the most superior slice down.

    In each axial slice (``candidate[k]``), airway lumen is a small 2D component; the tracking starts
    at the small component nearest the slice centre in the top slice that has one and follows
    overlapping small components downward. Components larger than ``max_area_mm2`` are lung and
    stop the tracking of that branch.
    """
    airway = np.zeros_like(candidate)
    max_pixels = max_area_mm2 / pixel_area_mm2
    previous: BoolArray | None = None
    rows, cols = candidate.shape[1:]
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
                d = np.hypot(r - rows / 2, c - cols / 2)
                if size <= max_pixels and d < min(rows, cols) / 6 and d < best_d:
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
    return np.bincount(labels.ravel(), minlength=n + 1)[1:]


def _split_joined(mask: BoolArray, min_voxels: int, max_erosions: int = 8) -> list[BoolArray]:
    """Split one joined lung component into two by eroding until it separates."""
    box = ndi.find_objects(mask.astype(np.uint8))[0]
    parts = _split_joined_cropped(mask[box], min_voxels, max_erosions)
    out = []
    for part in parts:
        full = np.zeros_like(mask)
        full[box] = part
        out.append(full)
    return out


def _split_joined_cropped(mask: BoolArray, min_voxels: int, max_erosions: int) -> list[BoolArray]:
    eroded = mask
    for _ in range(max_erosions):
        eroded = ndi.binary_erosion(eroded, structure=_STRUCTURE_6)
        labels, n = ndi.label(eroded, structure=_STRUCTURE_6)
        if n < 2:
            continue
        sizes = _component_sizes(labels, n)
        order = np.argsort(sizes)[::-1]
        if sizes[order[1]] < min_voxels / 4:
            continue
        seeds = np.zeros_like(labels)
        seeds[labels == order[0] + 1] = 1
        seeds[labels == order[1] + 1] = 2
        # Each voxel of the joined mask goes to the nearest seed.
        _, nearest = ndi.distance_transform_edt(seeds == 0, return_indices=True)
        assigned = seeds[tuple(nearest)]
        return [mask & (assigned == 1), mask & (assigned == 2)]
    return [mask]


def _fill_holes_per_slice(mask: BoolArray) -> BoolArray:
    """Fill holes (vessels, airways inside the lung, nodules) in each axial slice."""
    filled = np.empty_like(mask)
    for k in range(mask.shape[0]):
        filled[k] = ndi.binary_fill_holes(mask[k])
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
    node.errors.SeriesRefused
        When no lung of at least ``min_lung_ml`` is found.
    """
    hu = volume.voxels
    air = hu < air_threshold_hu
    candidate = _drop_border_air(air)
    pixel_area = volume.spacing_mm[1] * volume.spacing_mm[2]
    candidate &= ~ndi.binary_dilation(_airway_mask(candidate, pixel_area, max_airway_area_mm2), iterations=1)
    labels, n = ndi.label(candidate, structure=_STRUCTURE_6)
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
    centroids_lps = [volume.index_to_lps(np.argwhere(p).mean(axis=0))[0] for p in parts]
    # LPS: +x is towards the patient's left.
    left_i = int(np.argmax([c[0] for c in centroids_lps]))
    left = _fill_holes_per_slice(parts[left_i])
    right = _fill_holes_per_slice(parts[1 - left_i])
    return LungMasks(left=left, right=right & ~left)
