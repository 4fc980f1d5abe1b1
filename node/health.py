"""Checks of whether a process can do its work, shared by ``ainode health`` (probes of any role)
and the console's ``/readyz``. Each returns ``None`` when fine, else what is wrong (no PHI)."""

from __future__ import annotations

import os
import socket

from node.errors import AinodeError, OutOfResourcesError
from node.settings.config import NodeSettings, Settings
from node.storage.index import Index, JobState
from node.storage.store import ObjectStore


def scp_problem(node: NodeSettings) -> str | None:
    """The Storage SCP accepts TCP connections on ``node.port``."""
    host = "127.0.0.1" if node.host in ("0.0.0.0", "::") else node.host
    try:
        socket.create_connection((host, node.port), timeout=2).close()
    except OSError as exc:
        return f"DICOM port {node.port}: the Storage SCP is not listening ({exc.strerror or exc})"
    return None


def index_problem(index: Index) -> str | None:
    """The index answers a query."""
    try:
        index.count_jobs(JobState.RUNNING)
    except AinodeError as exc:
        return f"index: {exc}"
    return None


def broker_problem(settings: Settings) -> str | None:
    """The Celery broker answers (``node.executor: celery`` only)."""
    if settings.node.executor != "celery":
        return None
    from node.jobs.distributed import broker_reachable

    try:
        broker_reachable(settings)
    except AinodeError as exc:
        return str(exc)
    return None


def disk_problem(store: ObjectStore) -> str | None:
    """The store's file system is above the watermark (else C-STORE is refused with A700)."""
    try:
        store.check_space()
    except OutOfResourcesError as exc:
        return f"under the watermark: {exc}"
    return None


def store_problem(store: ObjectStore) -> str | None:
    """The store's folder is writable."""
    probe = store.root / "tmp" / f"ready-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"store not writable: {exc.strerror or exc}"
    return None
