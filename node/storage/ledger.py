"""The job ledger: jobs planned, claimed under leases, renewed, fenced, offered again, recorded.

A ``running`` job is held by one worker under a lease (``worker``, ``lease_expires_at``) that the
worker's heartbeat renews (:class:`node.jobs.leases.Heartbeat`); every write the holder makes is
fenced by it (:meth:`Ledger.update_held_job`), and a job whose lease expired is offered again
(:meth:`Ledger.reoffer_expired`). Every claim is recorded in ``job_claims``. Claims are atomic
across processes and hosts: one conditional UPDATE (PostgreSQL re-checks its condition on the
locked row; SQLite has one writer), ``FOR UPDATE SKIP LOCKED`` where rows are swept.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from node import faults
from node.storage.tables import ClaimRow, JobRow, JobState, PlannedJob, Stage, StudyRow, StudyState


class Ledger:
    """The job methods of :class:`node.storage.index.Index`."""

    if TYPE_CHECKING:

        def session(self) -> AbstractContextManager[Session]:
            """A transaction (see :meth:`node.storage.index.Index.session`)."""
            ...

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
        values = _json_columns(values)
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
        values = _json_columns(values)
        values["updated_at"] = time.time()
        with self.session() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id).values(**values))


def _json_columns(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the job's JSON columns (result and stage object ids, timings) encoded."""
    return {k: json.dumps(v) if k in JSON_COLUMNS and not isinstance(v, str) else v for k, v in values.items()}


JSON_COLUMNS = ("result_object_ids", "timings", "stage_object_ids")
