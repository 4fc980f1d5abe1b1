"""Misbehaving algorithm plugins, for the isolation tests (loaded by entry point in the child)."""

from __future__ import annotations

import os
import time
from typing import Any

from algorithms.base import AlgorithmResult, AlgorithmSpec, NoParams, Resources, SeriesRequirements, Volume

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
