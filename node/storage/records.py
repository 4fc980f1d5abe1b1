"""What each model saw and said, the readers' rejections and the drift baselines, in the index
(the :mod:`node.monitoring` layer computes with them; a fleet shares them).

Nothing here is PHI: models, versions, routes, outcomes, descriptors of the input series
(manufacturer, kernel, slice thickness, ...), summaries of the outputs (volumes, HU statistics),
and result objects and rejection notes only as keyed digests of their SOP Instance UIDs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from node.storage.tables import BaselineRow, CommitmentRow, ModelRecordRow, RejectionRow, ResultKeyRow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


class ModelRecords:
    """The monitoring methods of :class:`node.storage.index.Index`."""

    if TYPE_CHECKING:

        def session(self) -> AbstractContextManager[Session]:
            """A transaction (see :meth:`node.storage.index.Index.session`)."""
            ...

    def record_model_run(self, job_id: int, **values: Any) -> None:
        """Create or update the record of ``job_id`` (the columns of :class:`ModelRecordRow`;
        a new record needs route, algorithm, model, version, role and outcome)."""
        with self.session() as s:
            row = s.get(ModelRecordRow, job_id)
            if row is None:
                values.setdefault("recorded_at", time.time())
                values.setdefault("inputs", "{}")
                values.setdefault("outputs", "{}")
                s.add(ModelRecordRow(job_id=job_id, **values))
                return
            for key, value in values.items():
                setattr(row, key, value)

    def model_record(self, job_id: int) -> ModelRecordRow | None:
        """The record of ``job_id``, or ``None``."""
        with self.session() as s:
            return s.get(ModelRecordRow, job_id)

    def model_records(
        self, model: str | None = None, version: str | None = None, role: str | None = None
    ) -> list[ModelRecordRow]:
        """Records, oldest first, of one model (and version, role) or of all."""
        query = select(ModelRecordRow).order_by(ModelRecordRow.recorded_at, ModelRecordRow.job_id)
        if model is not None:
            query = query.where(ModelRecordRow.model == model)
        if version is not None:
            query = query.where(ModelRecordRow.version == version)
        if role is not None:
            query = query.where(ModelRecordRow.role == role)
        with self.session() as s:
            return list(s.scalars(query))

    def add_result_keys(self, job_id: int, sop_keys: Iterable[str]) -> None:
        """Remember which job built the result objects with these keyed SOP Instance UIDs."""
        with self.session() as s:
            for key in sop_keys:
                row = s.get(ResultKeyRow, key)
                if row is None:
                    s.add(ResultKeyRow(sop_key=key, job_id=job_id))
                else:
                    row.job_id = job_id

    def jobs_of_results(self, sop_keys: Sequence[str]) -> dict[str, int]:
        """Keyed SOP Instance UID -> the job that built that result object, for those known."""
        if not sop_keys:
            return {}
        with self.session() as s:
            rows = s.execute(
                select(ResultKeyRow.sop_key, ResultKeyRow.job_id).where(ResultKeyRow.sop_key.in_(sop_keys))
            )
            return {key: job_id for key, job_id in rows}

    def add_rejection(self, row: RejectionRow) -> bool:
        """Record a rejection; ``False`` when this note already rejected this job."""
        try:
            with self.session() as s:
                s.add(row)
        except IntegrityError:
            return False
        return True

    def rejections(self, model: str | None = None) -> list[RejectionRow]:
        """Rejections, oldest first (of one model, or of all)."""
        query = select(RejectionRow).order_by(RejectionRow.received_at)
        if model is not None:
            query = query.where(RejectionRow.model == model)
        with self.session() as s:
            return list(s.scalars(query))

    def set_baseline(self, model: str, version: str, start: float, end: float) -> None:
        """Make ``[start, end]`` (epoch seconds) the reference window of ``model`` ``version``."""
        with self.session() as s:
            row = s.get(BaselineRow, (model, version))
            if row is None:
                s.add(BaselineRow(model=model, version=version, start=start, end=end, set_at=time.time()))
            else:
                row.start, row.end, row.set_at = start, end, time.time()

    def add_commitment(self, transaction_uid: str, peer: str, requested: int) -> None:
        """Remember a storage commitment asked of ``peer`` for ``requested`` instances."""
        with self.session() as s:
            s.add(CommitmentRow(transaction_uid=transaction_uid, peer=peer, requested=requested,
                                requested_at=time.time()))  # fmt: skip

    def record_commitment_report(self, transaction_uid: str, peer: str, committed: int, failures: list[str]) -> bool:
        """Record ``peer``'s report on a transaction; ``False`` when no such transaction was asked
        of that peer (a stray or forged report changes nothing)."""
        with self.session() as s:
            row = s.get(CommitmentRow, transaction_uid)
            if row is None or row.peer != peer:
                return False
            row.reported_at, row.committed, row.failures = time.time(), committed, json.dumps(failures)
            return True

    def commitment(self, transaction_uid: str) -> CommitmentRow | None:
        """A storage commitment asked for, with its report once it came."""
        with self.session() as s:
            return s.get(CommitmentRow, transaction_uid)

    def baselines(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(model, version) -> the reference window set for it."""
        with self.session() as s:
            return {(r.model, r.version): (r.start, r.end) for r in s.scalars(select(BaselineRow))}
