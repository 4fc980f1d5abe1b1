"""Compiled inference for declared models: the network of a MONAI bundle or a TorchScript export
run by ONNX Runtime or OpenVINO instead of PyTorch, with the same pre- and post-processing (only
the network call changes).

The network is exported once to ONNX (``torch.onnx.export``, the batch axis dynamic) and kept in
a cache directory under a name made of the weights' SHA-256, the runtime and the versions of torch
and the runtime: changed weights or another release mean another file. Before it is used, the
compiled network is checked against PyTorch on a fixed input of the network's window (a seeded
uniform volume): when fewer than ``min_agreement`` of the voxels' labels agree (argmax over
channels, or a 0.5 threshold of one channel), it is refused with that reason and the model runs on
PyTorch. ``auto`` tries OpenVINO and ONNX Runtime, keeps those that agree, and picks the faster
on the check input — or PyTorch, when neither is faster than it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MIN_AGREEMENT = 0.999
"""Share of voxel labels a compiled network must give as PyTorch does (argmax or threshold)."""


def cache_dir() -> Path:
    """Where compiled networks are kept: ``$AINODE_MODEL_CACHE`` (the node sets it to
    ``DATA_DIR/run/compiled``), else ``~/.cache/ainode/compiled``."""
    return Path(os.environ.get("AINODE_MODEL_CACHE") or Path.home() / ".cache" / "ainode" / "compiled")


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass
class Compiled:
    """A compiled network: called like the PyTorch module on a ``(batch, channels, ...)`` tensor."""

    runtime: str
    run: Callable[[np.ndarray], np.ndarray]
    agreement: float
    seconds: float

    def __call__(self, batch: Any) -> Any:
        import torch

        out = self.run(batch.detach().cpu().numpy().astype(np.float32, copy=False))
        return torch.from_numpy(np.ascontiguousarray(out))


def _labels(out: np.ndarray) -> np.ndarray:
    return out.argmax(axis=1) if out.shape[1] > 1 else out[:, 0] > (0.5 if out.min() >= 0 else 0.0)


def export_onnx(network: Any, example_shape: tuple[int, ...], path: Path) -> None:
    """Export ``network`` to ONNX at ``path`` (atomically), the batch axis dynamic."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with torch.no_grad():
        torch.onnx.export(network, (torch.zeros(example_shape),), str(tmp), input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          opset_version=17, dynamo=False)  # fmt: skip
    os.replace(tmp, path)


def _onnxruntime(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _openvino(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": _threads()})
    request = compiled.create_infer_request()
    return lambda x: np.asarray(request.infer({0: x})[compiled.output(0)])


LOADERS: dict[str, Callable[[Path], Callable[[np.ndarray], np.ndarray]]] = {
    "onnxruntime": _onnxruntime,
    "openvino": _openvino,
}


def _version(runtime: str) -> str:
    import torch

    module = __import__(runtime)
    text = f"torch{torch.__version__}-{runtime}{getattr(module, '__version__', '?')}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)  # a file name: OpenVINO's version holds slashes


def compile_network(
    network: Any, example_shape: tuple[int, ...], runtime: str, weights_sha256: str, where: Path | None = None
) -> tuple[Compiled | None, str]:
    """``network`` compiled for ``runtime`` (``onnxruntime``, ``openvino`` or ``auto``) and why,
    or ``None`` and why not (it disagrees with PyTorch, or the runtime is missing): then the
    caller keeps PyTorch."""
    import torch

    candidates = ["openvino", "onnxruntime"] if runtime == "auto" else [runtime]
    generator = torch.Generator().manual_seed(0)
    check = torch.rand(example_shape, generator=generator)
    with torch.no_grad():
        start = time.perf_counter()
        expected = _labels(network(check).float().cpu().numpy())
        torch_seconds = time.perf_counter() - start
    usable: list[Compiled] = []
    reasons = []
    for name in candidates:
        try:
            path = (where or cache_dir()) / f"{weights_sha256[:32]}-{_version(name)}.onnx"
            if not path.exists():
                export_onnx(network, example_shape, path)
            run = LOADERS[name](path)
            run(check.numpy())  # the first call compiles and warms up
            start = time.perf_counter()
            got = run(check.numpy())
            seconds = time.perf_counter() - start
        except Exception as exc:  # the runtimes' own untyped errors: this runtime is not usable, PyTorch stays
            reasons.append(f"{name}: not usable ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        agreement = float((_labels(got) == expected).mean())
        if agreement < MIN_AGREEMENT:
            reasons.append(f"{name}: refused, {agreement:.2%} of labels agree with PyTorch (< {MIN_AGREEMENT:.1%})")
            continue
        usable.append(Compiled(name, run, agreement, seconds))
    if not usable:
        return None, "; ".join(reasons) or "no runtime"
    best = min(usable, key=lambda c: c.seconds)
    if runtime == "auto" and best.seconds >= torch_seconds:
        return (
            None,
            f"auto: PyTorch is as fast ({torch_seconds:.3f} s per window batch; {best.runtime} {best.seconds:.3f} s)",
        )
    return best, f"{best.runtime} ({best.agreement:.4%} of labels agree, {best.seconds:.3f} s per window batch)"
