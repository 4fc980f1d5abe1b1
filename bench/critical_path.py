"""The floor of a study's turnaround on this CPU: the job's steps that must run one after another,
run back to back in one warm process with none of the node around them.

For lung-ct-density on the shared chest CT (64 slices, or ``--slices N`` made taller from it), each
repeat times, in this process after one warm-up round:

- ``algorithm_s``: ``LungCtDensity.run`` on the volume (no child process, no shared memory);
- ``seg_s`` / ``sr_s``: ``node.results.build_results`` of the SEG alone and of the SR alone;
- ``encode_s``: both objects encoded (``node.dicomio.encode``, as the store receives them);
- ``send_s``: both sent to a running Orthanc on one association (``node.network.scu``).

``floor_s`` is ``algorithm_s + seg_s + sr_s + encode_s + send_s``; ``floor_parallel_s`` counts
only the longer of the SEG and SR builds, as if the two ran at once on the second core at no
cost. Left out, so both floors are lower than any node could reach: de-identification, loading the
volume, re-identification, the store's encryption and ``fdatasync``, the database, and starting the
algorithm's process. ``bench/e2e.py`` measures the node doing all of it.

Prints a table and writes ``bench/results/critical_path.json`` (``critical_path-<N>.json``).

Usage: ``python bench/critical_path.py [--slices 64] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from ainode_sdk.base import Volume  # noqa: E402
from bench.objects import lung_series  # noqa: E402
from bench.report import write_report  # noqa: E402
from lung_ct_density import LungCtDensity  # noqa: E402
from node.dicomio import decode, encode  # noqa: E402
from node.network.scu import send_datasets  # noqa: E402
from node.results import build_results  # noqa: E402
from tests.peers import free_port, start_orthanc  # noqa: E402

STEPS = ("algorithm_s", "seg_s", "sr_s", "encode_s", "send_s")


def one_round(sources: list[pydicom.Dataset], volume: Volume, port: int) -> dict[str, float]:
    """The steps once, in order; returns their seconds."""
    algorithm = LungCtDensity()
    t: dict[str, float] = {}
    start = time.perf_counter()
    result = algorithm.run(volume, "cpu")
    t["algorithm_s"] = time.perf_counter() - start
    built = []
    for kind in ("SEG", "SR"):
        start = time.perf_counter()
        built += build_results(sources, result, algorithm.spec, lambda k: pydicom.uid.generate_uid(), "AINODE", (kind,))
        t[f"{kind.lower()}_s"] = time.perf_counter() - start
    start = time.perf_counter()
    encoded = [encode(ds) for ds in built]
    t["encode_s"] = time.perf_counter() - start
    objects = [decode(b) for b in encoded]  # as delivery reads them from the store (not timed)
    start = time.perf_counter()
    outcome = send_datasets(objects, "127.0.0.1", port, calling_ae_title="AINODE", called_ae_title="PACS")
    t["send_s"] = time.perf_counter() - start
    if outcome.reasons:
        raise SystemExit(f"Orthanc refused the results: {outcome.reasons}")
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ainode-bench-") as tmp:
        volume, sources = lung_series(args.slices, Path(tmp))
        pacs = start_orthanc(Path(tmp) / "orthanc", "AINODE", free_port())
        try:
            one_round(sources, volume, pacs.dicom_port)  # warm-up: imports, highdicom's tables, caches
            runs = [one_round(sources, volume, pacs.dicom_port) for _ in range(args.repeats)]
        finally:
            pacs.stop()
    for r in runs:
        r["floor_s"] = sum(r[k] for k in STEPS)
        r["floor_parallel_s"] = r["floor_s"] - min(r["seg_s"], r["sr_s"])
    keys = [*STEPS, "floor_s", "floor_parallel_s"]
    medians = {k: statistics.median(r[k] for r in runs) for k in keys}
    print(f"\nlung-ct-density, {len(sources)} slices, one warm process; median of {args.repeats}")
    print(f"{'step':<18}{'median':>8}   runs")
    for k in keys:
        print(f"{k:<18}{medians[k]:>8.3f}   " + " ".join(f"{r[k]:.3f}" for r in runs))
    name = "critical_path.json" if args.slices == 64 else f"critical_path-{args.slices}.json"
    write_report(args.out or ROOT / "bench" / "results" / name, "critical_path", slices=len(sources),
                 median=medians, runs=runs)  # fmt: skip


if __name__ == "__main__":
    main()
