"""The index of received instances, studies and jobs (SQLAlchemy; SQLite by default).

The index holds no PHI: UIDs appear only as keyed digests (``NodeSecrets.index_key(uid)``),
and everything identifying stays inside encrypted objects. The same schema runs on PostgreSQL
when a site scales out (``database_url``). Its tables and life cycles are in
:mod:`node.storage.tables`, the job ledger's methods in :mod:`node.storage.ledger`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, bindparam, case, create_engine, delete, event, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from node.errors import IndexUnavailableError, StorageError
from node.storage import schema
from node.storage.accounts import Accounts
from node.storage.ledger import Ledger
from node.storage.records import ModelRecords
from node.storage.tables import (
    STAGE_PREFIX,
    Base,
    ClaimRow,
    InstanceRow,
    JobRow,
    JobState,
    PlannedJob,
    Stage,
    StudyRow,
    StudyState,
    job_of_stage_object,
    stage_object_id,
)

__all__ = [
    "STAGE_PREFIX", "Base", "ClaimRow", "Index", "InstanceKeys", "InstanceRow", "JobRow", "JobState", "NewInstance",
    "PlannedJob",
    "Stage", "StudyRow", "StudyState", "default_url", "first_of_series", "job_of_stage_object", "stage_object_id",
]  # fmt: skip


INSTANCE_COLUMNS = (
    "object_id", "sop_key", "study_key", "series_key", "sop_class_uid", "transfer_syntax_uid", "size", "received_at",
)  # fmt: skip


@dataclass(frozen=True)
class InstanceKeys:
    """An instance row to insert, without the ORM (built on every C-STORE): the columns of
    :class:`InstanceRow`."""

    object_id: str
    sop_key: str
    study_key: str
    series_key: str
    sop_class_uid: str
    transfer_syntax_uid: str
    size: int
    received_at: float


@dataclass(frozen=True)
class _BatchSql:
    insert_studies: Any
    existing: Any
    insert_instances: Any
    count_instances: Any
    touch_study: Any


@dataclass(frozen=True)
class NewInstance:
    """A stored instance to index: its row, who sent it, and its study's lookup digests."""

    row: InstanceRow | InstanceKeys
    calling_ae_title: str
    patient_key: str | None = None
    accession_key: str | None = None


def first_of_series(instances: list[InstanceRow]) -> dict[str, InstanceRow]:
    """The first of ``instances`` (as :meth:`Index.instances` lists them) of each series key: the
    instance whose header routes the series."""
    first: dict[str, InstanceRow] = {}
    for row in instances:
        first.setdefault(row.series_key, row)
    return first


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


class Index(Ledger, Accounts, ModelRecords):
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
        self._batch: _BatchSql | None = None

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

    def add_instance(
        self, row: InstanceRow, calling_ae_title: str, patient_key: str | None = None, accession_key: str | None = None
    ) -> bool:
        """Index a stored instance and touch its study; a late instance re-opens the study.

        ``patient_key`` and ``accession_key`` (keyed digests, :meth:`NodeSecrets.lookup_key`) are
        recorded on the study when it has none yet. Returns ``False`` (and changes nothing) when
        the SOP instance is already indexed. Several associations may deliver one study at the
        same moment: when two create the study (or the same instance) at once, the loser retries
        and finds the winner's row.

        Raises
        ------
        StorageError
            The index could not record the instance.
        """
        return self.add_instances([NewInstance(row, calling_ae_title, patient_key, accession_key)])[0]

    def add_instances(self, new: Sequence[NewInstance]) -> list[bool]:
        """Index stored instances in one transaction (the batching writer's call, one commit and
        one sync for all); returns, for each, whether it was indexed (``False``: its SOP instance
        was indexed already, the first copy stays). Studies are touched as :meth:`add_instance`
        does, once each.

        Raises
        ------
        IndexUnavailableError
            The index is locked or unreachable (transient: the caller tries again).
        StorageError
            The index could not record the instances.
        """
        for _attempt in range(3):
            try:
                return self._add_instances(new)
            except IntegrityError:
                continue  # another process created one of the studies at the same moment
            except OperationalError as exc:
                raise IndexUnavailableError(f"index unavailable: {_first_line(exc)}") from None
        raise StorageError("index: could not record the instances after concurrent updates")

    def _add_instances(self, new: Sequence[NewInstance]) -> list[bool]:
        # statements built once and executed with many parameter sets (their compiled form is
        # cached): this runs for every received instance
        sql = self._batch_sql()
        first: dict[str, NewInstance] = {}
        for item in new:
            first.setdefault(item.row.study_key, item)
        with self.engine.begin() as conn:
            conn.execute(sql.insert_studies, [
                {"study_key": key, "state": StudyState.RECEIVING, "calling_ae_title": item.calling_ae_title,
                 "first_received_at": item.row.received_at, "last_received_at": item.row.received_at,
                 "instance_count": 0, "generation": 1, "updated_at": item.row.received_at,
                 "patient_key": item.patient_key, "accession_key": item.accession_key}
                for key, item in first.items()
            ])  # fmt: skip
            existing = set(conn.scalars(sql.existing, {"keys": [item.row.sop_key for item in new]}))
            added: list[bool] = []
            for item in new:  # the first copy of a SOP instance stays, also within the batch
                added.append(item.row.sop_key not in existing)
                existing.add(item.row.sop_key)
            rows = [item.row for item, ok in zip(new, added, strict=True) if ok]
            if rows:
                conn.execute(sql.insert_instances, [
                    {c: getattr(row, c) for c in INSTANCE_COLUMNS} for row in rows
                ])  # fmt: skip
            touched: dict[str, dict[str, Any]] = {}
            for item, ok in zip(new, added, strict=True):
                t = touched.setdefault(item.row.study_key, {
                    "key": item.row.study_key, "n": 0, "now": item.row.received_at,
                    "patient": first[item.row.study_key].patient_key,
                    "accession": first[item.row.study_key].accession_key,
                })  # fmt: skip
                t["n"] += int(ok)
                t["now"] = max(t["now"], item.row.received_at)
            if any(t["n"] for t in touched.values()):
                conn.execute(sql.count_instances, [t for t in touched.values() if t["n"]])
            if any(not t["n"] for t in touched.values()):
                conn.execute(sql.touch_study, [t for t in touched.values() if not t["n"]])
        return added

    def _batch_sql(self) -> _BatchSql:
        if self._batch is None:
            studies, instances = cast(Table, StudyRow.__table__), cast(Table, InstanceRow.__table__)
            this_study = studies.c.study_key == bindparam("key")
            now: Any = bindparam("now")
            later = case((studies.c.last_received_at < now, now), else_=studies.c.last_received_at)
            reopened = studies.c.state != StudyState.RECEIVING  # a late instance: the next generation
            self._batch = _BatchSql(
                insert_studies=self._insert_ignoring_conflicts(studies),
                existing=select(instances.c.sop_key).where(instances.c.sop_key.in_(bindparam("keys", expanding=True))),
                insert_instances=insert(instances),
                count_instances=update(studies).where(this_study).values(
                    generation=studies.c.generation + case((reopened, 1), else_=0), state=StudyState.RECEIVING,
                    instance_count=studies.c.instance_count + bindparam("n"), last_received_at=later, updated_at=now,
                    patient_key=func.coalesce(studies.c.patient_key, bindparam("patient")),
                    accession_key=func.coalesce(studies.c.accession_key, bindparam("accession")),
                ),
                touch_study=update(studies).where(this_study).values(last_received_at=later),
            )  # fmt: skip
        return self._batch

    def indexed_object_ids(self, prefix: str) -> set[str]:
        """Object ids of indexed instances starting with ``prefix`` (one segment's, say)."""
        with self.session() as s:
            return set(s.scalars(select(InstanceRow.object_id).where(InstanceRow.object_id.startswith(prefix))))

    def _insert_ignoring_conflicts(self, table: Any) -> Any:
        """``INSERT ... ON CONFLICT DO NOTHING`` in the engine's dialect (SQLite or PostgreSQL)."""
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(table).on_conflict_do_nothing()

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

    def next_quiet_at(self, quiet_s: float, now: float | None = None) -> float | None:
        """When (``time.time()`` seconds) the next study still receiving, and not yet quiet, will
        have been quiet for ``quiet_s`` seconds; ``None`` when there is none."""
        now = time.time() if now is None else now
        with self.session() as s:
            last = s.scalar(
                select(func.min(StudyRow.last_received_at)).where(
                    StudyRow.state == StudyState.RECEIVING, StudyRow.last_received_at > now - quiet_s
                )
            )
        return None if last is None else float(last) + quiet_s

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

    def reopen_study(self, study_key: str) -> int | None:
        """Re-open a study that has left ``receiving``/``complete`` as its next generation, so the
        scheduler plans it again (an administrator's re-run); returns the new generation, or
        ``None`` when the study is missing or still receiving."""
        with self.session() as s:
            study = s.get(StudyRow, study_key, with_for_update=True)
            if study is None or study.state in (StudyState.RECEIVING, StudyState.COMPLETE):
                return None
            study.generation += 1
            study.state, study.reason, study.updated_at = StudyState.RECEIVING, "re-run requested", time.time()
            return study.generation

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

    def held_sop_keys(self, sop_keys: Sequence[str]) -> set[str]:
        """Which of these keyed SOP Instance UIDs the index names (instances stored durably)."""
        if not sop_keys:
            return set()
        with self.session() as s:
            return set(s.scalars(select(InstanceRow.sop_key).where(InstanceRow.sop_key.in_(list(sop_keys)))))

    def all_instances(self) -> list[InstanceRow]:
        """Every received instance the index names (for the integrity check)."""
        with self.session() as s:
            return list(s.scalars(select(InstanceRow).order_by(InstanceRow.object_id)))

    def remove_instance(self, object_id: str) -> InstanceRow | None:
        """Forget a received instance whose stored record is damaged or missing (its study is
        then analysed without it); returns the row that was removed."""
        with self.session() as s:
            row = s.get(InstanceRow, object_id)
            if row is None:
                return None
            s.delete(row)
            s.execute(update(StudyRow).where(StudyRow.study_key == row.study_key)
                      .values(instance_count=StudyRow.instance_count - 1))  # fmt: skip
            return row

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


def _first_line(exc: BaseException) -> str:
    """The driver's message without SQLAlchemy's statement and parameters (which hold keys)."""
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).splitlines()[0]
