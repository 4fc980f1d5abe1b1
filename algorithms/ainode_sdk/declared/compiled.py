"""Compiled inference for declared models: the network of a MONAI bundle, a TorchScript export or
an ONNX file run by OpenVINO or ONNX Runtime instead of its own framework, with the same pre- and
post-processing (only the network call changes).

Conversion and check run once, in a child process (:mod:`ainode_sdk.declared.convert`),
so the model worker never holds the original framework's activations, the export and the
candidate runtimes at once:

1. the original network (the bundle's ``network_def`` with its weights, the TorchScript module, or
   the ONNX file in ONNX Runtime) is run on a fixed input of the network's window (a seeded uniform
   batch) — once to warm up, then timed as the fastest of three calls;
2. a PyTorch network is exported to ONNX (``torch.onnx.export``, batch axis dynamic) into the cache
   directory under a name made of the weights' SHA-256, the window and torch's version;
   where the network has strided transposed convolutions or group normalizations, a second graph
   has them in the forms OpenVINO runs faster (:mod:`.rewrite`);
3. each candidate — OpenVINO in bfloat16 where the CPU computes it natively, OpenVINO in float32
   (each on the exported graph and on the rewritten one), ONNX Runtime — is compiled for the
   window batch, timed the same way and compared with the
   original: the share of voxels both give the same label (argmax over channels, or a 0.5
   threshold of one channel); below :data:`MIN_AGREEMENT` it is refused with that reason (on this
   input, a network whose outputs are near ties — e.g. one with untrained weights — loses labels
   in bfloat16 as it does on a real study, and runs in float32 instead);
4. the verdict (the chosen runtime and precision, or why none) is written beside the export as
   JSON; ``auto`` picks the fastest that agrees, or keeps the original when none is faster.

The worker then loads only the chosen runtime from the cached export (a later start reads the
verdict and converts nothing). Changed weights, another window or another release of torch,
ONNX Runtime or OpenVINO mean other file names, so a new conversion and check.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from ainode_sdk.declared.spec import ModelDeclaration

logger = logging.getLogger(__name__)

MIN_AGREEMENT = 0.999
"""Share of voxel labels a compiled network must give as the original framework does."""

CHECK_FORMAT = 2
"""Part of the names of the verdict and the rewritten graph (:mod:`.rewrite`): a check that tries
other candidates or rewrites the graph otherwise than an earlier release's (since 2: OpenVINO on
the rewritten graph) is answered by neither of that release's files."""

CHECK_TIMEOUT_S = 1800
"""The conversion and check of one model take at most this long (a large network on a slow CPU)."""


Runner = Callable[[np.ndarray], np.ndarray]
"""A compiled network: a float32 batch in, its output out."""


class Loaded(NamedTuple):
    """A network loaded by a runtime: its runner, and what gives the runtime's working memory
    back between studies (OpenVINO's ``release_memory``; nothing for ONNX Runtime, whose session
    runs without its memory arena and so keeps no working memory between runs)."""

    run: Runner
    release: Callable[[], None]


def cache_dir() -> Path:
    """Where compiled networks are kept: ``$AINODE_MODEL_CACHE`` (the node sets it to
    ``DATA_DIR/run/compiled``), else ``~/.cache/ainode/compiled``."""
    return Path(os.environ.get("AINODE_MODEL_CACHE") or Path.home() / ".cache" / "ainode" / "compiled")


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass
class Compiled:
    """A compiled network, called like the original module on a ``(batch, channels, *window)``
    tensor; batches are padded (or split) to the batch it was compiled for."""

    runtime: str
    precision: str
    run: Runner
    batch: int
    agreement: float
    seconds: float
    release: Callable[[], None] = lambda: None
    """Gives the runtime's working memory back between studies (:class:`Loaded`)."""

    def __call__(self, batch: Any) -> Any:
        import torch

        array = batch.detach().cpu().numpy().astype(np.float32, copy=False)
        n = array.shape[0]
        outs = []
        for first in range(0, n, self.batch):
            part = array[first : first + self.batch]
            if part.shape[0] < self.batch:
                pad = np.zeros((self.batch - part.shape[0], *part.shape[1:]), np.float32)
                part = np.concatenate([part, pad])
            outs.append(self.run(np.ascontiguousarray(part)))
        out = np.concatenate(outs)[:n] if len(outs) > 1 else outs[0][:n]
        return torch.from_numpy(np.ascontiguousarray(out))


def agreement(reference: np.ndarray, got: np.ndarray) -> float:
    """Share of voxels labelled alike by ``reference`` and ``got``, outputs
    ``(batch, channels, *window)``: argmax over channels, or one channel's 0.5 threshold (0 for
    logits)."""
    if reference.shape[1] > 1:
        return float((reference.argmax(axis=1) == got.argmax(axis=1)).mean())
    cut = 0.5 if reference.min() >= 0 and reference.max() <= 1 else 0.0
    return float(((reference[:, 0] > cut) == (got[:, 0] > cut)).mean())


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


def _onnxruntime(path: Path, shape: tuple[int, ...], precision: str) -> Loaded:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads()
    # working memory given back after each run (the arena would keep a study's peak for good), and
    # no spinning threads after a run: the bundle's post-processing needs those cores next
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return Loaded(lambda x: session.run(None, {name: x})[0], lambda: None)


def _openvino(path: Path, shape: tuple[int, ...], precision: str) -> Loaded:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({model.input(0).get_any_name(): list(shape)})  # a static window batch compiles faster code
    config = {"INFERENCE_NUM_THREADS": _threads(), "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    compiled = core.compile_model(model, "CPU", config)
    output = compiled.output(0)
    # a static float32 output is written straight into an array of ours (no copy out of the
    # request's own tensor, which would hold another window's output between studies)
    direct = output.get_partial_shape().is_static and output.get_element_type() == ov.Type.f32
    out_shape = tuple(output.get_shape()) if direct else ()
    held: list[Any] = []  # the infer request, made on first use and dropped by release()

    def run(x: np.ndarray) -> np.ndarray:
        if not held:
            held.append(compiled.create_infer_request())
        if not direct:
            return np.asarray(held[0].infer({0: x}, share_inputs=True)[output], dtype=np.float32)
        out = np.empty(out_shape, np.float32)
        held[0].set_output_tensor(ov.Tensor(out, shared_memory=True))
        held[0].infer({0: x}, share_inputs=True)
        return out

    def release() -> None:
        held.clear()
        compiled.release_memory()

    return Loaded(run, release)


LOADERS: dict[str, Callable[[Path, tuple[int, ...], str], Loaded]] = {
    "onnxruntime": _onnxruntime,
    "openvino": _openvino,
}


def candidates(runtime: str) -> list[tuple[str, str]]:
    """(runtime, precision) to try: OpenVINO in bfloat16 only where the CPU has it natively."""
    found: list[tuple[str, str]] = []
    if runtime in ("openvino", "auto"):
        try:
            import openvino as ov

            if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
                found.append(("openvino", "bf16"))
        except (ImportError, RuntimeError) as exc:
            logger.info("OpenVINO's CPU plugin is not usable: %s", exc)
        found.append(("openvino", "f32"))
    if runtime in ("onnxruntime", "auto"):
        found.append(("onnxruntime", "f32"))
    return found


def _versions(names: tuple[str, ...] = ("torch", "onnxruntime", "openvino")) -> str:
    """The installed releases of ``names``, for a file name (read from the packages' metadata:
    importing a runtime the worker does not use would keep its libraries in memory)."""
    parts = []
    for name in names:
        try:
            parts.append(f"{name}{importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name}-")
    return re.sub(r"[^A-Za-z0-9._-]", "_", "-".join(parts))


def framework(declaration: ModelDeclaration) -> str:
    return "ONNX Runtime" if declaration.type == "onnx" else "PyTorch"


def _why_not(verdict: dict[str, Any]) -> str:
    if "kept" in verdict:
        return str(verdict["kept"])
    reasons = [f"{e['runtime']} {e['precision']}: {e['reason']}" for e in verdict["tried"] if "reason" in e]
    return "; ".join(reasons) or "no runtime"


def compile_model(
    declaration: ModelDeclaration,
    example_shape: tuple[int, ...],
    weights_sha256: str,
    input_range: tuple[float, float] = (0.0, 1.0),
) -> tuple[Compiled | None, str]:
    """The declared model's network compiled for its ``runtime`` (``onnxruntime``, ``openvino``
    or ``auto``) on the window batch ``example_shape`` (``(batch, channels, *window)``; the check
    input uniform in ``input_range``, the network's input after pre-processing), and why;
    or ``None`` and why not (it disagrees with the original, no runtime is faster, the runtime is
    missing, or the check failed): then the caller keeps the original framework."""
    where = cache_dir()
    where.mkdir(parents=True, exist_ok=True)
    window = "x".join(str(v) for v in example_shape)
    stem = f"{weights_sha256[:32]}-{window}"
    # the export depends on torch alone; the verdict on every runtime it compared
    exported = f"{stem}-{_versions(('torch',))}" if declaration.type != "onnx" else stem
    source = declaration.weights_path() if declaration.type == "onnx" else where / f"{exported}.onnx"
    graphs = {"exported": source, "rewritten": where / f"{exported}-rewritten{CHECK_FORMAT}.onnx"}
    verdict_path = where / f"{stem}-{declaration.runtime}-{_versions()}-check{CHECK_FORMAT}.json"
    if not verdict_path.exists():
        request = {"declaration": declaration.model_dump(mode="json"), "shape": list(example_shape),
                   "runtime": declaration.runtime, "onnx": str(source), "rewritten": str(graphs["rewritten"]),
                   "verdict": str(verdict_path), "input_range": list(input_range)}  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            done = subprocess.run([sys.executable, "-m", "ainode_sdk.declared.convert"], input=json.dumps(request),
                                  capture_output=True, text=True, env=env, timeout=CHECK_TIMEOUT_S)  # fmt: skip
        except subprocess.TimeoutExpired:
            return None, f"the conversion check did not finish in {CHECK_TIMEOUT_S} s"
        if done.returncode != 0 or not verdict_path.exists():
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            return None, f"the conversion check failed (exit {done.returncode}: {tail})"
    verdict = json.loads(verdict_path.read_text())
    best = verdict.get("chosen")
    if not best:
        return None, _why_not(verdict)
    try:
        loaded = LOADERS[best["runtime"]](graphs[best.get("graph", "exported")], example_shape, best["precision"])
        loaded.run(np.zeros(example_shape, np.float32))  # the first call's warm-up, not the first study's
    except Exception as exc:  # the runtime's own untyped errors: the original framework stays
        return None, f"{best['runtime']}: not usable ({type(exc).__name__}: {str(exc)[:120]})"
    loaded.release()  # the working memory is taken again by each study and given back after its inference
    compiled = Compiled(best["runtime"], best["precision"], loaded.run, example_shape[0], best["agreement"],
                        best["seconds"], loaded.release)  # fmt: skip
    graph = f", {', '.join(verdict['rewritten'])}" if best.get("graph") == "rewritten" else ""
    why = (
        f"{best['runtime']} {best['precision']}{graph} ({best['agreement']:.4%} of labels agree; "
        f"{best['seconds']:.3f} s per window batch, {framework(declaration)} {verdict['original_s']:.3f} s)"
    )
    return compiled, why
