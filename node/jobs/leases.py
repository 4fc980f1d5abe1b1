"""Who holds a job: worker ids and the heartbeat that keeps their leases alive.

A worker (a node's job thread pool, or an ``ainode worker`` process) claims a job in the ledger
under a lease of ``node.lease_s`` seconds (:meth:`node.storage.index.Index.claim_job`); its
:class:`Heartbeat` renews every lease it holds each third of that. A worker that dies stops
renewing, its leases expire and the jobs are offered again
(:meth:`~node.storage.index.Index.reoffer_expired`); one that is alive never loses a job to
another, since every write it makes is fenced by its lease.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Collection

from node.errors import AinodeError
from node.storage.index import Index

logger = logging.getLogger(__name__)


def worker_id(role: str) -> str:
    """A worker id unique across hosts and restarts: ``ROLE@HOST/PID/RANDOM`` (no PHI)."""
    return f"{role}@{socket.gethostname()[:64]}/{os.getpid()}/{secrets.token_hex(4)}"


def dead_local_workers(workers: Collection[str]) -> list[str]:
    """The workers of ``workers`` that ran on this host in a process that no longer exists
    (their leases can end now rather than at expiry). A worker of another host is never called
    dead here: only its lease's expiry says so."""
    host = socket.gethostname()[:64]
    dead = []
    for worker in workers:
        where = worker.partition("@")[2].split("/")
        if len(where) != 3 or where[0] != host or not where[1].isdigit() or int(where[1]) == os.getpid():
            continue
        try:
            os.kill(int(where[1]), 0)
        except ProcessLookupError:
            dead.append(worker)
        except PermissionError:  # alive, another user's
            continue
    return dead


class Heartbeat:
    """Renews the leases of ``worker`` every ``lease_s / 3`` seconds on a daemon thread.

    Parameters
    ----------
    index
        The ledger.
    worker
        The worker id (:func:`worker_id`) whose leases to renew.
    lease_s
        The lease length in seconds (``node.lease_s``).
    held
        The ids of the jobs the worker is running now (only those are renewed: a job whose run
        ended without releasing it lapses and is offered again).
    """

    def __init__(self, index: Index, worker: str, lease_s: float, held: Callable[[], Collection[int]]) -> None:
        self.index, self.worker, self.lease_s, self.held = index, worker, lease_s, held
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ainode-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        """Start renewing; returns ``self``."""
        self._thread.start()
        return self

    def beat(self) -> int:
        """Renew now; returns how many leases were renewed (0 when the ledger is unreachable)."""
        try:
            return self.index.renew_leases(self.worker, self.held(), self.lease_s)
        except AinodeError as exc:  # the next beat retries; a lease that lapses meanwhile is fenced
            logger.warning("lease heartbeat failed: %s", exc)
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            self.beat()

    def stop(self) -> None:
        """Stop renewing (the leases then lapse unless released)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
