"""End-to-end turnaround of the CT study: Orthanc forwards it, ainode returns SEG + SR to Orthanc.

Prints a table and writes ``bench/results/e2e.json``. Each run starts a fresh Orthanc and a fresh
node (empty data directory) on loopback ports. Figures per run:

- ``ingest_s`` / ``ingest_mb_s``: Orthanc's C-STORE of the study to ainode (encrypted, fsync'd);
- ``end_to_end_s``: last instance received -> results accepted by Orthanc, quiet period excluded
  (the scheduler wakes when the quiet period ends);
- the job's stages: de-identify, load volume, algorithm, build SEG/SR, send;
- ``peak_rss_mb``: the node process's peak resident set (VmHWM).

With ``--slices N`` (N > 64) the study is a taller series built from the chest CT by repeating its
slices along the slice normal with consistent geometry (``tests.peers.make_tall_series``).

Usage: ``python bench/e2e.py [--runs 3] [--quiet-period 1.0] [--slices 64]``
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import status_mb, write_report  # noqa: E402
from node.storage.index import Index, JobState  # noqa: E402
from tests.peers import (  # noqa: E402
    CT_SERIES,
    LUNG_ROUTE,
    free_port,
    make_tall_series,
    node_config,
    series_files,
    start_node_process,
    start_orthanc,
    wait_until,
)

STAGES = ("deidentify_s", "load_volume_s", "algorithm_s", "build_results_s", "send_s")


def one_run(work: Path, quiet_period_s: float, files: list[Path]) -> dict[str, float]:
    """One fresh Orthanc + node; returns the figures of that run."""
    size_mb = sum(f.stat().st_size for f in files) / 1e6
    node_port = free_port()
    pacs = start_orthanc(work / "orthanc", "AINODE", node_port)
    node = None
    try:
        config_path, config = node_config(
            work,
            port=node_port,
            peers=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}],
            destinations={"pacs": {"type": "dicom", "peer": "PACS"}},
            routes=[{**LUNG_ROUTE, "destinations": ["pacs"], "completion": {"quiet_period_s": quiet_period_s}}],
        )
        key = {"AINODE_TEST_KEY": base64.b64encode(secrets.token_bytes(32)).decode()}
        node = start_node_process(config_path, config, key, work / "node.log")
        node.wait_warm()  # a running node's turnaround: its start-up warm-up is not the study's
        for f in files:
            pacs.rest("POST", "/instances", raw=f.read_bytes())
        (study_id,) = pacs.rest("GET", "/studies")
        start = time.perf_counter()
        pacs.rest("POST", "/modalities/ainode/store", {"Resources": [study_id], "Synchronous": True})
        ingest_s = time.perf_counter() - start
        index = Index.for_data_dir(node.data_dir)
        job = wait_until(lambda: next(iter(index.jobs(state=JobState.DELIVERED)), None), 300, 0.1)
        modalities = {s["MainDicomTags"]["Modality"] for s in pacs.rest("GET", f"/studies/{study_id}/series")}
        assert {"SEG", "SR"} <= modalities, modalities
        study = index.study(job.study_key)
        assert study is not None
        timings = json.loads(job.timings)
        figures = {
            "instances": len(files),
            "study_mb": round(size_mb, 1),
            "ingest_s": ingest_s,
            "ingest_mb_s": size_mb / ingest_s,
            "end_to_end_s": timings["delivered_at"] - study.last_received_at - quiet_period_s,
            **{k: timings[k] for k in STAGES},
            "peak_rss_mb": status_mb(node.proc.pid, "VmHWM"),  # type: ignore[union-attr]
        }
        index.engine.dispose()
        return figures
    finally:
        if node is not None:
            node.stop()
        pacs.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quiet-period", type=float, default=1.0)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--out", type=Path, help="default: bench/results/e2e.json, e2e-<slices>.json if not 64")
    args = parser.parse_args()
    runs = []
    series = tempfile.TemporaryDirectory(prefix="ainode-bench-series-")
    files = series_files(CT_SERIES)
    if args.slices != 64:
        files = make_tall_series(CT_SERIES, args.slices, Path(series.name))
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="ainode-bench-") as tmp:
            runs.append(one_run(Path(tmp), args.quiet_period, files))
        print(f"run {i + 1}/{args.runs}: end-to-end {runs[-1]['end_to_end_s']:.2f} s", file=sys.stderr)
    keys = [k for k in runs[0] if k not in ("instances", "study_mb")]
    medians = {k: statistics.median(r[k] for r in runs) for k in keys}
    print(f"\nCT {runs[0]['instances']} instances, {runs[0]['study_mb']} MB; median of {args.runs} run(s)")
    print(f"{'figure':<18}{'median':>10}   runs")
    for k in keys:
        print(f"{k:<18}{medians[k]:>10.2f}   " + " ".join(f"{r[k]:.2f}" for r in runs))
    series.cleanup()
    name = "e2e.json" if args.slices == 64 else f"e2e-{args.slices}.json"
    write_report(
        args.out or ROOT / "bench" / "results" / name,
        "e2e",
        series=str(CT_SERIES.relative_to(CT_SERIES.parents[2])),
        slices=args.slices,
        quiet_period_s=args.quiet_period,
        median=medians,
        runs=runs,
    )


if __name__ == "__main__":
    main()
