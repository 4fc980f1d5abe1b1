"""Read ahead: a routed study's instances read, decoded and de-identified while its quiet period
runs out.

A study is planned once no instance has come for its routes' quiet period; its job's first stage
then reads every instance of the series (the store's record and its authenticated decryption),
decodes it and de-identifies it (PS3.15 Annex E) — at 500 CT slices 1.6-3 s on this project's
2-core machines. :class:`ReadAhead` does that work in the last seconds of the quiet period
instead: a study still receiving whose quiet period has at most :data:`LEAD_S` left (and that has
been quiet at least :data:`LULL_S`) is routed as the planner will route it, and the instances of
the series its routes take are read into memory in the order the job reads them, each
de-identified under its series' profile when the routes give that series one profile; the job
takes each one, once (:meth:`ReadAhead.take`), instead of doing that work.

Nothing else changes: the same function de-identifies the same decoded instance under the same
profile and pseudonym secret, which the job checks (:func:`profile_fingerprint`). An instance the
read-ahead did not reach, could not read or de-identify (the job does, and deals with a damaged
record or a quarantined image as before), de-identified under another profile or secret (the
configuration was reloaded), or whose row changed since (another size or receipt time) is read by
the job; a study that gets another instance is read again once quiet. What is held is bounded
(:data:`MAX_BYTES` of encoded instances), dropped :data:`KEEP_S` after it was read unless taken,
and only ever in the node's memory, as the job's own copy is (the store stays the only copy at
rest). Only the embedded executor reads ahead: with Celery the jobs run elsewhere.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pydicom import Dataset

from node.deid import InstanceDeidentifier
from node.deid.pseudonyms import Pseudonymizer
from node.deid.reid import PseudonymMap
from node.dicomio import decode
from node.routing.router import plan_routes
from node.settings.config import Deidentification
from node.storage.index import InstanceRow, StudyState, first_of_series
from node.storage.secrets import PSEUDONYM_SECRET

if TYPE_CHECKING:
    from node.settings.config import Settings
    from node.storage.index import Index
    from node.storage.secrets import NodeSecrets
    from node.storage.store import ObjectStore


class Services(Protocol):
    """What the read-ahead uses of the pipeline's services (:class:`node.jobs.stages.Services`)."""

    index: Index
    store: ObjectStore
    secrets: NodeSecrets
    clock: Callable[[], float]

    @property
    def settings(self) -> Settings:
        """The configuration in force now."""
        ...


logger = logging.getLogger(__name__)

LULL_S = 0.1
"""A study is read ahead no sooner than this after its last instance; the reading stops when
another comes (within :data:`CHECK_EVERY` instances): a study still arriving is left to its
receivers, which share this process's interpreter."""
LEAD_S = 5.0
"""How long before its quiet period ends a study is read ahead (about what reading and
de-identifying 1,500 CT instances takes on this project's machines)."""
MAX_BYTES = 512 * 2**20
"""Encoded instances held at most (a 500-slice CT series is about 263 MB); beyond it the job reads."""
MAX_INSTANCE_BYTES = 32 * 2**20
"""A larger instance (a big multi-frame object) is left to its job, and a study that one would be
routed by to the planner: read here, it would only be held longer."""
KEEP_S = LEAD_S + 60.0
"""An instance not taken this long after it was read is dropped (its study was not planned: an
expected series is missing, a late instance re-opened it, or its routes changed)."""
POLL_S = 0.1
"""How often the index is asked for studies to read ahead."""
CHECK_EVERY = 16
"""Instances read between checks that the study is still quiet and unplanned (once planned, its
job reads what is left; once another instance comes, the reading waits for the next lull)."""


def profile_fingerprint(secret: bytes, profile: Deidentification) -> str:
    """What an instance was de-identified under: the pseudonym ``secret`` and the ``profile``
    (a digest of both; the secret cannot be read back from it)."""
    return hashlib.sha256(secret + profile.model_dump_json().encode()).hexdigest()


@dataclass(frozen=True)
class Prepared:
    """An instance as read ahead: decoded and, when ``deidentified`` (a
    :func:`profile_fingerprint`), de-identified in place, ``uid_map`` then holding the UIDs it
    replaced (pseudonym -> original) and ``originals`` the study's attributes captured before."""

    dataset: Dataset
    deidentified: str | None = None
    uid_map: dict[str, str] = field(default_factory=dict)
    originals: PseudonymMap | None = None


@dataclass(frozen=True)
class _Entry:
    prepared: Prepared
    size: int
    received_at: float
    read_at: float


@dataclass
class _Plan:
    instances: int
    profiles: dict[str, Deidentification | None]
    """Per series the routes take, its de-identification profile (``None``: several)."""
    quiet_period_s: float


class ReadAhead:
    """Reads routed studies' instances ahead of their jobs (see the module docstring).

    Parameters
    ----------
    services
        The pipeline's services (:class:`node.jobs.stages.Services`): index, store, settings.
    headers
        One decoded header (no pixels) per series key of the given instance rows, as the planner
        routes them.
    clock
        Monotonic seconds, when entries were read (a test's); the index's times are the
        services' clock.
    """

    def __init__(
        self,
        services: Services,
        headers: Callable[[list[InstanceRow]], dict[str, Dataset]],
        *,
        max_bytes: int = MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.s = services
        self._headers = headers
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self._plans: dict[str, _Plan] = {}

    @property
    def held_bytes(self) -> int:
        """Encoded bytes of the instances held now."""
        with self._lock:
            return self._bytes

    def take(self, row: InstanceRow) -> Prepared | None:
        """The instance of ``row`` as read ahead (handed over once), or ``None``: not read ahead,
        or its row has changed since."""
        with self._lock:
            entry = self._entries.pop(row.object_id, None)
            if entry is not None:
                self._bytes -= entry.size
        if entry is None or entry.size != row.size or entry.received_at != row.received_at:
            return None
        return entry.prepared

    def run(self, stop: threading.Event, poll_s: float = POLL_S) -> None:
        """Read ahead every ``poll_s`` until ``stop`` is set (a thread's target)."""
        failing = ""
        while not stop.wait(poll_s):
            try:
                self.read_once(stop)
                failing = ""
            except Exception as exc:  # the thread's boundary (an index unavailable): the jobs read as before
                if type(exc).__name__ != failing:  # once, not every poll
                    failing = type(exc).__name__
                    logger.warning("read-ahead paused (%s); jobs read their instances themselves", failing)

    def read_once(self, stop: threading.Event | None = None) -> int:
        """One pass: drop what expired, then read ahead the instances of every study due
        (:data:`LEAD_S`, :data:`LULL_S`); returns how many were read."""
        self._expire()
        settings = self.s.settings
        periods = [route.completion.quiet_period_s for route in settings.routes]
        if not periods:
            return 0
        index, now = self.s.index, self.s.clock()
        candidates = set(index.quiet_studies(max(LULL_S, min(periods) - LEAD_S), now))
        self._plans = {key: plan for key, plan in self._plans.items() if key in candidates}
        read = 0
        for study_key in sorted(candidates):
            study = index.study(study_key)
            if study is None or study.state != StudyState.RECEIVING:
                continue
            rows = index.instances(study_key)
            plan = self._plan(study_key, rows, study.calling_ae_title)
            if now - study.last_received_at < max(LULL_S, plan.quiet_period_s - LEAD_S):
                continue
            wanted = [r for r in rows if r.series_key in plan.profiles]
            read += self._read(study_key, study.last_received_at, wanted, plan, stop)
        return read

    def _plan(self, study_key: str, rows: list[InstanceRow], calling_ae_title: str) -> _Plan:
        """The series the study's routes take, their profiles and the routes' longest quiet period
        (as of ``rows``)."""
        plan = self._plans.get(study_key)
        if plan is None or plan.instances != len(rows):
            first = first_of_series(rows).values()  # whose headers route it
            if any(row.size > MAX_INSTANCE_BYTES for row in first):  # read whole to route: left to the planner
                plan = self._plans[study_key] = _Plan(len(rows), {}, 0.0)
                return plan
            settings = self.s.settings
            plans = plan_routes(settings, self._headers(rows), calling_ae_title, settings.node.ae_title)
            profiles: dict[str, set[str]] = {}
            for p in plans:
                for key in p.series_keys:
                    profiles.setdefault(key, set()).add(p.route.deidentification)
            plan = _Plan(
                len(rows),
                {key: settings.deidentification[next(iter(names))] if len(names) == 1 else None
                 for key, names in profiles.items()},
                max((p.route.completion.quiet_period_s for p in plans), default=0.0),
            )  # fmt: skip
            self._plans[study_key] = plan
        return plan

    def _read(
        self, study_key: str, last_received_at: float, rows: list[InstanceRow], plan: _Plan,
        stop: threading.Event | None,
    ) -> int:  # fmt: skip
        """Read, decode and de-identify ``rows`` not yet held, in order, while there is room, the
        study is unplanned and nothing came since ``last_received_at``; returns how many were read."""
        read = tried = 0
        secret = self.s.secrets.get(PSEUDONYM_SECRET)
        deidentifiers: dict[str, tuple[str, InstanceDeidentifier]] = {}
        for row in rows:
            if row.size > MAX_INSTANCE_BYTES:
                continue
            with self._lock:
                if row.object_id in self._entries:
                    continue
                if self._bytes + row.size > self.max_bytes:
                    return read
            tried += 1
            if tried > 1 and tried % CHECK_EVERY == 1:  # after every CHECK_EVERY instances
                study = self.s.index.study(study_key)
                if (
                    (stop is not None and stop.is_set()) or study is None or study.state != StudyState.RECEIVING
                    or study.last_received_at != last_received_at
                ):  # fmt: skip
                    return read
            try:
                dataset = decode(self.s.store.get(row.object_id))
                profile = plan.profiles[row.series_key]
                if profile is None:
                    prepared = Prepared(dataset)
                else:
                    if row.series_key not in deidentifiers:
                        pseudonyms = Pseudonymizer(secret, PSEUDONYM_SECRET)
                        deidentifiers[row.series_key] = (
                            profile_fingerprint(secret, profile), InstanceDeidentifier(pseudonyms, profile)
                        )  # fmt: skip
                    fingerprint, deidentify = deidentifiers[row.series_key]
                    originals = PseudonymMap.capture(PSEUDONYM_SECRET, dataset)
                    prepared = Prepared(dataset, fingerprint, deidentify(dataset).uid_map, originals)
            except Exception as exc:  # damaged, gone, quarantined, malformed: the job does it and deals with it
                logger.debug("not read ahead (%s)", type(exc).__name__, extra={"study_key": study_key})
                continue
            with self._lock:
                self._entries[row.object_id] = _Entry(prepared, row.size, row.received_at, self._clock())
                self._bytes += row.size
            read += 1
        if read:
            logger.debug("read ahead", extra={"study_key": study_key, "instances": read})
        return read

    def _expire(self) -> None:
        """Drop what was read more than :data:`KEEP_S` ago."""
        cutoff = self._clock() - KEEP_S
        with self._lock:
            for object_id in [k for k, e in self._entries.items() if e.read_at < cutoff]:
                self._bytes -= self._entries.pop(object_id).size
