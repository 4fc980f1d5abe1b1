"""Scaled out (issue 14): studies per hour with 1 and 2 ``ainode worker`` processes, and the job
ledger's claim latency under 8 concurrent claimers, on PostgreSQL + RabbitMQ.

- ``throughput``: for W in (1, 2) workers, a fresh node (``node.executor: celery``), PostgreSQL
  database and Orthanc; ``--studies`` copies of the 64-slice chest CT (distinct UIDs) sent at once
  by as many concurrent storescu senders; the figure is studies / (last result delivered - first
  instance sent), per hour, quiet period (1 s) included.
- ``claims``: 8 processes claim and release ``--jobs`` pending jobs (each claimed once) through
  :meth:`node.storage.index.Index.claim_job`; p50/p99 of one claim (a conditional UPDATE, the claim
  record and the commit), and claims per second overall.

Prints a table and writes ``bench/results/scaleout.json``. Needs PostgreSQL on 127.0.0.1:5432
(trust) and RabbitMQ on 127.0.0.1:5672 (guest/guest).

Usage: ``python bench/scaleout.py [--studies 8] [--jobs 2000]``
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_report  # noqa: E402
from node.storage.index import Index, InstanceRow, JobState, PlannedJob  # noqa: E402
from tests.fleet import broker_available, delivered, fresh_database, scaled_out  # noqa: E402
from tests.peers import CT_SERIES, make_studies, start_storescu, wait_until  # noqa: E402


def throughput(workers: int, studies: int) -> dict[str, float]:
    """Studies per hour with ``workers`` workers (see the module docstring)."""
    key = {"AINODE_TEST_KEY": base64.b64encode(secrets.token_bytes(32)).decode()}
    route = {"name": "lung", "match": {"Modality": "CT"}, "algorithms": ["lung-ct-density"],
             "completion": {"quiet_period_s": 1.0}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ainode-bench-scaleout-") as tmp, fresh_database("ainode_bench") as url:
        work = Path(tmp)
        fleet, pacs = scaled_out(work, url, key, lease_s=60.0, routes=[route])
        try:
            fleet.node()
            for n in range(workers):
                fleet.worker(f"worker-{n}")
            wait_until(lambda: "consuming" in "".join(fleet.log(f"worker-{n}") for n in range(workers)) or None, 120)
            time.sleep(3)  # every worker connected to the broker
            files = make_studies(CT_SERIES, studies, work / "studies")
            port = int(fleet.config["node"]["port"])
            start = time.time()
            senders = [start_storescu(port, f) for f in files]
            for sender in senders:
                sender.communicate(timeout=600)
                assert sender.returncode == 0
            wait_until(lambda: delivered(fleet, studies) or None, 3600, 0.5)
            jobs = fleet.index.jobs()
            finished = max(json.loads(j.timings)["delivered_at"] for j in jobs)
            elapsed = finished - start
            stages = {
                k: statistics.median(json.loads(j.timings)[k] for j in jobs)
                for k in ("deidentify_s", "algorithm_s", "build_results_s", "send_s")
            }
            figures = {"workers": workers, "studies": studies, "elapsed_s": elapsed,
                       "studies_per_hour": studies / elapsed * 3600}  # fmt: skip
            return figures | {f"median_{k}": v for k, v in stages.items()}
        finally:
            fleet.stop()
            pacs.stop()


def _claimer(url: str, ids: list[int], worker: str, out: str) -> None:
    index = Index(url)
    latencies, mine = [], 0
    for job_id in ids:
        start = time.perf_counter()
        job = index.claim_job(job_id, worker, lease_s=60.0)
        latencies.append(time.perf_counter() - start)
        if job is not None:
            mine += 1
            index.update_held_job(job_id, worker, "released", state=JobState.DELIVERED)
    Path(out).write_text(json.dumps({"latencies": latencies, "claimed": mine}))


def claims(jobs: int, claimers: int = 8) -> dict[str, float]:
    """Claim latency with ``claimers`` processes competing for ``jobs`` jobs (each claimed once)."""
    with tempfile.TemporaryDirectory(prefix="ainode-bench-claims-") as tmp, fresh_database("ainode_bench") as url:
        index = Index(url)
        index.add_instance(InstanceRow(
            object_id="o", sop_key="k", study_key="study", series_key="s", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax_uid="1.2.840.10008.1.2", size=1, received_at=1.0,
        ), "PACS")  # fmt: skip
        ids = index.plan_study("study", 1, [PlannedJob("r", "lung-ct-density", f"s{n}") for n in range(jobs)], None)
        assert ids is not None
        context = multiprocessing.get_context("spawn")
        outs = [Path(tmp) / f"claimer-{n}.json" for n in range(claimers)]
        procs = [
            context.Process(target=_claimer, args=(url, ids[n:] + ids[:n], f"bench-{n}", str(out)))
            for n, out in enumerate(outs)
        ]  # every claimer walks all jobs, starting at a different one: they compete for each
        start = time.perf_counter()
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        elapsed = time.perf_counter() - start
        results = [json.loads(out.read_text()) for out in outs]
        latencies = sorted(x for r in results for x in r["latencies"])
        claimed = sum(r["claimed"] for r in results)
        assert claimed == jobs == len(index.claims())  # each job claimed exactly once
        index.engine.dispose()
        return {
            "claimers": claimers, "jobs": jobs, "attempts": len(latencies),
            "claim_p50_ms": latencies[len(latencies) // 2] * 1e3,
            "claim_p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
            "claims_per_s": claimed / elapsed,
        }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scaleout.json")
    args = parser.parse_args()
    missing = broker_available()
    if missing:
        sys.exit(missing)
    runs = []
    for workers in (1, 2):
        runs.append(throughput(workers, args.studies))
        print(f"{workers} worker(s): {runs[-1]['studies_per_hour']:.0f} studies/h", file=sys.stderr)
    ledger = claims(args.jobs)
    print(f"\n{args.studies} CT studies (64 slices) at once, lung-ct-density, PostgreSQL + RabbitMQ")
    print(f"{'workers':<10}{'studies/h':>12}{'elapsed s':>12}{'deid s':>9}{'algo s':>9}{'build s':>9}{'send s':>9}")
    for r in runs:
        stage_figures = "".join(f"{r[f'median_{k}']:>9.2f}" for k in ("deidentify_s", "algorithm_s",
                                                                       "build_results_s", "send_s"))  # fmt: skip
        print(f"{r['workers']:<10}{r['studies_per_hour']:>12.0f}{r['elapsed_s']:>12.1f}{stage_figures}")
    print(f"\nledger: {ledger['claimers']} claimers, {ledger['jobs']} jobs: claim p50 {ledger['claim_p50_ms']:.2f} ms, "
          f"p99 {ledger['claim_p99_ms']:.2f} ms, {ledger['claims_per_s']:.0f} claims/s")  # fmt: skip
    write_report(args.out, "scaleout", throughput=runs, ledger=ledger)


if __name__ == "__main__":
    main()
