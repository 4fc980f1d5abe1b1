"""Resources: the node's memory while it receives and analyses, under load and over many studies.

Two scenarios against one ``ainode serve`` (encrypted store, folder destination, lung route):

- ``concurrent``: N DCMTK ``storescu`` processes (default 8) at once, each sending the chest CT as
  a distinct study; every instance must be acknowledged and every study delivered (issue 5).
- ``consecutive``: M studies (default 20) of S slices (default 64; ``--slices 500`` for the
  500-slice target) sent one after the other, each waited for until its results are written;
  the node's resident set after each study shows whether memory grows with the studies processed.

RSS is sampled every 0.1 s: the node process alone (its VmHWM too) and the node with its children
(the forkserver and the algorithm's process). Prints a table; writes ``bench/results/resources.json``.

Usage: ``python bench/resources.py [--senders 8] [--studies 20] [--slices 64]``
"""

from __future__ import annotations

import argparse
import base64
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import status_mb, write_report  # noqa: E402
from tests.peers import (  # noqa: E402
    CT_SERIES,
    folder_node_config,
    make_studies,
    make_tall_series,
    series_files,
    start_node_process,
    start_storescu,
    storescu,
    wait_until,
)


def _rss_mb(pid: int) -> float:
    """Resident set size now (MB); 0 when the process is gone."""
    return status_mb(pid, "VmRSS") or 0.0


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Sampler(threading.Thread):
    """Samples the RSS of a process and of its process tree until stopped."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.peak_node_mb = self.peak_tree_mb = 0.0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            node = _rss_mb(self.pid)
            tree = node + sum(_rss_mb(p) for p in _descendants(self.pid))
            self.peak_node_mb, self.peak_tree_mb = max(self.peak_node_mb, node), max(self.peak_tree_mb, tree)

    def reset(self) -> None:
        self.peak_node_mb = self.peak_tree_mb = 0.0


def _start(work: Path):  # type: ignore[no-untyped-def]
    work.mkdir(parents=True, exist_ok=True)
    config_path, config, results = folder_node_config(work)
    key = {"AINODE_TEST_KEY": base64.b64encode(secrets.token_bytes(32)).decode()}
    node = start_node_process(config_path, config, key, work / "node.log")
    assert node.proc is not None
    sampler = Sampler(node.proc.pid)
    sampler.start()
    return node, results, sampler


def _delivered(results: Path) -> int:
    return len(list(results.rglob("*.dcm"))) // 2 if results.exists() else 0


def concurrent(work: Path, senders: int) -> dict[str, float]:
    """N storescu processes at once, distinct studies; all must be acknowledged and delivered."""
    studies = make_studies(CT_SERIES, senders, work / "studies")
    node, results, sampler = _start(work / "node")
    try:
        start = time.perf_counter()
        procs = [start_storescu(node.port, files) for files in studies]
        for proc in procs:
            proc.communicate(timeout=600)
        failed = sum(proc.returncode != 0 for proc in procs)
        received_s = time.perf_counter() - start
        wait_until(lambda: _delivered(results) == senders, 1800, 0.5)
        assert node.proc is not None
        return {
            "senders": senders,
            "instances": sum(len(s) for s in studies),
            "senders_failed": failed,
            "all_received_s": received_s,
            "all_delivered_s": time.perf_counter() - start,
            "peak_node_rss_mb": sampler.peak_node_mb,
            "node_vmhwm_mb": status_mb(node.proc.pid, "VmHWM"),
            "peak_tree_rss_mb": sampler.peak_tree_mb,
        }
    finally:
        sampler.stopped.set()
        node.stop()


def consecutive(work: Path, studies: int, slices: int) -> dict[str, object]:
    """M studies one after the other; the node's RSS after each."""
    node, results, sampler = _start(work / "node")
    per_study = []
    try:
        for n in range(studies):
            folder = work / "study"
            shutil.rmtree(folder, ignore_errors=True)
            files = series_files(CT_SERIES) if slices == 64 and n == 0 else make_tall_series(
                CT_SERIES, slices, folder, tag=f"resources-{n}"
            )  # fmt: skip
            sampler.reset()
            start = time.perf_counter()
            sent = storescu(node.port, files)
            assert sent.returncode == 0, sent.stderr[-2000:]
            wait_until(lambda n=n: _delivered(results) == n + 1, 900, 0.2)
            per_study.append({
                "seconds": time.perf_counter() - start,
                "peak_node_rss_mb": sampler.peak_node_mb,
                "peak_tree_rss_mb": sampler.peak_tree_mb,
                "node_rss_after_mb": _rss_mb(node.proc.pid),  # type: ignore[union-attr]
            })  # fmt: skip
            print(f"study {n + 1}/{studies}: " + ", ".join(f"{k} {v:.0f}" for k, v in per_study[-1].items()),
                  file=sys.stderr)  # fmt: skip
        after = [s["node_rss_after_mb"] for s in per_study]
        return {
            "studies": studies,
            "slices": slices,
            "peak_node_rss_mb": max(s["peak_node_rss_mb"] for s in per_study),
            "peak_tree_rss_mb": max(s["peak_tree_rss_mb"] for s in per_study),
            "node_rss_after_first_mb": after[0],
            "node_rss_after_last_mb": after[-1],
            "growth_after_second_mb": after[-1] - after[min(1, len(after) - 1)],
            "per_study": per_study,
        }
    finally:
        sampler.stopped.set()
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senders", type=int, default=8, help="concurrent storescu senders (0: skip)")
    parser.add_argument("--studies", type=int, default=20, help="consecutive studies (0: skip)")
    parser.add_argument("--slices", type=int, default=64, help="slices per consecutive study")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "resources.json")
    args = parser.parse_args()
    report: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="ainode-resources-") as tmp:
        if args.senders:
            report["concurrent"] = figures = concurrent(Path(tmp) / "concurrent", args.senders)
            print(f"\n{args.senders} concurrent senders ({figures['instances']} instances):")
            for k, v in figures.items():
                print(f"  {k:<22}{v:>10.1f}")
        if args.studies:
            report["consecutive"] = seq = consecutive(Path(tmp) / "consecutive", args.studies, args.slices)
            print(f"\n{args.studies} consecutive {args.slices}-slice studies:")
            for k, v in seq.items():
                if k != "per_study":
                    print(f"  {k:<26}{v:>10.1f}")  # type: ignore[str-format]
    write_report(args.out, "resources", **report)


if __name__ == "__main__":
    main()
