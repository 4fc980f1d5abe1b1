"""The index of received instances, studies and jobs (SQLAlchemy; SQLite by default).

The index holds no PHI: UIDs appear only as keyed digests (``NodeSecrets.index_key(uid)``),
and everything identifying stays inside encrypted objects. The same schema runs on PostgreSQL
when a site scales out (``database_url``).

Study states (PS3 has no such thing; this is ainode's own life cycle)::

    receiving -> complete -> processing -> done
                                      \\-> no_match | failed
    (a late instance moves any state back to receiving and bumps ``generation``)

Job states (the ledger)::

    pending -> running -> delivered | refused | quarantined | failed
                  \\-> pending (retry after backoff; lease expired)   failed = dead letter

A ``running`` job is held by one worker under a lease (``worker``, ``lease_expires_at``) that the
worker's heartbeat renews; every write the holder makes is fenced by it, and a job whose lease
expired is offered again (:meth:`Index.reoffer_expired`). Every claim is recorded in
``job_claims``. A job runs as stages (:class:`Stage`) whose outputs are objects in the store.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    Float,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    and_,
    case,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from node import faults
from node.errors import IndexUnavailableError, StorageError
from node.storage import schema


class StudyState(enum.StrEnum):
    """Life cycle of a study inside the node."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    PROCESSING = "processing"
    DONE = "done"
    NO_MATCH = "no_match"
    FAILED = "failed"


class JobState(enum.StrEnum):
    """Life cycle of one (route, algorithm, series) job."""

    PENDING = "pending"
    RUNNING = "running"
    DELIVERED = "delivered"
    REFUSED = "refused"
    QUARANTINED = "quarantined"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class Stage(enum.StrEnum):
    """The stages of a job, in order; each one's outputs are stored before the next begins."""

    DEIDENTIFY = "deidentify"
    ANALYSE = "analyse"
    BUILD = "build"
    DELIVER = "deliver"
    DONE = "done"


class Base(DeclarativeBase):
    """Declarative base of the index tables."""


class StudyRow(Base):
    """One study, keyed by the keyed digest of its Study Instance UID."""

    __tablename__ = "studies"
    study_key: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True, default=StudyState.RECEIVING)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    first_received_at: Mapped[float] = mapped_column(Float)
    last_received_at: Mapped[float] = mapped_column(Float, index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    map_object_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)


class InstanceRow(Base):
    """One received SOP instance; its encoded bytes are the encrypted object ``object_id``."""

    __tablename__ = "instances"
    object_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    sop_key: Mapped[str] = mapped_column(String(32), unique=True)
    study_key: Mapped[str] = mapped_column(ForeignKey("studies.study_key"), index=True)
    series_key: Mapped[str] = mapped_column(String(32), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[float] = mapped_column(Float)


class JobRow(Base):
    """One unit of analysis: an algorithm of a route on one series (or study) of a study."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_key: Mapped[str] = mapped_column(ForeignKey("studies.study_key"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    route: Mapped[str] = mapped_column(String(64))
    algorithm: Mapped[str] = mapped_column(String(64))
    series_key: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True, default=JobState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    result_object_ids: Mapped[str] = mapped_column(Text, default="[]")
    timings: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    route_snapshot: Mapped[str | None] = mapped_column(Text, nullable=True)
    config_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    stage: Mapped[str] = mapped_column(String(16), default=Stage.DEIDENTIFY, server_default=Stage.DEIDENTIFY.value)
    stage_object_ids: Mapped[str] = mapped_column(Text, default="{}", server_default="{}")

    @property
    def result_ids(self) -> list[str]:
        """Object ids of the encrypted result objects (SEG, SR, GSPS, SC) built for this job."""
        ids: list[str] = json.loads(self.result_object_ids)
        return ids

    @property
    def stage_outputs(self) -> dict[str, list[str]]:
        """Object ids of the stored outputs of each finished stage, by stage name."""
        outputs: dict[str, list[str]] = json.loads(self.stage_object_ids)
        return outputs


class ClaimRow(Base):
    """One claim of a job by a worker: when, for which stage, until when, and how it ended
    (``None`` while held; ``released``, ``expired``, ``lost``)."""

    __tablename__ = "job_claims"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    worker: Mapped[str] = mapped_column(String(128))
    stage: Mapped[str] = mapped_column(String(16))
    claimed_at: Mapped[float] = mapped_column(Float)
    lease_expires_at: Mapped[float] = mapped_column(Float)
    released_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)


STAGE_PREFIX = "s"
"""Object ids of stage outputs start with this (random object ids are hex): a crash sweep can tell
them from received instances."""


def stage_object_id(job: JobRow, name: str, number: int) -> str:
    """The object id of output ``number`` of stage ``name`` of ``job``: the same on every run of
    the stage, unique per job row (its id and creation time), free of PHI."""
    return f"{STAGE_PREFIX}{job.id}-{round(job.created_at * 1e6):x}-{name}{number}"


def job_of_stage_object(object_id: str) -> int | None:
    """The job id a stage output belongs to, or ``None`` when ``object_id`` is no stage output."""
    head = object_id[len(STAGE_PREFIX) :].split("-", 1)[0] if object_id.startswith(STAGE_PREFIX) else ""
    return int(head) if head.isdigit() else None


def default_url(data_dir: Path) -> str:
    """The embedded index: SQLite in the data directory."""
    return f"sqlite:///{data_dir / 'index.sqlite'}"


def _sqlite_pragmas(busy_timeout_s: float) -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.close()

    return on_connect


@dataclass(frozen=True)
class PlannedJob:
    """A job to create when a study is planned: (route, algorithm, series), with the snapshot of
    what the route needs (JSON) and the digest of the configuration it was planned with."""

    route: str
    algorithm: str
    series_key: str
    route_snapshot: str | None = None
    config_digest: str | None = None


class Index:
    """Access to the index database.

    Parameters
    ----------
    url
        SQLAlchemy URL; ``sqlite:///DATA_DIR/index.sqlite`` by default (see :meth:`for_data_dir`).
    busy_timeout_s
        How long a statement waits for another process's lock before
        :class:`~node.errors.IndexUnavailableError` (transient) is raised.

    Raises
    ------
    IndexSchemaError
        The database's schema revision is not this release's (see :mod:`node.storage.schema`).
    """

    def __init__(self, url: str, busy_timeout_s: float = 30.0) -> None:
        self.engine: Engine = create_engine(url)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas(busy_timeout_s))
        schema.check(self.engine)  # an empty index is created; another revision is refused
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def for_data_dir(cls, data_dir: Path, busy_timeout_s: float = 30.0, url: str | None = None) -> Index:
        """The index at ``url``, by default the embedded SQLite index inside ``data_dir``."""
        return cls(url or default_url(data_dir), busy_timeout_s)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on error.

        Raises
        ------
        IndexUnavailableError
            The database is locked by another process (past the busy timeout) or unreachable.
        """
        try:
            with self._sessions.begin() as session:
                yield session
        except OperationalError as exc:
            raise IndexUnavailableError(f"index unavailable: {_first_line(exc)}") from None

    # -- receiving -----------------------------------------------------------------------------

    def add_instance(self, row: InstanceRow, calling_ae_title: str) -> bool:
        """Index a stored instance and touch its study; a late instance re-opens the study.

        Returns ``False`` (and changes nothing) when the SOP instance is already indexed. Several
        associations may deliver one study at the same moment: when two create the study (or the
        same instance) at once, the loser retries and finds the winner's row.

        Raises
        ------
        StorageError
            The index could not record the instance.
        """
        for _attempt in range(3):
            try:
                return self._add_instance(row, calling_ae_title)
            except IntegrityError:
                continue  # a concurrent association inserted the same study or instance first
            except OperationalError as exc:
                raise IndexUnavailableError(f"index unavailable: {_first_line(exc)}") from None
        raise StorageError("index: could not record the instance after concurrent updates")

    def _insert_ignoring_conflicts(self, table: Any) -> Any:
        """``INSERT ... ON CONFLICT DO NOTHING`` in the engine's dialect (SQLite or PostgreSQL)."""
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(table).on_conflict_do_nothing()

    def _add_instance(self, row: InstanceRow, calling_ae_title: str) -> bool:
        # Core statements, three per instance: this runs on every C-STORE, before Success.
        now = row.received_at
        studies, instances = cast(Table, StudyRow.__table__), cast(Table, InstanceRow.__table__)
        this_study = studies.c.study_key == row.study_key
        with self.engine.begin() as conn:
            conn.execute(
                self._insert_ignoring_conflicts(studies).values(
                    study_key=row.study_key, state=StudyState.RECEIVING, calling_ae_title=calling_ae_title,
                    first_received_at=now, last_received_at=now, instance_count=0, generation=1, updated_at=now,
                )
            )  # fmt: skip
            added = (  # RETURNING, not rowcount: psycopg reports no rowcount for a skipped conflict
                conn.execute(
                    self._insert_ignoring_conflicts(instances)
                    .values({c.name: getattr(row, c.name) for c in instances.columns})
                    .returning(instances.c.object_id)
                ).first()
                is not None
            )
            later = case((studies.c.last_received_at < now, now), else_=studies.c.last_received_at)
            if not added:  # the SOP instance is already indexed: the first copy stays
                conn.execute(update(studies).where(this_study).values(last_received_at=later))
                return False
            # one statement, not read-modify-write: other associations update the same row; a
            # late instance re-opens a study that had moved on (next generation)
            reopened = studies.c.state != StudyState.RECEIVING
            conn.execute(
                update(studies)
                .where(this_study)
                .values(
                    generation=studies.c.generation + case((reopened, 1), else_=0),
                    state=StudyState.RECEIVING,
                    instance_count=studies.c.instance_count + 1,
                    last_received_at=later,
                    updated_at=now,
                )
            )
        return True

    # -- scheduling ----------------------------------------------------------------------------

    def quiet_studies(self, quiet_s: float, now: float | None = None) -> list[str]:
        """Keys of studies still receiving whose last instance is older than ``quiet_s`` seconds."""
        now = time.time() if now is None else now
        with self.session() as s:
            rows = s.scalars(
                select(StudyRow.study_key).where(
                    StudyRow.state == StudyState.RECEIVING, StudyRow.last_received_at <= now - quiet_s
                )
            )
            return list(rows)

    def receiving_since(self, first_before: float) -> list[str]:
        """Keys of studies still receiving whose first instance came before ``first_before``."""
        with self.session() as s:
            query = select(StudyRow.study_key).where(
                StudyRow.state == StudyState.RECEIVING, StudyRow.first_received_at <= first_before
            )
            return list(s.scalars(query))

    def set_study_state(
        self, study_key: str, state: StudyState, reason: str | None = None, expect: StudyState | None = None
    ) -> bool:
        """Move a study to ``state``; with ``expect``, only if it is in that state (returns success)."""
        with self.session() as s:
            query = update(StudyRow).where(StudyRow.study_key == study_key)
            if expect is not None:
                query = query.where(StudyRow.state == expect)
            result = s.execute(query.values(state=state, reason=reason, updated_at=time.time()))
            return bool(getattr(result, "rowcount", 0))

    def study(self, study_key: str) -> StudyRow | None:
        """The study row, or ``None``."""
        with self.session() as s:
            return s.get(StudyRow, study_key)

    def studies(self, state: StudyState | None = None) -> list[StudyRow]:
        """All studies, optionally only those in ``state``."""
        with self.session() as s:
            query = select(StudyRow).order_by(StudyRow.first_received_at)
            if state is not None:
                query = query.where(StudyRow.state == state)
            return list(s.scalars(query))

    def instances(self, study_key: str) -> list[InstanceRow]:
        """Instances of a study in order of arrival."""
        with self.session() as s:
            query = select(InstanceRow).where(InstanceRow.study_key == study_key).order_by(InstanceRow.received_at)
            return list(s.scalars(query))

    def set_map_object(self, study_key: str, object_id: str, expect: str | None) -> bool:
        """Record the encrypted pseudonym map of a study if the recorded one is still ``expect``
        (compare and swap); returns whether it was recorded. The caller deletes the replaced map
        (or, when this returns ``False``, its own), so no orphan map stays in the store."""
        with self.session() as s:
            result = s.execute(
                update(StudyRow)
                .where(StudyRow.study_key == study_key, StudyRow.map_object_id.is_(None) if expect is None
                       else StudyRow.map_object_id == expect)
                .values(map_object_id=object_id)
            )  # fmt: skip
            return bool(getattr(result, "rowcount", 0))

    def delete_study(self, study_key: str) -> list[str]:
        """Remove a study, its instances and jobs from the index; return every object id they named
        (instances, pseudonym map, results, stage outputs) so the caller can delete them from the store.

        Raises
        ------
        StorageError
            A job of the study is running under a live lease (a worker is on it): purge it once
            the job has ended. The job rows are locked meanwhile, so no worker claims one.
        """
        with self.session() as s:
            study = s.get(StudyRow, study_key)
            if study is None:
                return []
            now = time.time()
            held = s.scalars(
                select(JobRow)
                .where(JobRow.study_key == study_key, JobRow.state == JobState.RUNNING, JobRow.lease_expires_at > now)
                .with_for_update()
            ).first()
            if held is not None:
                raise StorageError(
                    f"study {study_key}: job {held.id} is running on {held.worker} (lease for another "
                    f"{(held.lease_expires_at or now) - now:.0f} s); purge the study once it has ended"
                )
            ids = [r.object_id for r in s.scalars(select(InstanceRow).where(InstanceRow.study_key == study_key))]
            for job in s.scalars(select(JobRow).where(JobRow.study_key == study_key)):
                ids += job.result_ids
                ids += [oid for outputs in job.stage_outputs.values() for oid in outputs]
                s.execute(delete(ClaimRow).where(ClaimRow.job_id == job.id))
                s.delete(job)
            if study.map_object_id:
                ids.append(study.map_object_id)
            for row in s.scalars(select(InstanceRow).where(InstanceRow.study_key == study_key)):
                s.delete(row)
            s.delete(study)
            return ids

    def referenced_object_ids(self) -> set[str]:
        """Every object id the index names: instances, pseudonym maps and job results."""
        with self.session() as s:
            ids = set(s.scalars(select(InstanceRow.object_id)))
            ids |= {m for m in s.scalars(select(StudyRow.map_object_id)) if m}
            for results, outputs in s.execute(select(JobRow.result_object_ids, JobRow.stage_object_ids)):
                ids.update(json.loads(results))
                ids.update(oid for stage in json.loads(outputs).values() for oid in stage)
            return ids

    def expired_studies(self, before: float) -> list[str]:
        """Studies finished (done, no match, failed) and last changed before ``before`` (epoch s)."""
        finished = (StudyState.DONE, StudyState.NO_MATCH)
        with self.session() as s:
            query = select(StudyRow.study_key).where(StudyRow.state.in_(finished), StudyRow.updated_at < before)
            return list(s.scalars(query))

    # -- jobs ----------------------------------------------------------------------------------

    def plan_study(
        self, study_key: str, generation: int, planned: list[PlannedJob], done_reason: str | None
    ) -> list[int] | None:
        """Plan a study in one transaction: it leaves ``receiving`` for ``processing`` with its jobs
        (or for ``done``/``no_match`` when there is nothing to run), or nothing changes at all.

        Parameters
        ----------
        generation
            The generation the plan was made for; a late instance that bumped it meanwhile makes
            the plan void.
        done_reason
            With no ``planned`` jobs: the reason of a ``done`` study (routes matched, nothing to
            run), or ``None`` for ``no_match``.

        Returns
        -------
        list of int or None
            The new job ids ([] when nothing is to run), or ``None`` when the study was no longer
            ``receiving`` at that generation.
        """
        now = time.time()
        with self.session() as s:
            if planned:
                state, reason = StudyState.PROCESSING, None
            elif done_reason is not None:
                state, reason = StudyState.DONE, done_reason
            else:
                state, reason = StudyState.NO_MATCH, "no route matched"
            moved = s.execute(
                update(StudyRow)
                .where(
                    StudyRow.study_key == study_key,
                    StudyRow.state == StudyState.RECEIVING,
                    StudyRow.generation == generation,
                )
                .values(state=state, reason=reason, updated_at=now)
            )
            if not getattr(moved, "rowcount", 0):
                return None
            jobs = [
                JobRow(
                    study_key=study_key, generation=generation, route=p.route, algorithm=p.algorithm,
                    series_key=p.series_key, state=JobState.PENDING, created_at=now, updated_at=now,
                    route_snapshot=p.route_snapshot, config_digest=p.config_digest, stage=Stage.DEIDENTIFY,
                )
                for p in planned
            ]  # fmt: skip
            s.add_all(jobs)
            s.flush()
            faults.point("plan:jobs-inserted", index=self)
            return [job.id for job in jobs]

    def claim_due_jobs(self, now: float, limit: int | None = None) -> list[JobRow]:
        """Pending jobs whose retry time has come; their retry time is cleared (claimed).

        Atomic across processes: on PostgreSQL the rows are locked ``FOR UPDATE SKIP LOCKED`` (a
        concurrent claimer skips them); SQLite has one writer at a time. A job is claimed once.
        """
        with self.session() as s:
            query = (
                select(JobRow)
                .where(
                    JobRow.state == JobState.PENDING, JobRow.next_attempt_at.is_not(None),
                    JobRow.next_attempt_at <= now,
                )
                .order_by(JobRow.next_attempt_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )  # fmt: skip
            jobs = list(s.scalars(query))
            for job in jobs:
                job.next_attempt_at = None
            return jobs

    # -- the ledger: leases ----------------------------------------------------------------------

    def claim_job(self, job_id: int, worker: str, lease_s: float, now: float | None = None) -> JobRow | None:
        """Take the lease of a job for ``worker`` if it is claimable: ``pending`` (and its retry
        time, if any, has come), ``running`` under an expired lease, or already ``worker``'s (a
        worker runs a job once at a time itself: :class:`~node.jobs.pipeline.Pipeline`). One conditional UPDATE, so
        of concurrent claimers exactly one wins (PostgreSQL re-checks the condition on the locked
        row; SQLite has one writer). The claim is recorded in ``job_claims``.

        Returns
        -------
        JobRow or None
            The job as claimed (``running``, held by ``worker`` until ``lease_expires_at``), or
            ``None`` when it is finished, held under a live lease, waiting for a retry or gone.
        """
        now = time.time() if now is None else now
        due = or_(JobRow.next_attempt_at.is_(None), JobRow.next_attempt_at <= now)
        lapsed = or_(JobRow.lease_expires_at.is_(None), JobRow.lease_expires_at < now)
        mine_or_lapsed = or_(lapsed, JobRow.worker == worker)
        # taking over a lapsed lease counts the dead holder's run as a failed attempt
        takeover = case((and_(JobRow.state == JobState.RUNNING, JobRow.worker.is_distinct_from(worker)), 1), else_=0)
        claimable = or_(
            and_(JobRow.state == JobState.PENDING, due), and_(JobRow.state == JobState.RUNNING, mine_or_lapsed)
        )
        with self.session() as s:
            won = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, claimable)
                .values(state=JobState.RUNNING, worker=worker, lease_expires_at=now + lease_s,
                        next_attempt_at=None, updated_at=now, attempts=JobRow.attempts + takeover)
                .returning(JobRow.stage)
            ).first()  # fmt: skip
            if won is None:
                return None
            s.execute(  # a claim of an expired lease ends the previous holder's claim
                update(ClaimRow)
                .where(ClaimRow.job_id == job_id, ClaimRow.released_at.is_(None))
                .values(released_at=now, outcome=case((ClaimRow.worker == worker, "reclaimed"), else_="expired"))
            )
            s.add(ClaimRow(job_id=job_id, worker=worker, stage=won[0], claimed_at=now, lease_expires_at=now + lease_s))
        return self.job(job_id)

    def renew_leases(self, worker: str, job_ids: Collection[int], lease_s: float, now: float | None = None) -> int:
        """The heartbeat: extend ``worker``'s leases of ``job_ids`` (the jobs it is running) to
        ``now + lease_s``; returns how many it still held."""
        if not job_ids:
            return 0
        now = time.time() if now is None else now
        with self.session() as s:
            held = (JobRow.worker == worker, JobRow.state == JobState.RUNNING, JobRow.id.in_(list(job_ids)))
            renewed = s.execute(update(JobRow).where(*held).values(lease_expires_at=now + lease_s))
            s.execute(
                update(ClaimRow)
                .where(ClaimRow.worker == worker, ClaimRow.released_at.is_(None), ClaimRow.job_id.in_(list(job_ids)))
                .values(lease_expires_at=now + lease_s)
            )
            return int(getattr(renewed, "rowcount", 0) or 0)

    def expire_leases(self, workers: Collection[str]) -> int:
        """End the leases of ``workers`` now (known dead: a process of this host that is gone), so
        their jobs are offered again at once; returns how many jobs they held."""
        if not workers:
            return 0
        with self.session() as s:
            query = update(JobRow).where(JobRow.state == JobState.RUNNING, JobRow.worker.in_(list(workers)))
            return int(getattr(s.execute(query.values(lease_expires_at=0.0)), "rowcount", 0) or 0)

    def lease_holders(self) -> set[str]:
        """Workers holding a lease on a running job."""
        with self.session() as s:
            query = select(JobRow.worker).where(JobRow.state == JobState.RUNNING, JobRow.worker.is_not(None))
            return {w for w in s.scalars(query.distinct()) if w}

    def update_held_job(self, job_id: int, worker: str, release: str | None = None, **values: Any) -> bool:
        """Set columns of a job ``worker`` holds (fenced: nothing changes when the lease was lost to
        another worker); with ``release`` (the claim's outcome), the lease ends too.

        Returns
        -------
        bool
            Whether ``worker`` still held the job (and the values were written).
        """
        for key in ("result_object_ids", "timings", "stage_object_ids"):
            if key in values and not isinstance(values[key], str):
                values[key] = json.dumps(values[key])
        now = values["updated_at"] = time.time()
        if release is not None:
            values.update(worker=None, lease_expires_at=None)
        with self.session() as s:
            done = s.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.worker == worker, JobRow.state == JobState.RUNNING)
                .values(**values)
            )  # fmt: skip
            if not getattr(done, "rowcount", 0):
                return False
            if release is not None:
                s.execute(
                    update(ClaimRow)
                    .where(ClaimRow.job_id == job_id, ClaimRow.worker == worker, ClaimRow.released_at.is_(None))
                    .values(released_at=now, outcome=release)
                )
            return True

    def reoffer_expired(self, max_attempts: int, now: float | None = None) -> list[JobRow]:
        """Offer again the ``running`` jobs whose lease expired (their worker died or lost the
        database): each becomes ``pending`` with the crash counted as a failed attempt, or
        ``failed`` (dead letter) after ``max_attempts``. Rows are locked ``FOR UPDATE SKIP
        LOCKED``, so several nodes sweeping at once offer each job once.

        Returns
        -------
        list of JobRow
            The jobs made ``pending`` again (to submit).
        """
        now = time.time() if now is None else now
        offered = []
        with self.session() as s:
            query = (
                select(JobRow)
                .where(JobRow.state == JobState.RUNNING,
                       or_(JobRow.lease_expires_at.is_(None), JobRow.lease_expires_at < now))
                .with_for_update(skip_locked=True)
            )  # fmt: skip
            for job in s.scalars(query):
                holder = job.worker or "a worker of an earlier release"
                job.attempts += 1
                if job.attempts >= max_attempts:
                    job.state = JobState.FAILED
                    job.reason = f"dead letter: the lease of {holder} expired {job.attempts} time(s)"
                else:
                    job.state = JobState.PENDING
                    job.reason = f"the lease of {holder} expired (attempt {job.attempts}); offered again"
                    offered.append(job)
                job.worker, job.lease_expires_at, job.updated_at = None, None, now
                s.execute(
                    update(ClaimRow)
                    .where(ClaimRow.job_id == job.id, ClaimRow.released_at.is_(None))
                    .values(released_at=now, outcome="expired")
                )
        return offered

    def stale_pending(self, before: float) -> list[JobRow]:
        """Jobs ``pending`` (not waiting for a retry time) and unchanged since ``before``: their
        message to a worker may have been lost (a broker restarted); sending again is harmless."""
        with self.session() as s:
            query = select(JobRow).where(
                JobRow.state == JobState.PENDING, JobRow.next_attempt_at.is_(None), JobRow.updated_at < before
            )
            return list(s.scalars(query.order_by(JobRow.id)))

    def claims(self, job_id: int | None = None) -> list[ClaimRow]:
        """The ledger's record of claims (of one job, or all), in order."""
        with self.session() as s:
            query = select(ClaimRow).order_by(ClaimRow.id)
            if job_id is not None:
                query = query.where(ClaimRow.job_id == job_id)
            return list(s.scalars(query))

    def count_jobs(self, state: JobState) -> int:
        """How many jobs are in ``state``."""
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(JobRow).where(JobRow.state == state)) or 0)

    def job(self, job_id: int) -> JobRow | None:
        """The job row, or ``None``."""
        with self.session() as s:
            return s.get(JobRow, job_id)

    def jobs(self, study_key: str | None = None, state: JobState | None = None) -> list[JobRow]:
        """Jobs, optionally of one study and/or in one state, oldest first."""
        with self.session() as s:
            query = select(JobRow).order_by(JobRow.id)
            if study_key is not None:
                query = query.where(JobRow.study_key == study_key)
            if state is not None:
                query = query.where(JobRow.state == state)
            return list(s.scalars(query))

    def update_job(self, job_id: int, **values: Any) -> None:
        """Set columns of a job (``state``, ``reason``, ``attempts``, ``result_object_ids``, ...)."""
        for key in ("result_object_ids", "timings"):
            if key in values and not isinstance(values[key], str):
                values[key] = json.dumps(values[key])
        values["updated_at"] = time.time()
        with self.session() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id).values(**values))


def _first_line(exc: BaseException) -> str:
    """The driver's message without SQLAlchemy's statement and parameters (which hold keys)."""
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).splitlines()[0]
