"""Assemble a :class:`ainode_sdk.base.Volume` from the single-frame images of one series.

Slices are sorted by their position along the slice normal (PS3.3 C.7.6.2.1.1: the normal is the
cross product of the row and column direction cosines of Image Orientation (Patient)). Pixel data
are decoded in parallel threads (pydicom with the pylibjpeg plugins for compressed syntaxes) and
the Modality LUT (Rescale Slope/Intercept) is applied, so CT values are in HU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from pydicom import Dataset
from pydicom.pixels import get_decoder

from ainode_sdk.base import Volume
from node.errors import SeriesRefused

_TOLERANCE_MM = 0.05


def _floats(ds: Dataset, keyword: str, n: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != n:
        raise SeriesRefused(f"{keyword} is missing or malformed")
    return np.array([float(v) for v in value], dtype=np.float64)


def sort_slices(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Return ``datasets`` sorted by position along the slice normal (ascending).

    Raises
    ------
    SeriesRefused
        Multi-frame images, mixed orientations or sizes, or duplicate positions.
    """
    if not datasets:
        raise SeriesRefused("the series has no images")
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise SeriesRefused("multi-frame (enhanced) images are not supported by this loader yet")
    orientation = _floats(datasets[0], "ImageOrientationPatient", 6)
    size = (datasets[0].Rows, datasets[0].Columns)
    for ds in datasets:
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6), orientation, atol=1e-4):
            raise SeriesRefused("images of the series have different orientations")
        if (ds.Rows, ds.Columns) != size:
            raise SeriesRefused("images of the series have different sizes")
    normal = np.cross(orientation[:3], orientation[3:])
    positions = [float(_floats(ds, "ImagePositionPatient", 3) @ normal) for ds in datasets]
    order = np.argsort(positions)
    sorted_positions = np.array(positions)[order]
    if np.any(np.diff(sorted_positions) < _TOLERANCE_MM):
        raise SeriesRefused("two images share one slice position")
    return [datasets[i] for i in order]


def _hu_into(out: np.ndarray, ds: Dataset) -> None:
    """Decode ``ds``'s pixels into ``out`` (rows, columns) as float32 after the Modality LUT
    (rescale slope and intercept), without caching the decoded array on the data set."""
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    pixels = get_decoder(syntax).as_array(ds)[0] if syntax is not None else ds.pixel_array
    np.multiply(pixels, np.float32(slope), out=out, casting="unsafe")
    out += np.float32(intercept)


def load_volume(
    datasets: Sequence[Dataset],
    workers: int = 2,
    allocate: Callable[[tuple[int, int, int]], np.ndarray] | None = None,
) -> tuple[Volume, list[Dataset]]:
    """Build a volume and return it with the slices in volume order.

    Parameters
    ----------
    datasets
        Single-frame images of one series (any order).
    workers
        Threads decoding pixel data in parallel.
    allocate
        Returns the float32 array of shape (slices, rows, columns) to fill, e.g. in shared memory
        (:class:`node.jobs.isolation.SharedVolume`); a new array by default.

    Returns
    -------
    tuple
        The :class:`Volume` (``float32``, shape ``(slices, rows, columns)``, HU for CT) and the
        data sets sorted like its slices.

    Raises
    ------
    SeriesRefused
        Geometry the loader cannot represent (see :func:`sort_slices`) or uneven slice spacing.
    """
    slices = sort_slices(datasets)
    first = slices[0]
    orientation = _floats(first, "ImageOrientationPatient", 6)
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    pixel_spacing = _floats(first, "PixelSpacing", 2)  # (between rows, between columns)
    positions = np.array([_floats(ds, "ImagePositionPatient", 3) for ds in slices])
    if len(slices) > 1:
        gaps = np.diff(positions @ normal)
        if np.ptp(gaps) > max(_TOLERANCE_MM, 0.01 * float(np.median(gaps))):
            raise SeriesRefused("slice spacing is not uniform (missing slices?)")
        step = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        step = normal * float(first.get("SliceThickness", 1) or 1)
    affine = np.eye(4)
    affine[:3, 0] = step  # slice index
    affine[:3, 1] = col_cos * pixel_spacing[0]  # row index moves along the column direction
    affine[:3, 2] = row_cos * pixel_spacing[1]  # column index moves along the row direction
    affine[:3, 3] = positions[0]
    shape = (len(slices), int(first.Rows), int(first.Columns))
    voxels = allocate(shape) if allocate is not None else np.empty(shape, dtype=np.float32)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(_hu_into, voxels, slices))  # one copy of the volume, filled in place
    thickness = first.get("SliceThickness")
    volume = Volume(
        voxels=voxels,
        spacing_mm=(float(np.linalg.norm(step)), float(pixel_spacing[0]), float(pixel_spacing[1])),
        affine=affine,
        modality=str(first.get("Modality", "")),
        slice_thickness_mm=float(thickness) if thickness not in (None, "") else None,
    )
    return volume, slices
