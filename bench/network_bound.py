"""The floor under a bundle network's CPU inference on the shared chest CT: its arithmetic against
this CPU's measured matrix-multiply peak, in float32 and bfloat16, and what reduced precision does
to its labels.

Per bundle network (seeded as the tests seed it: the spleen UNet, the wholeBody low-resolution
SegResNet), in this process:

- GFLOP per window batch (PyTorch's ``FlopCounterMode``) and the window batches the study needs
  (MONAI's sliding-window grid on the bundle's own pre-processed volume);
- seconds per window batch — PyTorch float32, OpenVINO float32, OpenVINO bfloat16 where the CPU
  has it — and the GFLOP/s each reaches; the share of labels (argmax over channels, as the
  conversion check counts) each keeps of PyTorch float32's on the check's seeded input;
- this CPU's peak: a 4096 x 4096 matrix multiply in float32 and bfloat16 (PyTorch, every core).

``floor_f32_s`` is the study's network arithmetic at the float32 peak: no float32 runtime can
take less. Issue 26 asks for inference ≤ 0.4x MONAI's own: compare it with ``monai_inference_s``
(``bench/results/models.json`` of the same window, when present). Prints a table and writes
``bench/results/network_bound.json``.

Usage: ``python bench/network_bound.py [--models spleen wholebody]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.models import _setup  # noqa: E402
from bench.report import write_report  # noqa: E402


def _seconds(call: Callable[[], Any], repeats: int = 2) -> tuple[Any, float]:
    out = call()  # compiles, warms up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        best = min(best, time.perf_counter() - start)
    return out, best


def peak_gflops() -> dict[str, float]:
    """This CPU's matrix-multiply GFLOP/s in float32 and, where the CPU has it natively (as
    OpenVINO's CPU plugin reports, the conversion check's own test), bfloat16 (PyTorch, 4096 x
    4096). Without it, PyTorch emulates bfloat16 at a small fraction of float32's speed: no floor."""
    import torch

    from ainode_sdk.declared.compiled import candidates

    precisions = [("f32", torch.float32)]
    if ("openvino", "bf16") in candidates("openvino"):
        precisions.append(("bf16", torch.bfloat16))
    found = {}
    for name, dtype in precisions:
        a, b = torch.rand(4096, 4096).to(dtype), torch.rand(4096, 4096).to(dtype)
        _out, seconds = _seconds(lambda a=a, b=b: a @ b, 3)
        found[name] = 2 * 4096**3 / seconds / 1e9
    return found


def one(model: str, work: Path) -> dict[str, Any]:
    import pydicom
    import torch
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval
    from monai.utils import ensure_tuple_rep
    from torch.utils.flop_counter import FlopCounterMode

    from ainode_sdk.declared.bundle import bundle_parser, load_bundle_network
    from ainode_sdk.declared.compiled import LOADERS, agreement, candidates, export_onnx
    from ainode_sdk.declared.geometry import to_metatensor
    from ainode_sdk.declared.spec import ModelDeclaration
    from node.jobs.volume import load_volume
    from tests.peers import CT_SERIES, series_files

    _bundle, declaration, _overrides = _setup(model, work)
    parsed = ModelDeclaration.model_validate(declaration)
    parser = bundle_parser(parsed, "cpu")
    network = load_bundle_network(parsed, parser)
    inferer = parser.get_parsed_content("inferer")
    volume, _slices = load_volume([pydicom.dcmread(p) for p in series_files(CT_SERIES)])
    image = parser.get_parsed_content("preprocessing")({"image": to_metatensor(volume)})["image"]
    roi = tuple(int(v) for v in inferer.roi_size)
    padded = [max(int(s), r) for s, r in zip(image.shape[1:], roi, strict=True)]
    overlap = ensure_tuple_rep(inferer.overlap, len(roi))
    grid = dense_patch_slices(padded, roi, _get_scan_interval(padded, roi, len(roi), overlap))
    batch = int(inferer.sw_batch_size)
    shape = (batch, 1, *roi)
    sample = np.random.default_rng(0).random(shape, dtype=np.float32)  # the conversion check's input
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(torch.from_numpy(sample))
    gflop = counter.get_total_flops() / 1e9
    with torch.no_grad():
        expected, torch_s = _seconds(lambda: network(torch.from_numpy(sample)).numpy())
    row: dict[str, Any] = {
        "model": model, "gflop_per_batch": gflop, "window": list(roi), "batch": batch,
        "windows": len(grid), "batches": -(-len(grid) // batch),
        "runtimes": {"torch f32": {"seconds": torch_s, "gflops": gflop / torch_s, "agreement": 1.0}},
    }  # fmt: skip
    onnx = work / f"{model}.onnx"
    export_onnx(network, shape, onnx)
    for name, precision in candidates("openvino"):
        run = LOADERS[name](onnx, shape, precision).run
        got, seconds = _seconds(lambda run=run: run(sample))
        row["runtimes"][f"{name} {precision}"] = {
            "seconds": seconds,
            "gflops": gflop / seconds,
            "agreement": agreement(expected, got),
        }
        del run
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["spleen", "wholebody"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "network_bound.json")
    args = parser.parse_args()
    peak = peak_gflops()
    bf16 = f"{peak['bf16']:.0f} GFLOP/s" if "bf16" in peak else "not native to this CPU (not measured)"
    print(f"matrix-multiply peak: float32 {peak['f32']:.0f} GFLOP/s, bfloat16 {bf16}", flush=True)
    monai: dict[str, float] = {}
    models_json = ROOT / "bench" / "results" / "models.json"
    if models_json.exists():
        for r in json.loads(models_json.read_text()).get("rows", []):
            if r.get("runner") == "monai" and r.get("device") == "cpu":
                monai[r["model"]] = float(r["inference_s"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            row = one(model, Path(tmp))
            row["floor_f32_s"] = row["batches"] * row["gflop_per_batch"] / peak["f32"]
            if "bf16" in peak:
                row["floor_bf16_s"] = row["batches"] * row["gflop_per_batch"] / peak["bf16"]
            if model in monai:
                row["monai_inference_s"] = monai[model]
                row["floor_f32_vs_monai"] = row["floor_f32_s"] / monai[model]
            rows.append(row)
            print(f"\n{model}: {row['gflop_per_batch']:.1f} GFLOP per batch of {row['batch']} x {row['window']}, "
                  f"{row['windows']} windows in {row['batches']} batches")  # fmt: skip
            for name, r in row["runtimes"].items():
                print(f"  {name:<16}{r['seconds']:8.3f} s/batch {r['gflops']:8.0f} GFLOP/s  "
                      f"labels as PyTorch f32 {r['agreement']:.4%}")  # fmt: skip
            line = f"  study's network floor: f32 {row['floor_f32_s']:.2f} s"
            if "floor_bf16_s" in row:
                line += f", bf16 {row['floor_bf16_s']:.2f} s"
            if "floor_f32_vs_monai" in row:
                line += f"; MONAI {row['monai_inference_s']:.2f} s (f32 floor {row['floor_f32_vs_monai']:.2f}x)"
            print(line, flush=True)
    write_report(args.out, "network_bound", peak_gflops=peak, rows=rows)


if __name__ == "__main__":
    main()
