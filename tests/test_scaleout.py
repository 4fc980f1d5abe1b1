"""Issue 14, scaled out for real: one node (receiving, planning) and ``ainode worker`` processes
over PostgreSQL (the ledger) and RabbitMQ (Celery), results sent to a real Orthanc.

Workers are separate processes killed with SIGKILL (``AINODE_FAULT=stage:X=kill``: the worker kills
itself in the middle of stage X, after part of its work is written); the ledger's own records
(jobs, job_claims) and Orthanc's REST API say what happened. Skipped with the reason when
PostgreSQL or RabbitMQ is not answering.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from node.storage.index import JobState, Stage, StudyState

from .fleet import Fleet, broker_available, delivered, results_in, scaled_out
from .peers import CT_SERIES, LUNG_ROUTE, make_studies, series_files, start_storescu, storescu, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEADY_ROUTE = {**LUNG_ROUTE, "completion": {"quiet_period_s": 3.0}}
"""3 s of quiet, not 1: under the suite's load (or on a slow machine) a sender stalled over a second
once, the study completed twice, and the late burst's job superseded the first."""

LEASE_S = 4.0


@pytest.fixture
def fleet(tmp_path: Path, postgres_url: str, key_env: dict[str, str]) -> Iterator[Any]:
    """Factory: Orthanc as the PACS and a scaled-out node configuration (leases of 4 s) with
    ``routes``; returns (Fleet, Orthanc), stopped at teardown."""
    missing = broker_available()
    if missing:
        pytest.skip(missing)
    started: list[tuple[Fleet, Any]] = []

    def make(
        routes: list[dict[str, Any]] | None = None, destination: dict[str, Any] | None = None
    ) -> tuple[Fleet, Any]:
        started.append(scaled_out(tmp_path, postgres_url, key_env, LEASE_S, routes, destination))
        return started[-1]

    yield make
    for fleet, pacs in started:
        fleet.stop()
        pacs.stop()


def test_two_workers_deliver_eight_concurrent_studies_each_once(fleet, tmp_path):
    """Done 1: 8 studies from 8 concurrent storescu senders, one node, two workers."""
    nodes, pacs = fleet([STEADY_ROUTE])
    down = nodes.cli("health", "--role", "node")
    assert down.returncode == 1 and "unhealthy: DICOM port" in down.stderr  # no node yet
    nodes.node()
    workers = [nodes.worker("worker-a"), nodes.worker("worker-b")]
    for role in ("node", "worker"):  # what the deployments' probes run
        probe = nodes.cli("health", "--role", role)
        assert probe.returncode == 0 and f"healthy ({role})" in probe.stdout, probe.stderr
    studies = make_studies(CT_SERIES, 8, tmp_path / "studies")
    senders = [start_storescu(int(nodes.config["node"]["port"]), files) for files in studies]
    for sender in senders:
        _out, err = sender.communicate(timeout=300)
        assert sender.returncode == 0, err
    wait_until(lambda: delivered(nodes, 8) or None, 900, 2.0)
    assert all(w.poll() is None for w in workers)
    results = results_in(pacs)
    assert len(results) == 8 and all(r == [("SEG", 1), ("SR", 1)] for r in results.values()), results
    claims = nodes.index.claims()
    assert sorted(c.job_id for c in claims) == sorted(j.id for j in nodes.index.jobs())  # each job claimed once
    assert {c.outcome for c in claims} == {"released"}
    assert len({c.worker for c in claims}) == 2  # both workers ran jobs
    assert all("start-up objects frozen" in nodes.log(name) for name in ("node", "worker-a", "worker-b"))
    assert all(s.state == StudyState.DONE for s in nodes.index.studies())
    assert nodes.orphans() == set()


@pytest.mark.parametrize("stage", [Stage.DEIDENTIFY, Stage.ANALYSE, Stage.BUILD, Stage.DELIVER])
def test_a_worker_killed_in_any_stage_loses_nothing_and_duplicates_nothing(fleet, stage):
    """Done 2: the worker holding the job is SIGKILLed in the middle of ``stage``; its lease
    expires, another worker finishes the job; Orthanc holds each result once; no orphan objects."""
    nodes, pacs = fleet([STEADY_ROUTE])
    nodes.node()
    doomed = nodes.worker("doomed", fault=f"stage:{stage}=kill")
    assert storescu(int(nodes.config["node"]["port"]), series_files(CT_SERIES)).returncode == 0
    assert doomed.wait(timeout=600) == -signal.SIGKILL, nodes.log("doomed")
    (job,) = nodes.index.jobs()
    # killed while holding it, in that stage; the analysis runs while the de-identified series is
    # written, and the two stages are recorded together once both outputs are durable
    recorded = Stage.DEIDENTIFY if stage == Stage.ANALYSE else stage
    assert job.state == JobState.RUNNING and job.stage == recorded
    first_holder = job.worker
    nodes.worker("rescuer")
    wait_until(lambda: delivered(nodes, 1) or None, 600, 1.0)
    (job,) = nodes.index.jobs()
    assert job.attempts == 1  # the crash counts as a failed attempt (a job that kills every worker dead-letters)
    first, second = nodes.index.claims(job.id)
    assert (first.worker, first.outcome) == (first_holder, "expired")
    assert second.worker != first_holder and second.outcome == "released"
    assert second.claimed_at > first.lease_expires_at  # taken over only once the lease had expired
    results = results_in(pacs)
    assert list(results.values()) == [[("SEG", 1), ("SR", 1)]], results
    assert nodes.orphans() == set()


def test_a_reload_between_planning_and_running_does_not_change_the_planned_job(fleet, tmp_path):
    """Done 6: a study planned under configuration A runs with A's route snapshot though B is in
    force when it runs; a study planned after the reload gets B's rules."""
    nodes, pacs = fleet(destination={"objects": ["SEG", "SR"]})
    node = nodes.node()
    first, second = make_studies(CT_SERIES, 2, tmp_path / "studies")
    assert storescu(int(nodes.config["node"]["port"]), first).returncode == 0
    (planned,) = wait_until(lambda: nodes.index.jobs() or None, 120)  # planned; no worker runs it yet
    digest_a = planned.config_digest
    changed = yaml.safe_load(nodes.config_path.read_text())
    changed["destinations"]["pacs"]["objects"] = ["SEG"]  # B: the SR is no longer sent
    changed["routes"][0]["algorithms"] = [{"name": "lung-ct-density", "parameters": {"laa_threshold_hu": -910}}]
    nodes.config_path.write_text(yaml.safe_dump(changed, sort_keys=False))
    node.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in nodes.log("node") or None, 30)
    nodes.worker("worker")
    wait_until(lambda: delivered(nodes, 1) or None, 600, 1.0)
    assert storescu(int(nodes.config["node"]["port"]), second).returncode == 0
    wait_until(lambda: delivered(nodes, 2) or None, 600, 1.0)
    a, b = nodes.index.jobs()
    assert a.config_digest == digest_a != b.config_digest
    assert '"laa_threshold_hu": -910' in (b.route_snapshot or "") and "-910" not in (a.route_snapshot or "")
    by_study = results_in(pacs)
    assert sorted(by_study.values()) == [[("SEG", 1)], [("SEG", 1), ("SR", 1)]]  # A's objects, then B's


def test_a_node_killed_between_complete_and_job_creation_plans_the_study_once(fleet):
    """Done 4 on the shared ledger: kill -9 inside the planning transaction; after restart the
    study is planned once and delivered."""
    nodes, pacs = fleet()
    crashed = nodes.node(fault="plan:jobs-inserted=kill")
    assert storescu(int(nodes.config["node"]["port"]), series_files(CT_SERIES)).returncode == 0
    assert crashed.wait(timeout=120) == -signal.SIGKILL
    (study,) = nodes.index.studies()
    assert study.state == StudyState.RECEIVING and nodes.index.jobs() == []  # the transaction never committed
    nodes.node()
    nodes.worker("worker")
    wait_until(lambda: delivered(nodes, 1) or None, 600, 1.0)
    time.sleep(2 * LEASE_S)  # nothing planned twice afterwards either
    assert len(nodes.index.jobs()) == 1
    assert list(results_in(pacs).values()) == [[("SEG", 1), ("SR", 1)]]
