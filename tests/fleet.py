"""A scaled-out ainode for tests and benchmarks: one node and ``ainode worker`` processes over a
PostgreSQL ledger and RabbitMQ, delivering to a real Orthanc (issue 14)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from node.storage.index import Index, JobState

from .peers import AINODE, LUNG_ROUTE, free_port, pacs_node_config, start_orthanc, wait_until

BROKER = "amqp://guest:guest@127.0.0.1:5672//"
"""The machine's RabbitMQ (guest/guest, loopback only)."""
POSTGRES = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"
"""The machine's PostgreSQL (trust authentication)."""


@contextmanager
def fresh_database(prefix: str = "ainode") -> Iterator[str]:
    """A new PostgreSQL database on the machine's server, dropped afterwards; yields its URL.

    Raises
    ------
    psycopg.OperationalError
        PostgreSQL is not answering.
    """
    import psycopg

    admin = psycopg.connect(POSTGRES, autocommit=True)
    name = f"{prefix}_{secrets.token_hex(6)}"
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        admin.close()


def broker_available() -> str | None:
    """Why RabbitMQ cannot be used here, or ``None`` when it answers."""
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=3).close()
    except OSError as exc:
        return f"RabbitMQ is not answering on 127.0.0.1:5672: {exc}"
    return None


class Fleet:
    """A node and its workers over one configuration (PostgreSQL ledger, RabbitMQ broker)."""

    def __init__(self, tmp_path: Path, config_path: Path, config: dict[str, Any], env: dict[str, str]) -> None:
        self.tmp_path, self.config_path, self.config = tmp_path, config_path, config
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []
        self.index = Index(config["storage"]["database_url"])

    def _start(self, args: list[str], name: str, fault: str | None = None) -> subprocess.Popen[bytes]:
        env = dict(self.env)
        if fault:
            env["AINODE_FAULT"] = fault
        log = open(self.tmp_path / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([AINODE, *args, "--config", str(self.config_path)], stdout=log, stderr=log, env=env)
        self.procs.append(proc)
        return proc

    def node(self, fault: str | None = None) -> subprocess.Popen[bytes]:
        """``ainode serve``, listening once this returns."""
        proc = self._start(["serve"], "node", fault)
        port = int(self.config["node"]["port"])

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                assert proc.poll() is None, self.log("node")
                return False

        wait_until(listening, 60)
        return proc

    def worker(self, name: str, fault: str | None = None) -> subprocess.Popen[bytes]:
        """``ainode worker`` (every queue of the configuration)."""
        return self._start(["worker"], name, fault)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Another ``ainode`` command with the fleet's configuration and environment."""
        command = [AINODE, *args, "--config", str(self.config_path)]
        return subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=60, check=False)

    def log(self, name: str) -> str:
        """What process ``name`` (node, a worker) logged so far."""
        path = self.tmp_path / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def orphans(self) -> set[str]:
        """Objects in the store that no index row names (secrets aside)."""
        from node.storage import segments

        root = Path(self.config["node"]["data_dir"]) / "store"
        stored = {p.name for p in (root / "objects").glob("*/*")}
        for path in (root / "segments").glob("*.seg"):  # received instances: live segment records
            head = segments.segment_prefix(path)
            stored |= {f"{head}{at:012x}" for at, _n, (a, b) in segments.records(path) if not (a.empty and b.empty)}
        return {o for o in stored - self.index.referenced_object_ids() if not o.startswith("secret-")}

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.index.engine.dispose()


def scaled_out(
    work: Path, database_url: str, env: dict[str, str], lease_s: float,
    routes: list[dict[str, Any]] | None = None, destination: dict[str, Any] | None = None,
) -> tuple[Fleet, Any]:  # fmt: skip
    """Orthanc as the PACS and a scaled-out configuration (``node.executor: celery``, a queue of
    its own, leases of ``lease_s``) with ``routes``; returns the (not yet started) fleet and Orthanc."""
    node_port = free_port()
    pacs = start_orthanc(work / "orthanc", "AINODE", node_port)
    config_path, config = pacs_node_config(work, pacs, node_port, routes or [LUNG_ROUTE], destination)
    config["peers"].append({"ae_title": "STORESCU"})
    config["node"].update(executor="celery", lease_s=lease_s, receivers=1)
    config["storage"] = {"database_url": database_url}
    config["celery"] = {"queue": f"ainode-test-{secrets.token_hex(4)}"}
    config["delivery"] = {"max_attempts": 8, "backoff_s": 1.0, "max_backoff_s": 2.0}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return Fleet(work, config_path, config, {**os.environ, **env, "AINODE_BROKER_URL": BROKER}), pacs


def results_in(pacs: Any) -> dict[str, list[tuple[str, int]]]:
    """Per study in Orthanc: (modality, instance count) of each series."""
    out = {}
    for study in pacs.rest("GET", "/studies?expand"):
        series = [pacs.rest("GET", f"/series/{s}") for s in study["Series"]]
        out[study["MainDicomTags"]["StudyInstanceUID"]] = sorted(
            (s["MainDicomTags"]["Modality"], len(s["Instances"])) for s in series
        )
    return out


def delivered(fleet: Fleet, count: int) -> bool:
    jobs = fleet.index.jobs()
    return len(jobs) == count and all(j.state == JobState.DELIVERED for j in jobs)
