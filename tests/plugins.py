"""Misbehaving algorithm plugins, for the isolation tests (loaded by entry point in the child)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ainode_sdk.base import (
    AlgorithmResult,
    AlgorithmSpec,
    Finding,
    Location,
    NoParams,
    Resources,
    SeriesRequirements,
    Volume,
)

_SPEC = dict(description="test plugin", accepts=SeriesRequirements(("CT",)), outputs=("SEG",), resources=Resources(0.1))


class Raises:
    spec = AlgorithmSpec(name="raises", version="0", **_SPEC)  # type: ignore[arg-type]
    Params = NoParams

    def run(self, volume: Volume, device: str, params: Any = None) -> AlgorithmResult:
        raise ValueError("the model file is corrupt")


class Crashes:
    spec = AlgorithmSpec(name="crashes", version="0", **_SPEC)  # type: ignore[arg-type]
    Params = NoParams

    def run(self, volume: Volume, device: str, params: Any = None) -> AlgorithmResult:
        os._exit(137)  # what the kernel's OOM killer leaves behind


class Hangs:
    spec = AlgorithmSpec(name="hangs", version="0", **_SPEC)  # type: ignore[arg-type]
    Params = NoParams

    def run(self, volume: Volume, device: str, params: Any = None) -> AlgorithmResult:
        time.sleep(3600)
        raise AssertionError("unreachable")


class Finds:
    """An SR-only plugin: a located nodule (point), a box around it, and an unlocated finding."""

    spec = AlgorithmSpec(name="finds", version="0", description="test plugin", accepts=SeriesRequirements(("CT",)),
                         outputs=("SR",), resources=Resources(0.1))  # fmt: skip
    Params = NoParams

    def run(self, volume: Volume, device: str, params: Any = None) -> AlgorithmResult:
        slices, rows, columns = volume.voxels.shape
        centre = volume.index_to_lps(np.array([[slices // 2, rows // 3, columns // 4]]))[0]
        corner = volume.index_to_lps(np.array([[slices // 2, rows // 3 + 20, columns // 4 + 30]]))[0]
        nodule, present = ("27925004", "SCT", "Nodule"), ("52101004", "SCT", "Present")
        return AlgorithmResult(
            segments=[], measurements=[],
            findings=[
                Finding("Nodule 1", nodule, present, probability=0.87, location=Location("point", (tuple(centre),))),
                Finding("Nodule 1 extent", nodule, present, location=Location("box", (tuple(centre), tuple(corner)))),
                Finding("Emphysema", ("87433001", "SCT", "Pulmonary emphysema"), ("2667000", "SCT", "Absent"),
                        probability=0.1),
            ],
        )  # fmt: skip


class BranchyNet:
    """A 3D network whose forward pass branches on its input in Python: an ONNX export (a trace)
    keeps only the branch the export's example took, so the export disagrees with PyTorch on other
    inputs — the conversion the node must refuse (issue 26). Built by MONAI's config parser as a
    bundle's ``network_def``."""

    def __new__(cls) -> Any:
        import torch

        class _Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                y = self.conv(x)
                return y if float(x.mean()) > 0.25 else -y

        return _Net()
