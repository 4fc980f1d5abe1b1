"""The conversion and check of a declared model's network (:mod:`.compiled`), run once in a child
process so the model worker never holds the original framework's activations, the export and the
candidate runtimes at once: ``python -m ainode_sdk.declared.convert`` reads the request as JSON
on its standard input and writes the verdict where the request says.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ainode_sdk.declared.compiled import LOADERS, MIN_AGREEMENT, Runner, agreement, candidates, export_onnx, framework
from ainode_sdk.declared.rewrite import rewrite_graph
from ainode_sdk.declared.spec import ModelDeclaration

TIMED_CALLS = 3
"""Calls timed per runtime after the warm-up; the fastest counts. One call on a shared 2-core
machine was off by up to 30 %: ``auto`` kept PyTorch for the wholeBody network (1.779 s a window
batch, the fastest candidate 2.290 s in its one call), where OpenVINO float32 takes 1.80 s and
PyTorch 2.22 s as the fastest of several (``BENCHMARKS.md``, issue 26)."""


def _timed(call: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    """``call()``'s output and its fastest time of :data:`TIMED_CALLS`, after one warm-up call
    (the first call compiles)."""
    call()
    seconds = []
    for _ in range(TIMED_CALLS):
        start = time.perf_counter()
        out = call()
        seconds.append(time.perf_counter() - start)
    return out, min(seconds)


def _original(declaration: ModelDeclaration) -> tuple[Any, Runner]:
    """The declared network as its own framework runs it: (the module to export or ``None`` for
    ONNX, a function of a float32 batch)."""
    if declaration.type == "onnx":
        return None, LOADERS["onnxruntime"](declaration.weights_path(), (), "f32").run
    import torch

    if declaration.type == "torchscript":
        network = torch.jit.load(str(declaration.weights_path()), map_location="cpu").eval()
    else:
        from ainode_sdk.declared.bundle import load_bundle_network

        network = load_bundle_network(declaration)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.asarray(network(torch.from_numpy(x)).float().numpy())

    return network, run


def check(request: dict[str, Any]) -> dict[str, Any]:
    """The conversion and check (the child process's work): the verdict written to
    ``request["verdict"]`` and returned."""
    declaration = ModelDeclaration.model_validate(request["declaration"])
    shape = tuple(int(v) for v in request["shape"])
    network, original = _original(declaration)
    low, high = request.get("input_range", (0.0, 1.0))
    sample = (low + (high - low) * np.random.default_rng(0).random(shape, dtype=np.float32)).astype(np.float32)
    expected, original_s = _timed(lambda: original(sample))
    source = Path(request["onnx"])
    if network is not None and not source.exists():
        export_onnx(network, shape, source)
    del network
    verdict: dict[str, Any] = {"original_s": original_s, "tried": []}
    graphs = {"exported": source}
    runtimes = candidates(request["runtime"])
    # the rewrites are for OpenVINO's CPU plugin; ONNX Runtime runs the exported graph faster
    # (spleen: 0.54 against 0.64 s a window batch)
    if any(name == "openvino" for name, _ in runtimes):
        rewritten = Path(request["rewritten"])
        try:
            verdict["rewritten"] = rewrite_graph(source, rewritten, shape)
            if verdict["rewritten"]:
                graphs["rewritten"] = rewritten
        except Exception as exc:  # ONNX's own untyped errors: the exported graph alone is tried
            verdict["rewritten"] = [f"not rewritten ({type(exc).__name__}: {str(exc)[:120]})"]
    tries = [(name, precision, graph) for name, precision in runtimes
             for graph in graphs if graph == "exported" or name == "openvino"]  # fmt: skip
    for name, precision, graph in tries:
        entry: dict[str, Any] = {"runtime": name, "precision": precision}
        if graph != "exported":
            entry["graph"] = graph
        try:
            candidate = LOADERS[name](graphs[graph], shape, precision).run
            got, entry["seconds"] = _timed(partial(candidate, sample))
            del candidate  # one candidate's compiled network in memory at a time
        except Exception as exc:  # the runtimes' own untyped errors: this candidate is not usable
            entry["reason"] = f"not usable ({type(exc).__name__}: {str(exc)[:120]})"
            verdict["tried"].append(entry)
            continue
        entry["agreement"] = agreement(expected, got)
        if entry["agreement"] < MIN_AGREEMENT:
            entry["reason"] = (
                f"refused, {entry['agreement']:.2%} of labels agree with {framework(declaration)} "
                f"(< {MIN_AGREEMENT:.1%})"
            )
        verdict["tried"].append(entry)
    usable = [e for e in verdict["tried"] if "reason" not in e]
    best = min(usable, key=lambda e: e["seconds"]) if usable else None
    if best is not None and request["runtime"] == "auto" and best["seconds"] >= original_s:
        verdict["kept"] = (
            f"auto: {framework(declaration)} is as fast ({original_s:.3f} s per window batch; "
            f"{best['runtime']} {best['seconds']:.3f} s)"
        )
        best = None
    verdict["chosen"] = best
    path = Path(request["verdict"])
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(verdict, indent=1))
    os.replace(tmp, path)
    return verdict


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    check(json.loads(sys.stdin.read()))
