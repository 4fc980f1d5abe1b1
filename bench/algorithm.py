"""lung-ct-density alone: seconds and peak memory on 64-, 255- and 500-slice chest CT volumes.

The 64-slice volume is the shared chest CT; the taller ones repeat its slices along the slice
normal with consistent geometry (``tests.peers.make_tall_series``). Each (size, device, run) is a
fresh Python process that decodes the series, builds the HU volume and runs the algorithm
in-process, so its peak RSS (VmHWM) is the algorithm's plus the volume's. Runs on ``cpu`` and,
when torch sees one, on ``cuda`` (peak GPU memory from torch). Prints a table and writes
``bench/results/algorithm.json``.

Usage: ``python bench/algorithm.py [--sizes 64 255 500] [--runs 3]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import status_mb, write_report  # noqa: E402


def one(folder: Path, device: str) -> dict[str, float]:
    """Run once in this process (the child side); returns the figures."""
    import pydicom
    import torch

    from lung_ct_density import LungCtDensity, LungCtDensityParams
    from node.jobs.volume import load_volume
    from tests.peers import series_files

    start = time.perf_counter()
    volume, _ = load_volume([pydicom.dcmread(f) for f in series_files(folder)])
    load_s = time.perf_counter() - start
    rss_before = status_mb("self", "VmRSS")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = LungCtDensity().run(volume, device, LungCtDensityParams())
    seconds = time.perf_counter() - start
    figures = {
        "slices": volume.voxels.shape[0],
        "load_volume_s": load_s,
        "algorithm_s": seconds,
        "volume_mb": volume.voxels.nbytes / 2**20,
        "rss_before_mb": rss_before,
        "peak_rss_mb": status_mb("self", "VmHWM"),
        "segments": len(result.segments),
    }
    if device == "cuda":
        figures["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 255, 500])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("FOLDER", "DEVICE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "algorithm.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(Path(args.one[0]), args.one[1])))
        return

    import torch

    from tests.peers import CT_SERIES, make_tall_series

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table: dict[str, dict[str, dict[str, float]]] = {}
    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="ainode-algorithm-") as tmp:
        for size in args.sizes:
            folder = CT_SERIES if size == 64 else Path(tmp) / str(size)
            if size != 64:
                make_tall_series(CT_SERIES, size, folder)
            for device in devices:
                key = f"{size}/{device}"
                runs[key] = []
                for _ in range(args.runs):
                    out = subprocess.run(
                        [sys.executable, __file__, "--one", str(folder), device],
                        capture_output=True, text=True, check=True,
                    )  # fmt: skip
                    runs[key].append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(f"{key}: {runs[key][-1]['algorithm_s']:.2f} s", file=sys.stderr)
                table.setdefault(str(size), {})[device] = {
                    k: statistics.median(r[k] for r in runs[key]) for k in runs[key][0]
                }
    print(f"\nlung-ct-density, median of {args.runs} run(s), each in a fresh process")
    print(f"{'slices':>6} {'device':>6} {'algorithm s':>12} {'load s':>8} {'volume MB':>10} {'peak RSS MB':>12}")
    for size, by_device in table.items():
        for device, m in by_device.items():
            print(
                f"{size:>6} {device:>6} {m['algorithm_s']:>12.2f} {m['load_volume_s']:>8.2f} "
                f"{m['volume_mb']:>10.0f} {m['peak_rss_mb']:>12.0f}"
            )
    write_report(args.out, "algorithm", devices=devices, median=table, runs=runs)


if __name__ == "__main__":
    main()
