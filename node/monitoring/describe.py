"""What a model saw and what it said, as a job's monitoring record holds them (no PHI).

The input is described by the acquisition attributes that drift with scanners and protocols
(manufacturer, model name, convolution kernel, slice thickness, pixel spacing, kVp, contrast
agent, number of slices), read from the de-identified header; the output by each segment's
volume and intensity statistics inside it, the algorithm's own measurements and its qualitative
findings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from pydicom.multival import MultiValue

from ainode_sdk.base import AlgorithmResult, Volume

MAX_TEXT = 64
"""Characters kept of a text descriptor (a kernel or model name is short; a long value is cut)."""
MAX_SAMPLES = 2_000_000
"""Voxels of a segment its percentiles are estimated from (an even subsample of larger ones)."""
PERCENTILES = (5, 50, 95)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or value == "":
        return ""
    text = "\\".join(str(v) for v in value) if isinstance(value, MultiValue | list | tuple) else str(value)
    return re.sub(r"[^\x20-\x7e]", "", text)[:MAX_TEXT]


def _number(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    try:
        values = [float(v) for v in value] if isinstance(value, MultiValue | list | tuple) else [float(value)]
    except (TypeError, ValueError):
        return None
    return round(float(np.mean(values)), 4) if values else None


def describe_inputs(headers: Sequence[Dataset]) -> dict[str, Any]:
    """The descriptors of a series (its de-identified headers, one per instance).

    Returns
    -------
    dict
        ``manufacturer``, ``model_name``, ``kernel``, ``contrast`` (``"yes"``/``"no"``: Contrast/Bolus
        Agent present) as text; ``slice_thickness_mm``, ``pixel_spacing_mm`` (mean of row and
        column spacing), ``kvp`` (``None`` when absent) and ``slices`` as numbers.
    """
    first = headers[0]
    return {
        "manufacturer": _text(first, "Manufacturer"),
        "model_name": _text(first, "ManufacturerModelName"),
        "kernel": _text(first, "ConvolutionKernel"),
        "contrast": "yes" if _text(first, "ContrastBolusAgent") else "no",
        "slice_thickness_mm": _number(first, "SliceThickness"),
        "pixel_spacing_mm": _number(first, "PixelSpacing"),
        "kvp": _number(first, "KVP"),
        "slices": len(headers),
    }


class MaskSlabs(Protocol):
    """A segment's mask read a slab of slices at a time, never whole
    (:class:`node.jobs.isolation.PackedMask`: bit-packed as the algorithm's process sent it)."""

    @property
    def shape(self) -> tuple[int, ...]:
        """``(slices, rows, columns)``."""
        ...

    def count(self) -> int:
        """How many voxels the mask holds."""
        ...

    def slab(self, first: int, stop: int) -> npt.NDArray[np.bool_]:
        """``mask[first:stop]`` as ``bool``."""
        ...


def _sample(
    voxels: npt.NDArray[np.float32], mask: npt.NDArray[np.bool_] | MaskSlabs
) -> tuple[int, npt.NDArray[np.float32]]:
    """How many voxels ``mask`` holds, and every ``n``-th of their values in C order (``n`` the
    count over :data:`MAX_SAMPLES`, plus one): ``voxels[mask][::n]``, gathered a slab of slices at
    a time so the masked values are never all copied out at once."""
    if isinstance(mask, np.ndarray):
        size, slab = int(np.count_nonzero(mask)), lambda first, stop: mask[first:stop]
    else:
        size, slab = mask.count(), mask.slab
    step, taken, parts = size // MAX_SAMPLES + 1, 0, []
    for first in range(0, mask.shape[0], 16):
        values = voxels[first : first + 16][slab(first, first + 16)]
        parts.append(values[(-taken) % step :: step])
        taken += values.size
    return size, np.concatenate(parts) if parts else np.empty(0, np.float32)


def describe_outputs(
    result: AlgorithmResult, volume: Volume, masks: Iterable[npt.NDArray[np.bool_] | MaskSlabs] | None = None
) -> dict[str, Any]:
    """Summaries of an algorithm's result on ``volume``; the segments' masks are ``masks`` when
    given (arrays, or masks read a slab at a time: :func:`node.jobs.isolation.packed_masks`),
    else their own.

    Returns
    -------
    dict
        ``segments``: label -> ``voxels``, ``volume_ml`` and the mean and 5th/50th/95th
        percentiles of the voxel values inside it (HU for CT); ``measurements``:
        ``"label / concept (derivation)"`` -> value in its unit; ``findings``: label -> coded value
        meaning.
    """
    segments: dict[str, dict[str, float]] = {}
    voxels = volume.voxels
    given = iter(masks) if masks is not None else None
    for number, segment in enumerate(result.segments, 1):
        if result.label_map is not None:  # a declared model's labels: the masks are not needed
            mask = result.label_map == number
        else:
            mask = segment.mask if given is None else next(given)
        size, sample = _sample(voxels, mask)
        stats: dict[str, float] = {"voxels": size, "volume_ml": round(size * volume.voxel_volume_ml, 3)}
        if size:
            stats["mean"] = round(float(sample.mean()), 2)
            for q, v in zip(PERCENTILES, np.percentile(sample, PERCENTILES), strict=True):
                stats[f"p{q:02d}"] = round(float(v), 2)
        segments[segment.label] = stats
        del mask, sample  # one mask at a time: this one is gone before the next is read
    measurements = {}
    for m in result.measurements:
        name = f"{m.segment_label} / {m.concept[2]}" + (f" ({m.derivation[2]})" if m.derivation else "")
        measurements[name] = float(m.value)
    findings = {f.label: f.value[2] for f in result.findings}
    return {"segments": segments, "measurements": measurements, "findings": findings}
