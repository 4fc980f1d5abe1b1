"""Deterministic fault injection, for the tests that crash or starve the node at a named point.

Set ``AINODE_FAULT=POINT=ACTION[:ARGUMENT]`` in the node's environment; when the process reaches
``POINT`` (once per process) the action runs:

- ``kill``: SIGKILL this process (a crash: no shutdown code runs);
- ``lock-index:SECONDS``: another process takes an exclusive lock on the SQLite index for SECONDS
  (what a long administrative transaction or a backup does), and this process goes on.

Points: ``plan:routed`` (routes chosen, nothing written), ``plan:jobs-inserted`` (inside the
planning transaction, before commit), ``plan:committed`` (planned, jobs not yet submitted),
``job:running`` (a job marked running, before any work). Without the variable this costs one
dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import Any

logger = logging.getLogger(__name__)

_fired: set[str] = set()

_LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
"""


def point(name: str, index: Any = None) -> None:
    """Run the configured action if ``name`` is the configured fault point (see the module
    docstring); ``index`` is the :class:`~node.storage.index.Index` for ``lock-index``."""
    spec = os.environ.get("AINODE_FAULT")
    if not spec or name in _fired:
        return
    where, _, action = spec.partition("=")
    if where != name:
        return
    _fired.add(name)
    kind, _, argument = action.partition(":")
    logger.warning("fault injected at %s: %s", name, action)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "lock-index" and index is not None:
        database = str(index.engine.url.database)
        locker = subprocess.Popen(
            [sys.executable, "-c", _LOCKER, database, argument or "3"], stdout=subprocess.PIPE, text=True
        )
        assert locker.stdout is not None
        locker.stdout.readline()  # the lock is held from here on
