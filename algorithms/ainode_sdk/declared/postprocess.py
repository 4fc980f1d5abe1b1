"""A model's post-processing (MONAI transforms, the bundle's own or the declared ones) run as
MONAI runs it, with one change of memory layout that leaves every value as it is.

PyTorch's CPU ``argmax`` over the first dimension of a contiguous ``(channels, x, y, z)`` tensor
with few channels does not vectorise along the voxels: for a two-channel 512 x 512 x 64 output it
takes 3.2 s on this project's 2-core machine, and 0.2 s when the channels are stored innermost
(``bench/models.py``, spleen bundle, 2026-12-06). The tensor that enters an ``AsDiscreted`` with
``argmax`` is therefore copied channels-innermost first (same shape, same values, other strides);
the labels are identical, ties included (``torch.argmax`` returns the first maximal channel
whatever the layout). Above :data:`CHANNELS_LAST_MAX` channels the copy costs more than it saves.
"""

from __future__ import annotations

from typing import Any

CHANNELS_LAST_MAX = 16
"""Channels up to which the argmax input is stored channels-innermost first."""


def _argmax_at(transforms: list[Any]) -> int | None:
    from monai.transforms import AsDiscreted

    for number, transform in enumerate(transforms):
        if isinstance(transform, AsDiscreted) and any(transform.argmax):
            return number
    return None


def channels_innermost(tensor: Any) -> Any:
    """``tensor`` ``(channels, *spatial)`` with the same shape and values (and MONAI metadata),
    stored with the channels innermost; a GPU tensor, one of more than :data:`CHANNELS_LAST_MAX`
    channels or one already so stored is returned as it is."""
    import torch

    if not isinstance(tensor, torch.Tensor) or tensor.ndim < 2 or tensor.device.type != "cpu":
        return tensor
    if tensor.shape[0] > CHANNELS_LAST_MAX or tensor.stride(0) == 1:
        return tensor
    return tensor.movedim(0, -1).contiguous().movedim(-1, 0)


def run_postprocessing(compose: Any, data: dict[str, Any]) -> dict[str, Any]:
    """``compose(data)`` (a MONAI ``Compose`` of dictionary transforms), the input of its first
    ``AsDiscreted`` with ``argmax`` stored channels-innermost (:func:`channels_innermost`).

    Raises
    ------
    Exception
        Whatever the transforms raise (MONAI's own errors), as ``compose(data)`` would.
    """
    at = _argmax_at(list(getattr(compose, "transforms", ())))
    if at is None:
        return dict(compose(data))
    if at > 0:
        data = compose(data, end=at)
    argmax = compose.transforms[at]
    for key, wanted in zip(argmax.keys, argmax.argmax, strict=False):
        if wanted and key in data:
            data[key] = channels_innermost(data[key])
    return dict(compose(data, start=at))
