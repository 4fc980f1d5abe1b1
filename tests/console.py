"""A node with its console for the console tests: DCMTK storescp as the PACS its results go to,
console users of every role, and signed-in HTTP clients. No pytest here."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from .peers import AINODE, LUNG_ROUTE, TOOL_ENV, NodeProcess, free_port, node_config, start_node_process, wait_for_port

CLIENT_LIMITS = httpx.Limits(keepalive_expiry=1.0)
"""An idle connection is given up after 1 s: uvicorn closes one after 5 s (``timeout_keep_alive``),
httpx's own expiry is the same 5 s, and a request sent on a connection the server is closing that
moment is reset (a browser sends it again on a new connection; httpx does not)."""
PASSWORDS = {"admin": "admin-password-1234", "operator": "operator-password-1234", "viewer": "viewer-password-1234"}
"""The console users every console node has, by name (each has the role of its name)."""


@dataclass
class Pacs:
    """DCMTK storescp as the PACS results are delivered to; it can be stopped and started again."""

    port: int
    folder: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder.parent / "storescp.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(["storescp", "-od", str(self.folder), "+xa", str(self.port)], stdout=log,
                                     stderr=log, env=TOOL_ENV)  # fmt: skip
        wait_for_port(self.port, 30, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())


@dataclass
class ConsoleNode:
    """A running node with its console on ``url``."""

    node: NodeProcess
    url: str
    pacs: Pacs
    env: dict[str, str] = field(default_factory=dict)

    def client(self, user: str, password: str | None = None) -> httpx.Client:
        """An HTTP client signed in (``POST /api/login``) as ``user``, sending its CSRF token."""
        client = httpx.Client(base_url=self.url, timeout=60, verify=False, limits=CLIENT_LIMITS)
        response = client.post("/api/login", json={"name": user, "password": password or PASSWORDS[user]})
        response.raise_for_status()
        client.headers["X-CSRF-Token"] = response.json()["csrf_token"]
        return client

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([AINODE, *args, "--config", str(self.node.config_path)], input=stdin,
                              capture_output=True, text=True, env={**os.environ, **self.env}, check=False)  # fmt: skip


def console_config(tmp_path: Path, pacs_port: int, **console: Any) -> tuple[Path, dict[str, Any]]:
    """A node whose lung route delivers to the PACS (one attempt, so a failed delivery is a dead
    letter at once), MR studies stored only (complete after 1 s of quiet, not the default
    minute), with its console on a free port."""
    config_path, config = node_config(
        tmp_path,
        peers=[{"ae_title": "STORESCU"}, {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        destinations={"pacs": {"type": "dicom", "peer": "PACS"}},
        routes=[{**LUNG_ROUTE, "destinations": ["pacs"]},
                {"name": "mr-store-only", "match": {"Modality": "MR"}, "algorithms": [],
                 "completion": {"quiet_period_s": 1.0}}],
    )  # fmt: skip
    config["keys"] = {"provider": "file", "path": str(tmp_path / "master.key")}
    config["node"]["receivers"] = 1
    config["delivery"] = {"max_attempts": 1, "backoff_s": 1.0}
    config["console"] = {"host": "127.0.0.1", "port": free_port(), "max_failed_logins": 3, "lockout_s": 600, **console}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path, config


def start_console_node(tmp_path: Path, **console: Any) -> ConsoleNode:
    """Key file, users of every role (made with ``ainode users add``), the node, its PACS (started)."""
    pacs = Pacs(free_port(), tmp_path / "pacs" / "received")
    config_path, config = console_config(tmp_path, pacs.port, **console)
    subprocess.run([AINODE, "keys", "generate", "--out", str(tmp_path / "master.key")], check=True,
                   capture_output=True)  # fmt: skip
    env: dict[str, str] = {}
    for name, password in PASSWORDS.items():
        added = subprocess.run(
            [AINODE, "users", "add", name, "--role", name, "--password-stdin", "--config", str(config_path)],
            input=password + "\n", capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
    pacs.start()
    node = start_node_process(config_path, config, env, tmp_path / "node.log")
    scheme = "https" if "tls" in console else "http"
    url = f"{scheme}://127.0.0.1:{config['console']['port']}"
    wait_for_port(config["console"]["port"], 60, node.proc)
    return ConsoleNode(node, url, pacs, env)


def csrf_of(html: str) -> str:
    """The CSRF token of the first form of a page."""
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found is not None, html[:2000]
    return found.group(1)
