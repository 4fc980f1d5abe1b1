"""De-identification of a series in worker processes (PS3.15 Annex E, :mod:`node.deid`): the
job's process decrypts each stored instance and hands its encoding to a pool of processes that
decode, de-identify and encode it again; the job's process decodes what comes back, for the next
stages, and keeps the encoding for the store (:class:`node.jobs.series.SeriesWrite`), so it is not
encoded twice. pydicom's work is pure Python: one process per core, not threads.

Instances go in chunks, a bounded number of chunks in flight, and come back in order; a series
too small to gain (fewer than :data:`POOL_MIN_INSTANCES`) is de-identified in the job's process.
A pool whose worker died (e.g. killed for memory) is replaced, and the series is done in the
job's process.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from pydicom import Dataset

from node.deid import InstanceDeidentifier
from node.deid.pseudonyms import Pseudonymizer
from node.dicomio import decode, encode
from node.errors import AinodeError, InvalidInstanceError
from node.jobs.isolation import PROCESS_CONTEXT
from node.settings.config import Deidentification

logger = logging.getLogger(__name__)

POOL_MIN_INSTANCES = 32
"""A series with fewer instances is de-identified in the job's process."""
CHUNK = 16
"""Instances per task sent to a worker."""
IN_FLIGHT = 4
"""Chunks sent and not yet taken back (bounds the memory of instances in transit)."""


@dataclass
class Deidentified:
    """One instance de-identified: the data set (decoded from ``encoded``), its PS3.10 encoding
    and the UID mappings made (pseudonym -> original)."""

    dataset: Dataset
    encoded: bytes | None
    uid_map: dict[str, str]


def _deidentify_chunk(payloads: list[bytes], pseudonyms: Pseudonymizer, profile: Deidentification) -> list[Outcome]:
    """In a worker: each instance decoded, de-identified and encoded, or the error it raised."""
    deid = InstanceDeidentifier(pseudonyms, profile)
    out: list[Outcome] = []
    for payload in payloads:
        try:
            ds = decode(payload)
            uid_map = deid(ds).uid_map
            out.append((encode(ds), uid_map))
        except AinodeError as exc:  # unreadable, quarantined, missing identity: the job's process decides
            out.append(exc)
    return out


def _ready() -> int:
    return os.getpid()


class DeidentificationPool:
    """Worker processes (one per core the node may use, at least two) de-identifying series.

    Parameters
    ----------
    workers
        Processes in the pool (default: the cores this process may run on).
    """

    def __init__(self, workers: int | None = None) -> None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.workers = workers or max(2, cores)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the worker processes now (the first series does not wait for them)."""
        pool = self._executor()
        for future in [pool.submit(_ready) for _ in range(self.workers)]:
            future.result()

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.workers, mp_context=PROCESS_CONTEXT)
            return self._pool

    def _replace(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def shutdown(self) -> None:
        """Stop the worker processes."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def deidentify(
        self,
        payloads: Iterable[bytes | None],
        count: int,
        pseudonyms: Pseudonymizer,
        profile: Deidentification,
        unreadable: Callable[[int, AinodeError], None],
    ) -> Iterator[Deidentified | None]:
        """The ``count`` instances (PS3.10 encodings, read as they are needed; ``None`` for one
        that could not be read) de-identified, in order; ``None`` for an instance that cannot be
        decoded (``unreadable(position, error)`` is told).

        Raises
        ------
        DeidentificationError, QuarantinedError
            As :class:`node.deid.InstanceDeidentifier` raises them for an instance.
        PoolBroken
            A worker died: nothing yielded so far is to be used; de-identify the series again
            (:func:`deidentify_here`). The pool is replaced for the next series.
        """
        if count < POOL_MIN_INSTANCES:
            yield from deidentify_here(payloads, pseudonyms, profile, unreadable)
            return
        try:
            yield from self._pooled(payloads, pseudonyms, profile, unreadable)
        except BrokenProcessPool as exc:
            logger.warning("de-identification worker lost (%s): the series is de-identified again", exc)
            self._replace()
            raise PoolBroken(str(exc)) from None

    def _pooled(
        self,
        payloads: Iterable[bytes | None],
        pseudonyms: Pseudonymizer,
        profile: Deidentification,
        unreadable: Callable[[int, AinodeError], None],
    ) -> Iterator[Deidentified | None]:
        pool = self._executor()
        pending: deque[tuple[list[int | None], Future[list[Outcome]]]] = deque()
        chunk: list[int | None] = []  # positions (None: nothing could be read there)
        sent: list[bytes] = []

        def take() -> Iterator[Deidentified | None]:
            positions, future = pending.popleft()
            outcomes = iter(future.result())
            for position in positions:
                yield None if position is None else _outcome(position, next(outcomes), unreadable)

        for position, payload in enumerate(payloads):
            chunk.append(None if payload is None else position)
            if payload is not None:
                sent.append(payload)
            if len(sent) == CHUNK:
                pending.append((chunk, pool.submit(_deidentify_chunk, sent, pseudonyms, profile)))
                chunk, sent = [], []
                while len(pending) >= IN_FLIGHT:
                    yield from take()
        if chunk:
            pending.append((chunk, pool.submit(_deidentify_chunk, sent, pseudonyms, profile)))
        while pending:
            yield from take()


class PoolBroken(AinodeError):
    """A de-identification worker died mid-series."""


Outcome = tuple[bytes, dict[str, str]] | AinodeError


def _outcome(position: int, outcome: Outcome, unreadable: Callable[[int, AinodeError], None]) -> Deidentified | None:
    if isinstance(outcome, InvalidInstanceError):
        unreadable(position, outcome)
        return None
    if isinstance(outcome, AinodeError):
        raise outcome
    encoded, uid_map = outcome
    return Deidentified(decode(encoded), encoded, uid_map)


def deidentify_here(
    payloads: Iterable[bytes | None],
    pseudonyms: Pseudonymizer,
    profile: Deidentification,
    unreadable: Callable[[int, AinodeError], None],
) -> Iterator[Deidentified | None]:
    """What :meth:`DeidentificationPool.deidentify` gives, done in this process (the data sets
    de-identified in place; no encoding kept)."""
    deid = InstanceDeidentifier(pseudonyms, profile)
    for position, payload in enumerate(payloads):
        if payload is None:
            yield None
            continue
        try:
            ds = decode(payload)
        except InvalidInstanceError as exc:
            unreadable(position, exc)
            yield None
            continue
        yield Deidentified(ds, None, deid(ds).uid_map)
