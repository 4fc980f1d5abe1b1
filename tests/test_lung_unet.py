"""Issue 24 (first part): a real trained 2D network declared by configuration — the lung U-Net of
``../shared/models/lung_unet_small`` (ONNX and TorchScript), run slice by slice in stored
orientation with MONAI's ``SliceInferer``, as ``config/lung-unet.example.yaml`` declares it."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pydicom
import pytest

from ainode_sdk.registry import Registry
from lung_ct_density import LungCtDensity
from node.jobs.volume import load_volume
from node.settings import load_settings

from .peers import AINODE, CT_MIDDLE, CT_SERIES, ROOT, series_files

pytestmark = [pytest.mark.slow]

CONFIG = ROOT / "config" / "lung-unet.example.yaml"


def _mask(result, label: str) -> np.ndarray:
    """The mask of segment ``label`` (from the label map, when the result has one)."""
    number = next(n for n, s in enumerate(result.segments, 1) if s.label == label)
    return result.label_map == number if result.label_map is not None else result.segments[number - 1].mask


def _items(ds):
    """Every content item of an SR, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def masks() -> dict[str, np.ndarray]:
    """The lung masks of the shared 64-slice chest CT: the U-Net's ONNX export and the union of
    lung-ct-density's left and right lungs on all of it, the TorchScript export on its middle 32
    slices (a 2D model: each slice's mask is the slice's alone)."""
    cwd = os.getcwd()
    os.chdir(ROOT)  # the declarations name the model files relative to the checkout
    try:
        settings = load_settings(CONFIG)
    finally:
        os.chdir(cwd)
    registry = Registry(models=settings.models)
    files = series_files(CT_SERIES)
    volume, _slices = load_volume([pydicom.dcmread(p) for p in files])
    middle, _slices = load_volume([pydicom.dcmread(p) for p in files[CT_MIDDLE]])
    found = {"lung-unet": _mask(registry.get("lung-unet").run(volume, "cpu"), "Lung"),
             "lung-unet-ts": _mask(registry.get("lung-unet-ts").run(middle, "cpu"), "Lung")}  # fmt: skip
    density = LungCtDensity().run(volume, "cpu")
    found["lung-ct-density"] = np.logical_or(_mask(density, "Left lung"), _mask(density, "Right lung"))
    found["voxel_ml"] = np.array(float(np.prod(volume.spacing_mm)) / 1000)
    return found


def test_the_lung_unet_agrees_with_lung_ct_density(masks):
    dice = _dice(masks["lung-unet"], masks["lung-ct-density"])
    print(f"lung U-Net (ONNX) vs lung-ct-density left + right: Dice {dice:.4f}")
    assert dice >= 0.95


def test_the_onnx_and_torchscript_exports_agree(masks):
    same = float((masks["lung-unet"][CT_MIDDLE] == masks["lung-unet-ts"]).mean())
    print(f"ONNX vs TorchScript masks: {same * 100:.4f} % of voxels identical")
    assert same >= 0.9999


def test_algorithms_check_passes_and_the_sr_volume_is_the_seg_voxel_count(tmp_path, masks):
    out = tmp_path / "out"
    env = {**os.environ, "AINODE_KEY": "unused"}
    done = subprocess.run([AINODE, "algorithms", "check", "lung-unet", str(CT_SERIES), "--out", str(out),
                           "--config", str(CONFIG)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0 and "lung-unet: PASS" in done.stdout, done.stdout + done.stderr
    (seg_path,) = out.glob("SEG_*.dcm")
    (sr_path,) = out.glob("SR_*.dcm")
    seg = pydicom.dcmread(seg_path)
    voxels = int(np.count_nonzero(seg.pixel_array))
    volumes = [
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in _items(pydicom.dcmread(sr_path))
        if "MeasuredValueSequence" in item and item.ConceptNameCodeSequence[0].CodeMeaning == "Volume"
    ]  # fmt: skip
    assert volumes, "the SR reports the lung volume"
    assert volumes[0] == pytest.approx(voxels * float(masks["voxel_ml"]), rel=1e-4)
    assert voxels == int(masks["lung-unet"].sum())
