"""Shared pytest fixtures over the real peers in ``tests/peers.py``."""

from __future__ import annotations

import base64
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .fleet import POSTGRES, fresh_database
from .peers import STARTED, NodeProcess, Orthanc, log_problems, start_node_process, start_orthanc


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests without CUDA."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test's report carries the warnings and errors of every node still running: a
    failure seen only in CI (a reset connection, a timeout) is explained by what the node said."""
    report = yield
    if report.failed:
        for node in filter(None, (ref() for ref in STARTED)):
            if node.proc is not None and node.proc.poll() is None and (problems := log_problems(node)):
                report.sections.append((f"node log {node.log_path}", problems))
    return report


@pytest.fixture
def key_env() -> dict[str, str]:
    """A fresh master key in the environment variable the test configs name."""
    return {"AINODE_TEST_KEY": base64.b64encode(secrets.token_bytes(32)).decode()}


@pytest.fixture
def start_node(tmp_path: Path, key_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Factory: start ``ainode serve`` for a configuration; stopped at teardown."""
    nodes: list[NodeProcess] = []
    for key, value in key_env.items():
        monkeypatch.setenv(key, value)  # for the CLI calls a test makes

    def start(config_path: Path, config: dict[str, Any]) -> NodeProcess:
        node = start_node_process(config_path, config, key_env, tmp_path / f"node-{len(nodes)}.log")
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Any]:
    """Factory: start Orthanc knowing ainode as modality ``ainode`` at ``node_port``."""
    started: list[Orthanc] = []

    def start(node_ae_title: str, node_port: int) -> Orthanc:
        pacs = start_orthanc(tmp_path / f"orthanc-{len(started)}", node_ae_title, node_port)
        started.append(pacs)
        return pacs

    yield start
    for pacs in started:
        pacs.stop()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the machine's server (dropped afterwards)."""
    psycopg = pytest.importorskip("psycopg")
    try:
        psycopg.connect(POSTGRES, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not answering on 127.0.0.1:5432: {exc}")
    with fresh_database() as url:
        yield url


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Factory: a file system of its own of ``size_mb`` (tmpfs), so that a test that fills a disk
    to its watermark is not disturbed by what else the machine writes; unmounted at teardown."""
    mounted: list[Path] = []

    def make(size_mb: int) -> Path:
        path = tmp_path / f"disk-{len(mounted)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(path)],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small file system here (needs root): {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
