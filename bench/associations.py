"""One-instance associations: what a receiver spends per association, and where pynetdicom's goes.

A sender that opens one association per instance is bound by what the receiver spends on each
association, not on each byte. Per receiver — Orthanc, ainode's Storage SCP storing nothing
(``scp-only``, :mod:`bench.null_scp`) and ainode — interleaved runs of ``--associations``
one-instance associations of DCMTK ``storescu`` (a process each, as ``bench/ingest.py`` sends
them): associations per second, and the CPU time (user + system) the receiver's processes spent per
association (the process listening on the port and its children, read before the first and 0.3 s
after the last association; one association before that is not counted). Then ``scp-only`` again
with the acceptance of the A-ASSOCIATE-RQ timed step by step (``null_scp.py --phases``): how
many times each step ran and its median milliseconds (pynetdicom's decoding and encoding run for
the first association only, later ones copy what it remembered: :mod:`node.network.acceptance`).

Prints a table and writes ``bench/results/associations.json``.

Usage: ``python bench/associations.py [--runs 3] [--associations 40]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest import RECEIVERS, scp_only, send  # noqa: E402
from bench.null_scp import ACCEPTANCE_STEPS  # noqa: E402
from bench.report import write_report  # noqa: E402
from tests.peers import CT_SERIES, series_files  # noqa: E402

NAMES = ("orthanc", "scp-only", "ainode")


def listening_pid(port: int) -> int:
    """The process listening on ``port`` (TCP)."""
    for connection in psutil.net_connections("tcp"):
        listening = connection.status == psutil.CONN_LISTEN and connection.laddr
        if listening and connection.laddr.port == port and connection.pid is not None:
            return connection.pid
    raise RuntimeError(f"nothing listens on port {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its children (those alive now)."""
    total = 0.0
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def measure(name: str, files: list[Path]) -> dict[str, float]:
    """Associations per second and the receiver's CPU milliseconds per association."""
    with tempfile.TemporaryDirectory(prefix=f"ainode-assoc-{name}-") as tmp:
        port, called, stop = RECEIVERS[name](Path(tmp))
        try:
            pid = listening_pid(port)
            send(port, called, files[:1])  # the first association's one-off costs are not counted
            time.sleep(0.3)
            cpu, start = cpu_seconds(pid), time.perf_counter()
            for path in files:
                send(port, called, [path])
            seconds = time.perf_counter() - start
            time.sleep(0.3)  # the last association's end is the receiver's work too
            spent = cpu_seconds(pid) - cpu
        finally:
            stop()
    return {"associations_per_s": len(files) / seconds, "cpu_ms_per_association": spent / len(files) * 1e3}


def acceptance_steps(files: list[Path]) -> dict[str, dict[str, float]]:
    """Each step of the acceptance over ``len(files)`` one-instance associations (the first a
    request not seen before): how many times it ran and its median milliseconds per run."""
    with tempfile.TemporaryDirectory(prefix="ainode-assoc-phases-") as tmp:
        out = Path(tmp) / "phases.json"
        port, called, stop = scp_only(Path(tmp), phases=out)
        try:
            for path in files:
                send(port, called, [path])
        finally:
            stop()
        steps: dict[str, list[float]] = json.loads(out.read_text())
    return {
        step: {"calls": len(steps.get(step, [])), "median_ms": statistics.median(steps.get(step, [0.0])) * 1e3}
        for step in ACCEPTANCE_STEPS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--associations", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "associations.json")
    args = parser.parse_args()
    files = series_files(CT_SERIES)[: args.associations]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in NAMES}
    for run in range(args.runs):
        shift = run % len(NAMES)  # each run in another order
        for name in NAMES[shift:] + NAMES[:shift]:
            runs[name].append(measure(name, files))
            figures = runs[name][-1]
            print(f"run {run + 1}: {name} {figures['associations_per_s']:.1f}/s, "
                  f"{figures['cpu_ms_per_association']:.1f} ms CPU", file=sys.stderr)  # fmt: skip
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    steps = acceptance_steps(files)
    print(f"\n{len(files)} one-instance associations (storescu, CT); medians of {args.runs} interleaved runs")
    print(f"{'receiver':<10}{'associations/s':>16}{'CPU ms/association':>22}")
    for name, m in medians.items():
        print(f"{name:<10}{m['associations_per_s']:>16.1f}{m['cpu_ms_per_association']:>22.1f}")
    print(f"the acceptance of an A-ASSOCIATE-RQ (scp-only) over {len(files)} associations: calls, median ms")
    for step, figures in steps.items():
        print(f"  {step:<30}{figures['calls']:>6}{figures['median_ms']:>8.2f}")
    write_report(args.out, "associations", associations=len(files), median=medians, runs=runs,
                 acceptance=steps)  # fmt: skip


if __name__ == "__main__":
    main()
