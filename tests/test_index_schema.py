"""Issue 14 (first part): the index by URL (SQLite or PostgreSQL), its schema under Alembic, and
``ainode db upgrade`` for data directories made before migrations."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text

from node.errors import IndexSchemaError, StorageError
from node.storage import schema
from node.storage.index import Base, Index, InstanceRow, JobState, PlannedJob, Stage, StudyState, default_url

from .peers import AINODE


def _instance(sop: str, study: str = "study") -> InstanceRow:
    return InstanceRow(
        object_id=f"obj-{sop}", sop_key=sop, study_key=study, series_key="series",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2", size=1, received_at=1.0,
    )  # fmt: skip


def _config(tmp_path: Path, database_url: str | None = None) -> Path:
    config = {"node": {"ae_title": "AINODE", "port": 11112, "data_dir": str(tmp_path / "data")},
              "keys": {"provider": "env", "variable": "AINODE_TEST_KEY"}}  # fmt: skip
    if database_url:
        config["storage"] = {"database_url": database_url}
    path = tmp_path / "ainode.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _ainode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AINODE, *args], capture_output=True, text=True, timeout=120, check=False)


def _assert_matches_models(url: str) -> None:
    engine = create_engine(url)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    engine.dispose()


def test_a_new_index_is_created_at_the_newest_revision_matching_the_models(tmp_path):
    Index.for_data_dir(tmp_path)
    url = default_url(tmp_path)
    assert schema.state(create_engine(url)).current == schema.head()
    _assert_matches_models(url)


def test_the_index_runs_on_postgresql(postgres_url, tmp_path):
    index = Index(postgres_url)
    _assert_matches_models(postgres_url)
    assert index.add_instance(_instance("a"), "PACS") and not index.add_instance(_instance("a"), "PACS")
    study = index.study("study")
    assert study is not None and study.instance_count == 1
    (job_id,) = index.plan_study("study", 1, [PlannedJob("route", "lung-ct-density", "series")], None) or []
    assert index.study("study").state == StudyState.PROCESSING  # type: ignore[union-attr]
    assert index.plan_study("study", 1, [], None) is None  # planned once
    job = index.job(job_id)
    assert job is not None and job.state == JobState.PENDING
    config = _config(tmp_path, postgres_url)
    status = _ainode("db", "status", "--config", str(config))
    assert status.returncode == 0 and f"revision {schema.head()}" in status.stdout, status.stdout + status.stderr


def test_db_upgrade_migrates_a_data_directory_of_the_previous_release(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    engine = create_engine(default_url(data))
    with engine.begin() as connection:  # the schema of the releases before migrations (revision 0001's)
        command.upgrade(schema._config(connection), schema.BASELINE)
        connection.execute(text("DROP TABLE alembic_version"))
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO studies VALUES ('s1', 'done', 'PACS', 1.0, 2.0, 1, 1, NULL, NULL, 3.0)"
        ))  # fmt: skip
        connection.execute(text(
            "INSERT INTO instances VALUES ('o1', 'k1', 's1', 'series', '1.2.840.10008.5.1.4.1.1.2', "
            "'1.2.840.10008.1.2', 10, 1.0)"
        ))  # fmt: skip
        connection.execute(text(
            "INSERT INTO jobs (study_key, generation, route, algorithm, series_key, state, attempts, "
            "result_object_ids, timings, created_at, updated_at) "
            "VALUES ('s1', 1, 'r', 'lung-ct-density', 'series', 'delivered', 1, '[\"x\"]', '{}', 1.0, 2.0), "
            "('s1', 1, 'r', 'lung-ct-density', 'series', 'pending', 1, '[\"y\"]', '{}', 1.0, 2.0), "
            "('s1', 1, 'r', 'lung-ct-density', 'series', 'running', 0, '[]', '{}', 1.0, 2.0)"
        ))  # fmt: skip
    engine.dispose()
    with pytest.raises(IndexSchemaError, match=r"from before migrations.*ainode db upgrade"):
        Index.for_data_dir(data)  # refused until migrated
    config = _config(tmp_path)
    upgraded = _ainode("db", "upgrade", "--config", str(config))
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"was from before migrations, now at {schema.head()}" in upgraded.stdout
    index = Index.for_data_dir(data)
    study = index.study("s1")
    assert study is not None and (study.state, study.instance_count) == (StudyState.DONE, 1)
    delivered, built, started = index.jobs("s1")
    assert (delivered.state, delivered.stage, delivered.result_ids) == (JobState.DELIVERED, Stage.DONE, ["x"])
    assert (built.state, built.stage, built.result_ids) == (JobState.PENDING, Stage.DELIVER, ["y"])  # only sends
    assert (started.state, started.stage, started.worker) == (JobState.RUNNING, Stage.DEIDENTIFY, None)
    assert index.claim_job(started.id, "w", 30.0) is not None  # a lease-less running job is claimable
    assert [i.object_id for i in index.instances("s1")] == ["o1"]
    _assert_matches_models(default_url(data))
    again = _ainode("db", "upgrade", "--config", str(config))  # idempotent
    assert again.returncode == 0 and f"was at {schema.head()}" in again.stdout


def test_a_newer_schema_is_refused_at_start_with_a_clear_message(tmp_path, key_env):
    (tmp_path / "data").mkdir()
    Index.for_data_dir(tmp_path / "data")
    engine = create_engine(default_url(tmp_path / "data"))
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    with pytest.raises(IndexSchemaError, match="'0099' is newer than this release knows"):
        Index.for_data_dir(tmp_path / "data")
    config = _config(tmp_path)
    refused = _ainode("db", "upgrade", "--config", str(config))
    assert refused.returncode == 2 and "'0099' is newer than this release knows" in refused.stderr
    served = subprocess.run([AINODE, "serve", "--config", str(config)], capture_output=True, text=True,
                            timeout=120, check=False, env={**os.environ, **key_env})  # fmt: skip
    assert served.returncode != 0
    assert "'0099' is newer than this release knows" in served.stdout + served.stderr


def _claimer(url: str, out: str) -> None:
    """One claiming process: claims due jobs in small batches until none is left."""
    index = Index(url)
    claimed: list[int] = []
    idle = 0
    while idle < 3:
        batch = index.claim_due_jobs(time.time(), limit=3)
        claimed += [job.id for job in batch]
        idle = 0 if batch else idle + 1
    Path(out).write_text(json.dumps(claimed))


def test_concurrent_claims_on_postgresql_never_claim_a_job_twice(postgres_url, tmp_path):
    index = Index(postgres_url)
    index.add_instance(_instance("a"), "PACS")
    planned = [PlannedJob("route", "lung-ct-density", f"series{n}") for n in range(240)]
    ids = index.plan_study("study", 1, planned, None)
    assert ids is not None
    for job_id in ids:
        index.update_job(job_id, next_attempt_at=0.0)  # every one due for a retry
    context = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"claimed-{n}.json" for n in range(8)]
    workers = [context.Process(target=_claimer, args=(postgres_url, str(out))) for out in outs]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    claimed = [job_id for out in outs for job_id in json.loads(out.read_text())]
    assert sorted(claimed) == sorted(ids)  # every job claimed, none twice
    assert sum(1 for out in outs if json.loads(out.read_text())) > 1  # the claimers did compete


def _hammer(url: str, job_ids: list[int], worker: str, rounds: int, out: str) -> None:
    """One worker hammering the ledger: claims random jobs under short leases, and releases some
    of them, lets the others lapse; writes the claims it won (bounded loop)."""
    import random

    rng = random.Random(worker)
    index = Index(url)
    won = 0
    for _round in range(rounds):
        job_id = rng.choice(job_ids)
        if index.claim_job(job_id, worker, lease_s=rng.uniform(0.02, 0.2)) is None:
            continue
        won += 1
        if rng.random() < 0.3:
            index.renew_leases(worker, [job_id], lease_s=0.1)  # a heartbeat
        if rng.random() < 0.5:
            index.update_held_job(job_id, worker, "released", state=JobState.PENDING)
    Path(out).write_text(json.dumps(won))


def test_hammered_leases_on_postgresql_never_hold_a_job_twice(postgres_url, tmp_path):
    """Done 3 of issue 14: 8 workers claim, renew, release and abandon 12 jobs under leases of
    20-200 ms; the ledger's own claim records show no job ever held by two workers at once."""
    index = Index(postgres_url)
    index.add_instance(_instance("a"), "PACS")
    ids = index.plan_study("study", 1, [PlannedJob("route", "lung-ct-density", f"s{n}") for n in range(12)], None)
    assert ids is not None
    context = multiprocessing.get_context("spawn")
    names = [f"hammer-{n}" for n in range(8)]
    outs = [tmp_path / f"{name}.json" for name in names]
    workers = [
        context.Process(target=_hammer, args=(postgres_url, ids, name, 400, str(out)))
        for name, out in zip(names, outs, strict=True)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    claims = index.claims()
    assert len(claims) == sum(json.loads(out.read_text()) for out in outs)  # every claim won is on record
    assert len({c.worker for c in claims}) == 8 and len(claims) > 100  # they did compete
    for job_id in ids:
        held = [c for c in claims if c.job_id == job_id]  # in the order the row lock granted them
        assert sum(c.released_at is None for c in held) <= 1
        for before, after in itertools.pairwise(held):
            assert before.released_at is not None, (before.id, after.id)
            if before.outcome == "released" or (before.outcome == "reclaimed" and before.worker == after.worker):
                continue  # given back (the next claim found the job pending), or claimed again by its holder
            # taken over: only once the lease the ledger held for ``before`` had expired
            assert before.outcome == "expired" and after.claimed_at > before.lease_expires_at, (before.id, after.id)


def _one_job(index: Index) -> int:
    index.add_instance(_instance("a"), "PACS")
    (job_id,) = index.plan_study("study", 1, [PlannedJob("route", "lung-ct-density", "series")], None) or []
    return job_id


def test_a_worker_that_lost_its_lease_writes_nothing(tmp_path):
    index = Index.for_data_dir(tmp_path)
    job_id = _one_job(index)
    assert index.claim_job(job_id, "a", lease_s=0.05) is not None
    assert index.claim_job(job_id, "b", lease_s=30) is None  # a's lease is live
    time.sleep(0.1)
    assert index.renew_leases("a", [], 30) == 0  # a's heartbeat renews only jobs it runs
    taken = index.claim_job(job_id, "b", lease_s=30)
    assert taken is not None and (taken.worker, taken.attempts) == ("b", 1)  # a's run counted as failed
    assert not index.update_held_job(job_id, "a", "released", state=JobState.DELIVERED)  # fenced
    assert index.renew_leases("a", [job_id], 30) == 0
    job = index.job(job_id)
    assert job is not None and (job.state, job.worker) == (JobState.RUNNING, "b")
    assert [(c.worker, c.outcome) for c in index.claims(job_id)] == [("a", "expired"), ("b", None)]


def test_expired_leases_are_offered_again_then_dead_lettered(tmp_path):
    index = Index.for_data_dir(tmp_path)
    job_id = _one_job(index)
    for attempt in (1, 2):
        assert index.claim_job(job_id, f"w{attempt}", lease_s=0.01) is not None
        time.sleep(0.03)
        offered = index.reoffer_expired(max_attempts=3)
        assert [j.id for j in offered] == [job_id]
        job = index.job(job_id)
        assert job is not None and (job.state, job.attempts, job.worker) == (JobState.PENDING, attempt, None)
        assert f"the lease of w{attempt} expired" in (job.reason or "")
    assert index.claim_job(job_id, "w3", lease_s=0.01) is not None
    time.sleep(0.03)
    assert index.reoffer_expired(max_attempts=3) == []
    job = index.job(job_id)
    assert job is not None and job.state == JobState.FAILED and "dead letter" in (job.reason or "")


def test_a_study_whose_job_is_running_is_not_purged(tmp_path):
    index = Index.for_data_dir(tmp_path)
    job_id = _one_job(index)
    index.claim_job(job_id, "worker-1", lease_s=30)
    with pytest.raises(StorageError, match=r"job \d+ is running on worker-1"):
        index.delete_study("study")
    assert index.study("study") is not None
    index.update_held_job(job_id, "worker-1", "released", state=JobState.FAILED)
    assert "obj-a" in index.delete_study("study")
