"""Seeded copies of the shared MONAI Model Zoo bundles (their trained weights cannot be downloaded
here) and exports of their networks, for the model tests and ``bench/models.py``. No pytest here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .peers import ROOT

BUNDLES = ROOT.parent / "shared" / "monai_bundles"
SPLEEN = BUNDLES / "spleen_ct_segmentation"
WHOLE_BODY = BUNDLES / "wholeBody_ct_segmentation"
SNOMED_MAPPING = BUNDLES / "totalsegmentator_snomed_mapping.csv"
LOWRES = {"displayable_configs#highres": False}


def _network(bundle: Path, overrides: dict[str, Any]) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    for key, value in overrides.items():
        parser[key] = value
    return parser.get_parsed_content("network_def")


def seeded_bundle(
    source: Path,
    dest: Path,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    favour: tuple[int, ...] = (),
    favour_by: float = 4.0,
) -> Path:
    """A copy of the bundle ``source`` (configs and metadata as published) under ``dest``, with its
    ``network_def`` built with ``seed`` and saved as the weights file its configuration names.

    ``favour`` lists output channels whose final-layer bias is raised by ``favour_by``, so that
    those labels (and few others) occur in the seeded network's argmax: a random network is
    otherwise indecisive."""
    import torch

    overrides = overrides or {}
    target = dest / source.name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("models", "eval", "*.ts"))
    (target / "models").mkdir()
    torch.manual_seed(seed)
    network = _network(source, overrides)
    if favour:
        final = [m for m in network.modules() if isinstance(m, torch.nn.Conv3d)][-1]
        with torch.no_grad():
            final.bias[list(favour)] += favour_by
    config = json.loads((source / "configs" / "inference.json").read_text())
    name = "model.pt"
    if "modelname" in config and overrides.get("displayable_configs#highres", True) is False:
        name = "model_lowres.pt"
    torch.save(network.state_dict(), target / "models" / name)
    return target


def export_torchscript(bundle: Path, out: Path, overrides: dict[str, Any] | None = None) -> Path:
    """The bundle's network with its saved weights as TorchScript (traced)."""
    import torch

    network = _load(bundle, overrides or {})
    traced = torch.jit.trace(network, torch.zeros(1, 1, 96, 96, 96))
    traced.save(str(out))
    return out


def export_onnx(bundle: Path, out: Path, overrides: dict[str, Any] | None = None) -> Path:
    """The bundle's network with its saved weights as ONNX (batch and spatial axes dynamic)."""
    import torch

    network = _load(bundle, overrides or {})
    axes = {0: "batch", 2: "x", 3: "y", 4: "z"}
    torch.onnx.export(
        network, (torch.zeros(1, 1, 96, 96, 96),), str(out), input_names=["image"], output_names=["pred"],
        dynamic_axes={"image": axes, "pred": axes}, dynamo=False, opset_version=17,
    )  # fmt: skip
    return out


def _load(bundle: Path, overrides: dict[str, Any]) -> Any:
    import torch

    network = _network(bundle, overrides)
    weights = next((bundle / "models").glob("*.pt"))
    network.load_state_dict(torch.load(weights, weights_only=True))
    return network.eval()


def spleen_declaration(bundle: Path, **extra: Any) -> dict[str, Any]:
    """The YAML declaration of the seeded spleen bundle."""
    return {
        "type": "monai_bundle",
        "path": str(bundle),
        "labels": {1: {"label": "Spleen", "type": ["78961009", "SCT", "Spleen"], "colour": [157, 108, 162]}},
        "measurements": ["volume", "mean", "p50"],
        "accepts": {"modalities": ["CT"], "min_slices": 20},
        "resources": {"memory_gib": 4, "gpu_memory_gib": 2, "gpu": "optional"},
        **extra,
    }


SPLEEN_PREPROCESSING = {
    "spacing_mm": [1.5, 1.5, 2.0], "orientation": "RAS", "window_min": -57, "window_max": 164,
    "roi_size": [96, 96, 96], "overlap": 0.5, "sw_batch_size": 4,
}  # fmt: skip
"""The spleen bundle's pre-processing and inferer, declared for its TorchScript and ONNX exports."""


def monai_reference(bundle: Path, volume: Any, workdir: Path, overrides: dict[str, Any] | None = None) -> Any:
    """Labels ``(slices, rows, columns)`` from MONAI's own bundle runner (``monai.bundle.run``, the
    bundle's evaluator, loader and writer) on ``volume`` written as NIfTI in its RAS geometry."""
    import nibabel as nib
    import numpy as np
    from monai.bundle import run

    from ainode_sdk.declared.geometry import from_monai, ras_affine

    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "volume.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(volume.voxels.transpose(2, 1, 0)), ras_affine(volume)), image)
    out = workdir / "out"
    settings = {"device": "$torch.device('cpu')", "dataloader#num_workers": 0, **(overrides or {})}
    run(
        run_id="run", init_id="initialize", config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"), bundle_root=str(bundle), datalist=[str(image)],
        output_dir=str(out), **settings,
    )  # fmt: skip
    (written,) = out.rglob("*.nii.gz")
    return from_monai(np.rint(np.asarray(nib.load(written).dataobj)).astype(np.int32))
