"""Between the node's volumes and MONAI's images.

A :class:`~ainode_sdk.base.Volume` is ``(slices, rows, columns)`` with an index-to-LPS affine. MONAI
(like ITK and NIfTI readers of a DICOM series) holds ``(x, y, z) = (columns, rows, slices)`` with an
index-to-RAS affine. The arrays are transposed, and the affine is flipped in x and y (LPS -> RAS)
with its index axes permuted, so the image MONAI sees is the one its file loader would have made.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ainode_sdk.base import Volume

_PERMUTE = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ras_affine(volume: Volume) -> npt.NDArray[np.float64]:
    """``4 x 4`` affine from a ``(column, row, slice)`` index to RAS mm."""
    return _LPS_TO_RAS @ volume.affine @ _PERMUTE


def to_metatensor(volume: Volume) -> Any:
    """The volume as a MONAI ``MetaTensor`` of shape ``(x, y, z)`` (no channel yet, as a loader
    gives it) with its RAS affine; voxel values unchanged (HU for CT)."""
    import torch
    from monai.data import MetaTensor

    array = np.ascontiguousarray(volume.voxels.transpose(2, 1, 0))
    return MetaTensor(
        torch.from_numpy(array),
        affine=torch.from_numpy(ras_affine(volume)),
        meta={"original_channel_dim": "no_channel", "filename_or_obj": "volume", "space": "RAS"},
    )


def from_monai(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """A ``(x, y, z)`` array on the original grid back to ``(slices, rows, columns)``."""
    return np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0))
