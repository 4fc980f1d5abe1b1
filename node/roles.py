"""The composition root: what each role of an ainode process opens, built in one place.

Every long-lived object that holds the data directory — the encrypted store, the index, the
node's secrets, the audit log — is opened here and only here (through
:func:`node.datadir.open_data_dir`), once per process, under the role the ledger and the audit
trail will know it by: the node (``node``), a child receiver (``receiver-N``), a Celery worker
(``worker``), an administrator's command (``cli``). Commands that need only the index (health,
listings) or its engine (migrations) get those from here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from node.datadir import DataDir, open_data_dir
from node.settings import load_settings
from node.settings.config import Settings
from node.storage.index import Index, default_url


def node_data(settings: Settings) -> DataDir:
    """The node's main process: everything."""
    return open_data_dir(settings, role="node")


def receiver_data(settings: Settings, number: int) -> DataDir:
    """Child receiver ``number``: its own segment writer and audit writer over the shared store."""
    return open_data_dir(settings, role=f"receiver-{number}")


def worker_data(settings: Settings) -> DataDir:
    """An ``ainode worker`` (Celery)."""
    return open_data_dir(settings, role="worker")


def cli_data(settings: Settings | str | Path) -> DataDir:
    """An administrator's command, opened as every process of the node opens it (store with the
    disk watermark, index, secrets, audit log with its ATNA mirror)."""
    return open_data_dir(settings if isinstance(settings, Settings) else load_settings(settings), role="cli")


def index_only(settings: Settings, busy_timeout_s: float = 5.0) -> Index:
    """The index alone, checked (no keys needed): health checks and read-only listings.

    Raises
    ------
    IndexUnavailableError, IndexSchemaError
        It cannot be reached, or its schema is not this release's.
    """
    return Index.for_data_dir(settings.node.data_dir, busy_timeout_s, settings.storage.database_url)


def index_engine(settings: Settings) -> Any:
    """The engine of the configured index, not opened as an :class:`Index` (migrations)."""
    from sqlalchemy import create_engine

    settings.node.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return create_engine(settings.storage.database_url or default_url(settings.node.data_dir))
