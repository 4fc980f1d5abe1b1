"""Issue 16, Done 3: the faster receive path keeps the durability promise. A kill -9 during a
sustained ingest loses no instance that was acknowledged with Success, and the start-up
reconciliation indexes every durable instance the index lacks (the segment store is the source of
truth; the index is written behind it in batches)."""

from __future__ import annotations

import re
import sqlite3
import subprocess
from pathlib import Path

import pydicom
import pytest

from .peers import CT_SERIES, TOOL_ENV, make_studies, node_config, storescu, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _store_only(tmp_path: Path) -> tuple[Path, dict]:
    """A node that accepts STORESCU and stores what it receives (no route matches an MR-only rule)."""
    return node_config(
        tmp_path,
        peers=[{"ae_title": "STORESCU"}],
        destinations={"folder": {"type": "folder", "path": str(tmp_path / "results")}},
        routes=[{"name": "mr-only", "match": {"Modality": "MR"}, "algorithms": ["lung-ct-density"],
                 "destinations": ["folder"]}],
    )  # fmt: skip


def _acknowledged(log: str) -> list[Path]:
    """The files a verbose storescu saw answered with Success (``Sending file`` then ``Received
    Store Response (Success)``), in order."""
    done, current = [], None
    for line in log.splitlines():
        if match := re.search(r"Sending file: (.+)$", line):
            current = Path(match.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            done.append(current)
            current = None
    return done


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_kill_9_during_sustained_ingest_loses_no_acknowledged_instance(tmp_path, start_node):
    studies = make_studies(CT_SERIES, 6, tmp_path / "studies")
    config_path, config = _store_only(tmp_path)
    node = start_node(config_path, config)
    segments = node.data_dir / "store" / "segments"
    command = ["storescu", "-v", "-aet", "STORESCU", "-aec", "AINODE", "127.0.0.1", str(node.port)]
    senders = [
        subprocess.Popen(
            [*command, *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=TOOL_ENV
        )
        for files in (studies[0] + studies[1] + studies[2], studies[3] + studies[4] + studies[5])
    ]
    # the kill comes while both associations are mid-stream: ~20 MB of the ~100 MB stored
    wait_until(lambda: sum(p.stat().st_size for p in segments.glob("*.seg")) > 20_000_000, 120, 0.02)
    node.kill()
    logs = [sender.communicate(timeout=60)[0] for sender in senders]
    assert all(sender.returncode != 0 for sender in senders)  # both were cut off
    acknowledged = {_sop_uid(path) for log in logs for path in _acknowledged(log)}
    assert len(acknowledged) > 20

    node = start_node(config_path, config)  # the start-up reconciliation runs before it listens
    held = node.stored_sop_instance_uids()
    assert acknowledged <= held, f"{len(acknowledged - held)} acknowledged instance(s) lost"

    # the modalities send again: everything arrives once, nothing duplicated
    for files in studies:
        assert storescu(node.port, files).returncode == 0
    everything = {_sop_uid(path) for files in studies for path in files}
    assert node.stored_sop_instance_uids() == everything
    total = sum(s.instance_count for s in node.index().studies())
    assert total == len(everything)


def test_start_up_reconciliation_indexes_durable_instances_the_index_lacks(tmp_path, start_node):
    (files,) = make_studies(CT_SERIES, 1, tmp_path / "studies")
    config_path, config = _store_only(tmp_path)
    node = start_node(config_path, config)
    assert storescu(node.port, files).returncode == 0
    everything = {_sop_uid(path) for path in files}
    wait_until(lambda: node.stored_sop_instance_uids() == everything, 30, 0.1)
    node.stop()

    # the index loses rows (a restored backup, a writer that died before its batch): a third of
    # the instances and the study row itself
    with sqlite3.connect(node.data_dir / "index.sqlite") as db:
        (before,) = db.execute("SELECT count(*) FROM instances").fetchone()
        db.execute("DELETE FROM instances WHERE rowid % 3 = 0")
        db.execute("UPDATE studies SET instance_count = (SELECT count(*) FROM instances)")
        (after,) = db.execute("SELECT count(*) FROM instances").fetchone()
    assert before == len(files) and after < before

    node = start_node(config_path, config)
    assert node.stored_sop_instance_uids() == everything
    (study,) = node.index().studies()
    assert study.instance_count == len(files)
    said = f"{before - after} stored instance(s) indexed"
    assert said in node.log()
    shown = node.cli("audit", "show")  # and in the audit trail
    assert shown.returncode == 0 and said in shown.stdout, shown.stderr
