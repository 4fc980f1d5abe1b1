"""Issue 11: no admin action, crash or transient condition loses or strands a study.

Key rotation while the node and its receivers run and receive (defect 1); kill -9 between each step
of planning (defect 3); the index locked by another process during planning and during a job, and a
permanent failure with its reason (defect 4); a full disk that frees up again (defect 12)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from node.storage import segments

from .peers import (
    AINODE,
    CT_SERIES,
    TOOL_ENV,
    NodeProcess,
    flip_last_ciphertext_byte,
    folder_node_config,
    make_studies,
    series_files,
    start_node_process,
    start_storescu,
    storescu,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AINODE, *args, "--config", str(node.config_path)], capture_output=True, text=True, env=node.env, check=False
    )


def test_key_rotation_while_receiving_keeps_every_object_readable(tmp_path, start_node):
    key_file = tmp_path / "ainode.key"
    subprocess.run([AINODE, "keys", "generate", "--out", str(key_file)], check=True, capture_output=True)
    config_path, config, _results = folder_node_config(tmp_path)
    config["keys"] = {"provider": "file", "path": str(key_file)}
    config["routes"] = []
    config_path.write_text(yaml.safe_dump(config))
    node = start_node(config_path, config)
    before, during, after = make_studies(CT_SERIES, 3, tmp_path / "studies")
    assert storescu(node.port, before).returncode == 0
    sender = start_storescu(node.port, during, env={**TOOL_ENV, "TCP_NODELAY": "0"})  # slow: ~40 ms each
    rotated = node.cli("keys", "rotate")
    _out, err = sender.communicate(timeout=120)
    assert sender.returncode == 0, err[-2000:]
    assert rotated.returncode == 0, rotated.stderr
    assert "retired 1 key(s)" in rotated.stdout, rotated.stdout
    assert storescu(node.port, after).returncode == 0
    node.stop()

    node = start_node(config_path, config)  # the retired key is gone from the file now
    verified = node.cli("store", "verify")
    assert verified.returncode == 0, verified.stderr
    assert "0 tampered or unreadable" in verified.stdout
    status = node.cli("keys", "status").stdout
    assert status.count("current") == 1 and "old" not in status and "MISSING" not in status
    listing = node.cli("studies", "list").stdout
    assert listing.count(f"{len(before):>5} instance(s)") == 3  # all three studies, every instance
    shown = node.cli("audit", "show")
    assert shown.returncode == 0 and "master key rotated to" in shown.stdout


def _start(tmp_path: Path, name: str, env: dict[str, str], fault: str | None = None, storage=None, **node: object):
    (tmp_path / name).mkdir(exist_ok=True)
    config_path, config, results = folder_node_config(tmp_path / name)
    config["node"] |= node
    if storage:
        config["storage"] = storage
    config["delivery"] = {"max_attempts": 5, "backoff_s": 1.0, "max_backoff_s": 2.0}
    config_path.write_text(yaml.safe_dump(config))
    environment = {**env, **({"AINODE_FAULT": fault} if fault else {})}
    log = tmp_path / name / f"node-{len(list((tmp_path / name).glob('node-*.log')))}.log"
    return start_node_process(config_path, config, environment, log), results


def _jobs(node: NodeProcess) -> list[dict]:
    jobs = []
    for line in _cli(node, "jobs", "list").stdout.splitlines():
        shown = _cli(node, "jobs", "show", line.split()[0])
        jobs.append(json.loads(shown.stdout))
    return jobs


@pytest.mark.parametrize("point", ["plan:routed", "plan:jobs-inserted", "plan:committed"])
def test_kill_9_at_each_step_of_planning_plans_the_study_exactly_once(tmp_path, key_env, point):
    node, results = _start(tmp_path, "node", key_env, fault=f"{point}=kill")
    try:
        assert storescu(node.port, series_files(CT_SERIES)).returncode == 0
        assert node.proc is not None
        node.proc.wait(timeout=60)  # killed by the fault at the planning step
        assert node.proc.returncode == -9
        node = start_node_process(node.config_path, yaml.safe_load(node.config_path.read_text()), key_env,
                                  tmp_path / "node" / "restarted.log")  # fmt: skip
        wait_until(lambda: "done" in node.studies(), 180)
        jobs = _jobs(node)
        assert len(jobs) == 1 and jobs[0]["state"] == "delivered"  # planned once, not twice or never
        assert len(list(results.rglob("*.dcm"))) == 2
    finally:
        node.stop()


def test_index_locked_during_planning_and_during_a_job_is_retried(tmp_path, key_env):
    for point in ("plan:routed", "job:running"):
        node, results = _start(
            tmp_path, point.replace(":", "-"), key_env, fault=f"{point}=lock-index:3",
            storage={"database_busy_timeout_s": 0.5},
        )  # fmt: skip
        try:
            assert storescu(node.port, series_files(CT_SERIES)).returncode == 0
            wait_until(lambda n=node: "done" in n.studies(), 180)
            (job,) = _jobs(node)
            assert job["state"] == "delivered"
            assert len(list(results.rglob("*.dcm"))) == 2
            assert "index unavailable: database is locked" in node.log()
        finally:
            node.stop()


def test_a_permanent_planning_failure_fails_the_study_with_its_reason(tmp_path, key_env):
    node, _results = _start(tmp_path, "node", key_env)
    try:
        config = yaml.safe_load(node.config_path.read_text())
        config["routes"][0]["completion"] = {"quiet_period_s": 4.0}
        node.config_path.write_text(yaml.safe_dump(config))
        assert _cli(node, "config", "reload").returncode == 0
        wait_until(lambda: "configuration reloaded" in node.log(), 20)
        assert storescu(node.port, series_files(CT_SERIES)[:30]).returncode == 0
        wait_until(lambda: "30 instance(s)" in node.studies(), 20)  # indexed (off the C-STORE path)
        for path in (node.data_dir / "store" / "segments").glob("*.seg"):  # tamper with every instance, in place
            for offset, _length, _slots in segments.records(path):
                flip_last_ciphertext_byte(path, offset)
        listing = wait_until(lambda: "failed" in (out := node.studies()) and out, 60)
        # the planner found the tampering itself, or read a record the read-ahead had quarantined
        assert "planning failed: object" in listing
        assert "authentication failed (tampered)" in listing or "quarantined (tampered or damaged" in listing
    finally:
        node.stop()


def _fill(disk: Path, watermark_mb: int, margin_mb: int = 20) -> Path:
    """A file that takes the disk ``margin_mb`` under its watermark."""
    filler = disk / "filler"
    free_mb = shutil.disk_usage(disk).free // 2**20
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    os.posix_fallocate(fd, 0, (free_mb - watermark_mb + margin_mb) * 2**20)
    os.close(fd)
    return filler


def test_a_job_that_met_a_full_disk_finishes_once_space_is_freed(small_disk, key_env):
    disk = small_disk(400)  # a file system of its own: nothing else on the machine moves its free space
    node, results = _start(disk, "node", key_env, min_free_disk_mb=200)
    filler = disk / "filler"
    try:
        assert storescu(node.port, series_files(CT_SERIES)).returncode == 0
        _fill(disk, 200)  # the disk drops under the watermark

        def waiting() -> bool:
            jobs = _jobs(node)
            return bool(jobs) and jobs[0]["state"] == "pending" and "watermark" in (jobs[0]["reason"] or "")

        wait_until(waiting, 60, 0.2)
        wait_until(waiting, 10, 3.0)  # still waiting, not dead-lettered (max_attempts is 5)
        filler.unlink()
        wait_until(lambda: "done" in node.studies(), 120)
        (job,) = _jobs(node)
        assert job["state"] == "delivered"
        assert len(list(results.rglob("*.dcm"))) == 2
    finally:
        filler.unlink(missing_ok=True)
        node.stop()


def test_purge_gives_the_disk_back_and_receiving_resumes_without_a_restart(small_disk, key_env):
    """Issue 22, defect 9: the documented way out of a full disk works, even for records inside the
    segment the receiving process still appends to."""
    disk = small_disk(400)
    node, _results = _start(disk, "node", key_env, min_free_disk_mb=200, receivers=1)
    files = series_files(CT_SERIES)
    try:
        # a study analysed and delivered; its instances are in the segment the receiver still appends to
        (study,) = make_studies(CT_SERIES, 1, disk / "copy")
        assert storescu(node.port, study).returncode == 0
        wait_until(lambda: "done" in node.studies() or None, 120)
        study_bytes = sum(p.stat().st_size for p in study)
        _fill(disk, 200)
        refused = storescu(node.port, files[:1])
        assert refused.returncode != 0  # 0xA700: under the watermark
        before = shutil.disk_usage(disk).free
        study_key = next(line.split()[0] for line in node.studies().splitlines() if "done" in line)
        purged = _cli(node, "purge", study_key)
        assert purged.returncode == 0, purged.stderr
        freed = shutil.disk_usage(disk).free - before
        assert freed >= 0.9 * study_bytes, f"purge freed {freed} of the study's {study_bytes} bytes"
        status = _cli(node, "store", "status")
        assert "reclaimable" in status.stdout and "refusing" not in status.stdout, status.stdout
        accepted = storescu(node.port, files[:1])  # accepted again, no restart
        assert accepted.returncode == 0
        assert wait_until(lambda: "1 instance(s)" in node.studies() or None, 30)  # the purged study is gone
    finally:
        node.stop()
