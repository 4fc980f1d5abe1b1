"""The read queries behind the console and ``/metrics``: one place, so both show the same counts.

- A **dead letter** is a job in state ``failed`` (:data:`DEAD_LETTER`): dead-lettered after its
  last attempt, or failed at once for a permanent reason — either way it waits for an
  administrator (``jobs retry``).
- A **listing** of studies or jobs is filtered one way (:class:`Listing`): state, a route or
  algorithm (of a study's jobs), a time window, a page.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from node.storage.index import Index
from node.storage.tables import AssociationRow, InstanceRow, JobRow, JobState, StudyRow

DEAD_LETTER = JobRow.state == JobState.FAILED
"""The one definition of a dead letter (see the module docstring)."""


@dataclass(frozen=True)
class Listing:
    """How a list of studies or jobs is filtered and paged.

    ``since``/``until`` are epoch seconds: when a study was received, when a job was created.
    """

    state: str | None = None
    route: str | None = None
    algorithm: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100
    offset: int = 0

    def applied(self, query: Any, state: Any, ends: Any, begins: Any) -> Any:
        """``query`` with the state and time window applied: ``state`` equals :attr:`state`, the
        ``ends`` column at or after :attr:`since`, the ``begins`` column at or before :attr:`until`."""
        if self.state:
            query = query.where(state == self.state)
        if self.since is not None:
            query = query.where(ends >= self.since)
        if self.until is not None:
            query = query.where(begins <= self.until)
        return query


@dataclass(frozen=True)
class StudyListed:
    """A study and the (state, route, algorithm) of each of its jobs."""

    row: StudyRow
    jobs: list[tuple[str, str, str]]


@dataclass(frozen=True)
class Counts:
    """What the dashboard and ``/metrics`` both show."""

    studies: dict[str, int]
    jobs: dict[str, int]
    dead_letters: int
    leases_held: int
    failed_attempts: int
    instances: int
    stored_objects: int
    """Encrypted objects the index names: instances, pseudonym maps, results."""
    pending_routes: dict[str, int] = field(default_factory=dict)
    """Pending jobs by route."""


class Reports:
    """The read-only queries of the console and the metrics over the index."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def studies(self, listing: Listing) -> list[StudyListed]:
        """Studies, most recently received first, as ``listing`` filters them."""
        query = listing.applied(select(StudyRow).order_by(StudyRow.last_received_at.desc()), StudyRow.state,
                                StudyRow.last_received_at, StudyRow.first_received_at)  # fmt: skip
        if listing.route or listing.algorithm:
            query = query.where(StudyRow.study_key.in_(self._job_filter(select(JobRow.study_key), listing)))
        with self.index.session() as s:
            return self._with_jobs(s, list(s.scalars(query.limit(listing.limit).offset(listing.offset))))

    def study(self, study_key: str) -> StudyListed | None:
        """One study with its jobs' states, routes and algorithms."""
        with self.index.session() as s:
            row = s.get(StudyRow, study_key)
            return None if row is None else self._with_jobs(s, [row])[0]

    def studies_by_lookup_key(self, attribute: str, key: str) -> list[StudyListed]:
        """Studies whose Patient ID (``attribute`` ``"PatientID"``) or Accession Number has the
        keyed digest ``key``."""
        column = StudyRow.patient_key if attribute == "PatientID" else StudyRow.accession_key
        with self.index.session() as s:
            return self._with_jobs(s, list(s.scalars(select(StudyRow).where(column == key))))

    def study_of_series(self, series_key: str) -> tuple[StudyRow, list[tuple[str, int]]] | None:
        """The study holding the series ``series_key`` and, for each of its series, one instance's
        object id and the series' instance count; ``None`` when no such series is stored."""
        with self.index.session() as s:
            first = s.scalars(select(InstanceRow).where(InstanceRow.series_key == series_key).limit(1)).first()
            study = s.get(StudyRow, first.study_key) if first is not None else None
            if first is None or study is None:
                return None
            rows = s.execute(
                select(func.min(InstanceRow.object_id), func.count())
                .where(InstanceRow.study_key == first.study_key).group_by(InstanceRow.series_key)
            ).all()  # fmt: skip
        return study, [(str(object_id), int(n)) for object_id, n in rows]

    @staticmethod
    def _with_jobs(s: Any, rows: list[StudyRow]) -> list[StudyListed]:
        keys = [r.study_key for r in rows]
        jobs: dict[str, list[tuple[str, str, str]]] = {}
        if keys:
            query = select(JobRow.study_key, JobRow.state, JobRow.route, JobRow.algorithm)
            for key, state, route, algorithm in s.execute(query.where(JobRow.study_key.in_(keys))):
                jobs.setdefault(key, []).append((state, route, algorithm))
        return [StudyListed(r, jobs.get(r.study_key, [])) for r in rows]

    @staticmethod
    def _job_filter(query: Any, listing: Listing) -> Any:
        for column, value in ((JobRow.route, listing.route), (JobRow.algorithm, listing.algorithm)):
            if value:
                query = query.where(column == value)
        return query

    def jobs(self, listing: Listing) -> list[JobRow]:
        """Jobs, newest first, as ``listing`` filters them."""
        query = self._job_filter(select(JobRow).order_by(JobRow.id.desc()), listing)
        query = listing.applied(query, JobRow.state, JobRow.created_at, JobRow.created_at)
        with self.index.session() as s:
            return list(s.scalars(query.limit(listing.limit).offset(listing.offset)))

    def series(self, study_key: str | None = None, limit: int = 200) -> list[tuple[str, str, str, int, float]]:
        """Stored series ``(study key, series key, SOP class UID, instances, first received)``, of
        one study or the most recent ``limit`` of all."""
        query = (
            select(InstanceRow.study_key, InstanceRow.series_key, func.min(InstanceRow.sop_class_uid),
                   func.count(), func.min(InstanceRow.received_at))
            .group_by(InstanceRow.study_key, InstanceRow.series_key)
            .order_by(func.min(InstanceRow.received_at).desc())
            .limit(limit)
        )  # fmt: skip
        if study_key is not None:
            query = query.where(InstanceRow.study_key == study_key)
        with self.index.session() as s:
            return [tuple(row) for row in s.execute(query)]  # type: ignore[misc]

    def counts(self, now: float | None = None) -> Counts:
        """The counts the dashboard and ``/metrics`` share (see :class:`Counts`)."""
        now = time.time() if now is None else now
        with self.index.session() as s:
            studies = dict(s.execute(select(StudyRow.state, func.count()).group_by(StudyRow.state)).all())
            jobs = dict(s.execute(select(JobRow.state, func.count()).group_by(JobRow.state)).all())
            pending = s.execute(
                select(JobRow.route, func.count()).where(JobRow.state == JobState.PENDING).group_by(JobRow.route)
            ).all()
            dead = s.scalar(select(func.count()).where(DEAD_LETTER)) or 0
            leases = s.scalar(select(func.count()).where(JobRow.state == JobState.RUNNING,
                                                         JobRow.lease_expires_at > now)) or 0  # fmt: skip
            attempts = s.scalar(select(func.coalesce(func.sum(JobRow.attempts), 0))) or 0
            instances = s.scalar(select(func.count()).select_from(InstanceRow)) or 0
            maps = s.scalar(select(func.count()).where(StudyRow.map_object_id.is_not(None))) or 0
            results = sum(len(json.loads(ids)) for ids in s.scalars(select(JobRow.result_object_ids)) if ids != "[]")
        return Counts(
            studies={str(k): int(v) for k, v in studies.items()}, jobs={str(k): int(v) for k, v in jobs.items()},
            dead_letters=int(dead), leases_held=int(leases), failed_attempts=int(attempts), instances=int(instances),
            stored_objects=int(instances + maps + results), pending_routes={str(r): int(n) for r, n in pending},
        )  # fmt: skip

    def dead_letters(self, limit: int | None = None) -> list[JobRow]:
        """The dead letters, most recent first."""
        query = select(JobRow).where(DEAD_LETTER).order_by(JobRow.updated_at.desc())
        with self.index.session() as s:
            return list(s.scalars(query.limit(limit) if limit is not None else query))

    def jobs_in(self, states: Sequence[str]) -> list[JobRow]:
        """Every job in one of ``states``."""
        with self.index.session() as s:
            return list(s.scalars(select(JobRow).where(JobRow.state.in_(list(states)))))

    def traffic(self, since: float) -> tuple[int, int, int, int]:
        """Since ``since`` (epoch s): associations accepted, associations rejected, instances
        received and their bytes."""
        with self.index.session() as s:
            accepted = s.scalar(select(func.count()).where(AssociationRow.ended_at >= since,
                                                           AssociationRow.outcome != "rejected")) or 0  # fmt: skip
            rejected = s.scalar(select(func.count()).where(AssociationRow.ended_at >= since,
                                                           AssociationRow.outcome == "rejected")) or 0  # fmt: skip
            instances, size = s.execute(
                select(func.count(), func.coalesce(func.sum(InstanceRow.size), 0)).where(
                    InstanceRow.received_at >= since
                )
            ).one()
        return int(accepted), int(rejected), int(instances), int(size)

    def received_by_calling_ae(self) -> list[tuple[str, int]]:
        """Instances indexed, by the calling AE title of their study."""
        with self.index.session() as s:
            return [(str(a), int(n)) for a, n in s.execute(
                select(StudyRow.calling_ae_title, func.count(InstanceRow.object_id))
                .join(InstanceRow, InstanceRow.study_key == StudyRow.study_key)
                .group_by(StudyRow.calling_ae_title)
            )]  # fmt: skip

    def associations(self) -> tuple[list[Any], list[Any]]:
        """Associations by (calling AE title, outcome) with their count, instances stored and bytes;
        and ``(calling AE title, refused statuses JSON)`` of those that refused instances."""
        with self.index.session() as s:
            grouped = s.execute(
                select(AssociationRow.calling_ae_title, AssociationRow.outcome, func.count(),
                       func.coalesce(func.sum(AssociationRow.instances_stored), 0),
                       func.coalesce(func.sum(AssociationRow.bytes_received), 0))
                .group_by(AssociationRow.calling_ae_title, AssociationRow.outcome)
            ).all()  # fmt: skip
            refusals = s.execute(
                select(AssociationRow.calling_ae_title, AssociationRow.refused_statuses)
                .where(AssociationRow.instances_refused > 0)
            ).all()  # fmt: skip
        return list(grouped), list(refusals)

    def delivered_timings(self) -> list[tuple[str, float, float]]:
        """``(timings JSON, study's last instance received, job planned)`` of every delivered job."""
        with self.index.session() as s:
            return [tuple(r) for r in s.execute(  # type: ignore[misc]
                select(JobRow.timings, StudyRow.last_received_at, JobRow.created_at)
                .join(StudyRow, StudyRow.study_key == JobRow.study_key)
                .where(JobRow.state.in_([JobState.DELIVERED, JobState.SUPERSEDED]))
            )]  # fmt: skip
