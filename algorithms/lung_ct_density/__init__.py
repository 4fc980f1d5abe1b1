"""``lung-ct-density``: left/right lung segmentation and quantitative lung density on chest CT.

Measured per lung and for both lungs together:

- lung volume (ml);
- mean lung density (HU);
- %LAA-950: percent of lung voxels at or below -950 HU;
- Perc15: the HU value at the 15th percentile of the lung density histogram.

Statistics run in torch on the requested device (``cuda`` when the node has a GPU); morphology and
connected components run in SciPy on the host.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from algorithms.base import (
    AlgorithmResult,
    AlgorithmSpec,
    Code,
    Device,
    Measurement,
    Resources,
    Segment,
    SeriesRequirements,
    Volume,
)
from algorithms.lung_ct_density.segment import segment_lungs
from algorithms.registry import check_accepts

__all__ = ["LAA_THRESHOLD_HU", "LungCtDensity"]

LAA_THRESHOLD_HU = -950.0
MAX_SLICE_THICKNESS_MM = 5.0
MIN_SLICES = 20

ANATOMICAL_STRUCTURE: Code = ("123037004", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL: Code = ("49755003", "SCT", "Morphologically Altered Structure")
LEFT_LUNG: Code = ("44029006", "SCT", "Left lung")
RIGHT_LUNG: Code = ("3341006", "SCT", "Right lung")
LUNGS: Code = ("39607008", "SCT", "Lung")
LOW_ATTENUATION_AREA: Code = ("LAA950", "99AINODE", "Low attenuation area at or below -950 HU")

VOLUME: Code = ("118565006", "SCT", "Volume")
ATTENUATION: Code = ("112031", "DCM", "Attenuation Coefficient")
MEAN: Code = ("373098007", "SCT", "Mean")
LAA_PERCENT: Code = ("LAA950PCT", "99AINODE", "Percent lung volume at or below -950 HU")
PERC15: Code = ("PERC15", "99AINODE", "15th percentile of lung density")

ML: Code = ("ml", "UCUM", "milliliter")
HU: Code = ("[hnsf'U]", "UCUM", "Hounsfield unit")
PERCENT: Code = ("%", "UCUM", "percent")


def _density_measures(
    hu: torch.Tensor, mask: npt.NDArray[np.bool_], voxel_ml: float, device: torch.device
) -> tuple[float, float, float, float]:
    """Volume (ml), mean density (HU), %LAA-950 and Perc15 (HU) of the voxels under ``mask``."""
    values = hu[torch.from_numpy(mask).to(device)]
    n = values.numel()
    volume_ml = n * voxel_ml
    mean_hu = float(values.mean())
    laa = float((values <= LAA_THRESHOLD_HU).sum()) * 100.0 / n
    # Lower 15th percentile (nearest rank); torch.quantile is limited to 2**24 elements.
    perc15 = float(torch.kthvalue(values, max(1, int(np.ceil(0.15 * n)))).values)
    return volume_ml, mean_hu, laa, perc15


class LungCtDensity:
    """The ``lung-ct-density`` plugin (see the module docstring)."""

    spec = AlgorithmSpec(
        name="lung-ct-density",
        version="1.0.0",
        description="Left/right lung segmentation; volume, mean density, %LAA-950, Perc15",
        accepts=SeriesRequirements(
            modalities=("CT",), min_slices=MIN_SLICES, max_slice_thickness_mm=MAX_SLICE_THICKNESS_MM
        ),
        outputs=("SEG", "SR"),
        resources=Resources(memory_gib=1.5, gpu="optional"),
    )

    def run(self, volume: Volume, device: Device) -> AlgorithmResult:
        """Segment the lungs of ``volume`` and measure their density.

        Parameters
        ----------
        volume
            Chest CT in HU, ``(slices, rows, columns)``, at most 5 mm slices, at least 20 slices.
        device
            ``"cuda"`` or ``"cpu"``: where the density statistics run.

        Returns
        -------
        AlgorithmResult
            Segments "Left lung", "Right lung" and "Low attenuation area" (masks of the volume's
            shape) and, per lung and for both lungs, volume (ml), mean density (HU), %LAA-950 (%)
            and Perc15 (HU).

        Raises
        ------
        node.errors.SeriesRefused
            Not CT, slices thicker than 5 mm or spaced wider than 5 mm, fewer than 20 slices, or no
            lungs found.
        """
        check_accepts(self.spec, volume)
        lungs = segment_lungs(volume)
        torch_device = torch.device(device)
        hu = torch.from_numpy(volume.voxels).to(torch_device)
        both = lungs.left | lungs.right
        laa_mask = both & (volume.voxels <= LAA_THRESHOLD_HU)
        measurements: list[Measurement] = []
        for label, mask in (("Left lung", lungs.left), ("Right lung", lungs.right), ("Both lungs", both)):
            vol, mean, laa, perc15 = _density_measures(hu, mask, volume.voxel_volume_ml, torch_device)
            measurements += [
                Measurement(label, VOLUME, round(vol, 1), ML),
                Measurement(label, ATTENUATION, round(mean, 1), HU, derivation=MEAN),
                Measurement(label, LAA_PERCENT, round(laa, 2), PERCENT),
                Measurement(label, PERC15, round(perc15, 1), HU),
            ]
        segments = [
            Segment("Left lung", lungs.left, ANATOMICAL_STRUCTURE, LEFT_LUNG),
            Segment("Right lung", lungs.right, ANATOMICAL_STRUCTURE, RIGHT_LUNG),
            Segment("Low attenuation area", laa_mask, MORPHOLOGICALLY_ABNORMAL, LOW_ATTENUATION_AREA),
        ]
        return AlgorithmResult(
            segments=segments,
            measurements=measurements,
            parameters={"laa_threshold_hu": str(LAA_THRESHOLD_HU), "air_threshold_hu": "-320"},
        )
