"""``lung-ct-density``: left/right lung segmentation and quantitative lung density on chest CT.

Measured per lung and for both lungs together:

- lung volume (ml);
- mean lung density (HU);
- %LAA-950: percent of lung voxels at or below -950 HU;
- Perc15: the HU value at the 15th percentile of the lung density histogram.

Statistics run in torch on the requested device (``cuda`` when the node has a GPU); morphology and
connected components run on the host (SciPy, cc3d), in two threads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from ainode_sdk.base import (
    AlgorithmResult,
    AlgorithmSpec,
    Code,
    Device,
    Measurement,
    Resources,
    Segment,
    SeriesRequirements,
    Volume,
    check_accepts,
)
from ainode_sdk.codes import ANATOMICAL_STRUCTURE, ATTENUATION, HU, MEAN, ML, PERCENT, VOLUME
from lung_ct_density.segment import segment_lungs

if TYPE_CHECKING:
    import torch

__all__ = ["LAA_THRESHOLD_HU", "LungCtDensity"]

LAA_THRESHOLD_HU = -950.0
MAX_SLICE_THICKNESS_MM = 5.0
MIN_SLICES = 20

MORPHOLOGICALLY_ABNORMAL: Code = ("49755003", "SCT", "Morphologically Altered Structure")
LEFT_LUNG: Code = ("44029006", "SCT", "Left lung")
RIGHT_LUNG: Code = ("3341006", "SCT", "Right lung")
LUNGS: Code = ("39607008", "SCT", "Lung")
CT_CHEST: Code = ("24627-2", "LN", "CT Chest")


def low_attenuation_area(threshold_hu: float) -> Code:
    """Segment type of the low attenuation area at ``threshold_hu`` (private code: none standard)."""
    return (f"LAA{-threshold_hu:g}", "99AINODE", f"Low attenuation area at or below {threshold_hu:g} HU")


def laa_percent(threshold_hu: float) -> Code:
    """Concept of %LAA at ``threshold_hu`` (e.g. %LAA-950)."""
    return (f"LAA{-threshold_hu:g}PCT", "99AINODE", f"Percent lung volume at or below {threshold_hu:g} HU")


PERC15: Code = ("PERC15", "99AINODE", "15th percentile of lung density")


def _density_measures(
    hu: torch.Tensor, mask: npt.NDArray[np.bool_], voxel_ml: float, device: torch.device, laa_hu: float
) -> tuple[float, float, float, float]:
    """Volume (ml), mean density (HU), %LAA (at ``laa_hu``) and Perc15 (HU) of the voxels under ``mask``.

    On the CPU the voxels are gathered and the percentile found by NumPy (a boolean gather and a
    partition, about ten times torch's on this host); the figures are the same: the same voxels in
    the same order, and the k-th smallest value is one value however it is found.
    """
    import torch

    on_cpu = device.type == "cpu"
    values = torch.from_numpy(hu.numpy()[mask]) if on_cpu else hu[torch.from_numpy(mask).to(device)]
    n = values.numel()
    volume_ml = n * voxel_ml
    mean_hu = float(values.mean())
    laa = float((values <= laa_hu).sum()) * 100.0 / n
    # Lower 15th percentile (nearest rank); torch.quantile is limited to 2**24 elements.
    rank = max(1, int(np.ceil(0.15 * n)))
    if on_cpu:
        perc15 = float(np.partition(values.numpy(), rank - 1)[rank - 1])
    else:
        perc15 = float(torch.kthvalue(values, rank).values)
    return volume_ml, mean_hu, laa, perc15


class LungCtDensityParams(BaseModel):
    """What a route may tune (HU thresholds, minimum lung size)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    air_threshold_hu: Annotated[float, Field(ge=-700, le=-200)] = -320.0
    laa_threshold_hu: Annotated[float, Field(ge=-1000, le=-850)] = LAA_THRESHOLD_HU
    min_lung_ml: Annotated[float, Field(gt=0, le=2000)] = 200.0


CHANGE_IN_VOLUME = ("99LCD001", "99AINODE", "Change in volume since prior")
CHANGE_IN_LAA = ("99LCD002", "99AINODE", "Change in %LAA-950 since prior")
INTERVAL = ("99LCD003", "99AINODE", "Interval since prior study")
DAYS = ("d", "UCUM", "day")


def _lungs_and_figures(
    volume: Volume, p: LungCtDensityParams, device: Device
) -> tuple[Any, npt.NDArray[np.bool_], dict[str, tuple[float, float, float, float]]]:
    """The lungs of ``volume``, both lungs' mask and, per lung and both, (volume ml, mean HU,
    %LAA, Perc15 HU)."""
    lungs = segment_lungs(volume, air_threshold_hu=p.air_threshold_hu, min_lung_ml=p.min_lung_ml)
    import torch  # here, not at import: the node process loads plugins to check parameters only

    torch_device = torch.device(device)
    hu = torch.from_numpy(volume.voxels).to(torch_device)
    both = lungs.left | lungs.right
    figures = {}
    for label, mask in (("Left lung", lungs.left), ("Right lung", lungs.right), ("Both lungs", both)):
        figures[label] = _density_measures(hu, mask, volume.voxel_volume_ml, torch_device, p.laa_threshold_hu)
    return lungs, both, figures


class LungCtDensity:
    """The ``lung-ct-density`` plugin (see the module docstring)."""

    Params = LungCtDensityParams

    spec = AlgorithmSpec(
        name="lung-ct-density",
        version="1.0.0",
        description="Left/right lung segmentation; volume, mean density, %LAA-950, Perc15",
        accepts=SeriesRequirements(
            modalities=("CT",), min_slices=MIN_SLICES, max_slice_thickness_mm=MAX_SLICE_THICKNESS_MM
        ),
        outputs=("SEG", "SR"),
        resources=Resources(memory_gib=1.5, gpu="optional"),
        procedure=CT_CHEST,
    )

    def run(self, volume: Volume, device: Device, params: Any = None) -> AlgorithmResult:
        """Segment the lungs of ``volume`` and measure their density.

        Parameters
        ----------
        volume
            Chest CT in HU, ``(slices, rows, columns)``, at most 5 mm slices, at least 20 slices.
        device
            ``"cuda"`` or ``"cpu"``: where the density statistics run.
        params
            :class:`LungCtDensityParams`, or ``None`` for the defaults (-320 HU air threshold,
            %LAA at -950 HU, lungs of at least 200 ml).

        Returns
        -------
        AlgorithmResult
            Segments "Left lung", "Right lung" and "Low attenuation area" (masks of the volume's
            shape) and, per lung and for both lungs, volume (ml), mean density (HU), %LAA-950 (%)
            and Perc15 (HU); with a prior (``volume.priors``), also the change since it of the
            volume (ml) and of %LAA-950 (percentage points) and the interval (days).

        Raises
        ------
        ainode_sdk.errors.SeriesRefused
            Not CT, slices thicker than 5 mm or spaced wider than 5 mm, fewer than 20 slices, or no
            lungs found.
        """
        check_accepts(self.spec, volume)
        p = params if isinstance(params, LungCtDensityParams) else LungCtDensityParams()
        lungs, both, figures = _lungs_and_figures(volume, p, device)
        measurements: list[Measurement] = []
        for label, (vol, mean, laa, perc15) in figures.items():
            measurements += [
                Measurement(label, VOLUME, round(vol, 1), ML),
                Measurement(label, ATTENUATION, round(mean, 1), HU, derivation=MEAN),
                Measurement(label, laa_percent(p.laa_threshold_hu), round(laa, 2), PERCENT),
                Measurement(label, PERC15, round(perc15, 1), HU),
            ]
        if volume.priors:  # the change since the most recent prior, each study measured the same way
            prior = volume.priors[0]
            check_accepts(self.spec, prior.volume)
            _prior_lungs, _prior_both, before = _lungs_and_figures(prior.volume, p, device)
            for label in figures:
                now, then = figures[label], before[label]
                measurements += [
                    Measurement(label, CHANGE_IN_VOLUME, round(round(now[0], 1) - round(then[0], 1), 1), ML),
                    Measurement(label, CHANGE_IN_LAA, round(round(now[2], 2) - round(then[2], 2), 2), PERCENT),
                    Measurement(label, INTERVAL, round(prior.interval_days), DAYS),
                ]
        laa_mask = np.less_equal(volume.voxels, p.laa_threshold_hu)
        laa_mask &= both
        segments = [
            Segment("Left lung", lungs.left, ANATOMICAL_STRUCTURE, LEFT_LUNG),
            Segment("Right lung", lungs.right, ANATOMICAL_STRUCTURE, RIGHT_LUNG),
            Segment(
                "Low attenuation area", laa_mask, MORPHOLOGICALLY_ABNORMAL, low_attenuation_area(p.laa_threshold_hu)
            ),
        ]
        return AlgorithmResult(
            segments=segments,
            measurements=measurements,
            group_sites={"Both lungs": LUNGS},
            group_members={"Both lungs": ("Left lung", "Right lung")},
            parameters={"laa_threshold_hu": f"{p.laa_threshold_hu:g}", "air_threshold_hu": f"{p.air_threshold_hu:g}"},
        )
