"""The work done on a complete study: route, then run each job's stages.

:meth:`Pipeline.plan` turns a quiet study into jobs (one per route, algorithm and series) with
the snapshot of their route; :meth:`Pipeline.run_job` claims a job in the ledger and runs its
stages (:mod:`node.jobs.stages`) from where it stands. Both are functions of ids in the index and
objects in the encrypted store, so any executor (in-process threads, Celery workers) can run
them, a stage can be re-run after a crash, and a job can move between workers between stages.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Collection
from typing import Any

from pydicom import Dataset

from ainode_sdk import errors as sdk
from node import faults
from node.dicomio import decode
from node.errors import AinodeError, ConfigError, LeaseLostError, OutOfResourcesError, QuarantinedError, is_transient
from node.jobs.snapshot import JobPlan
from node.jobs.stages import Services, Stages, rounded
from node.monitoring.compare import compare_shadows
from node.routing.canary import CANARY_SECRET, serving
from node.routing.router import completion_due, plan_routes
from node.storage.index import InstanceRow, JobRow, JobState, PlannedJob, Stage, StudyState, first_of_series

__all__ = ["FINISHED_JOB_STATES", "HANDED_OFF", "Pipeline", "Services"]

logger = logging.getLogger(__name__)

FINISHED_JOB_STATES = (JobState.DELIVERED, JobState.REFUSED, JobState.QUARANTINED, JobState.SUPERSEDED)
HANDED_OFF = "handed-off"
"""What :meth:`Pipeline.run_job` returns when the job's next stage belongs to another queue."""
NEXT_STAGE = {Stage.DEIDENTIFY: Stage.ANALYSE, Stage.ANALYSE: Stage.BUILD, Stage.BUILD: Stage.DELIVER}


class Pipeline:
    """Plans and runs the jobs of complete studies."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self.stages = Stages(services)
        self._running: set[int] = set()
        self._running_lock = threading.Lock()

    def running(self) -> list[int]:
        """Ids of the jobs this pipeline is running now (what its heartbeat renews)."""
        with self._running_lock:
            return list(self._running)

    # -- planning --------------------------------------------------------------------------------

    def headers(self, instances: list[InstanceRow]) -> dict[str, Dataset]:
        """One decoded header (no pixels) per series key: its first instance's (:func:`first_of_series`)."""
        return {
            key: decode(self.s.store.get(row.object_id), stop_before_pixels=True)
            for key, row in first_of_series(instances).items()
        }

    def plan(self, study_key: str) -> list[int]:
        """Route a quiet study and create its jobs; returns their ids ([] if it is not yet due).

        The study becomes ``processing`` (jobs created), ``done`` (routes matched, nothing to run),
        ``no_match`` (no route matched) in one transaction, or stays ``receiving`` when a matched
        route's quiet period has not yet passed. A crash at any point leaves it either unplanned
        (planned again after restart) or fully planned.

        Raises
        ------
        AinodeError
            The study's headers or the index cannot be read; transient ones
            (:func:`node.errors.is_transient`) are worth retrying.
        """
        study = self.s.index.study(study_key)
        if study is None or study.state != StudyState.RECEIVING:
            return []
        instances = self.s.index.instances(study_key)
        headers = self.headers(instances)
        plans = plan_routes(self.s.settings, headers, study.calling_ae_title, self.s.settings.node.ae_title)
        if plans and not completion_due(
            plans, headers, study.first_received_at, study.last_received_at, self.s.clock()
        ):
            return []
        settings = self.s.settings
        canaries = any(ref.canary is not None for plan in plans for ref in plan.route.algorithms)
        canary_key = self.s.secrets.get(CANARY_SECRET) if canaries else b""  # no write when none is needed
        planned = [
            PlannedJob(
                plan.route.name, served, series_key, JobPlan.of(settings, plan.route, served).to_json(),
                settings.digest,
            )
            for plan in plans
            for series_key in plan.series_keys
            for served in [
                *(serving(canary_key, study_key, plan.route.name, ref) for ref in plan.route.algorithms),
                *(shadow.algorithm for shadow in plan.route.shadow),
            ]
        ]  # fmt: skip
        faults.point("plan:routed", index=self.s.index)
        done_reason = f"matched {', '.join(p.route.name for p in plans)}: nothing to run" if plans else None
        jobs = self.s.index.plan_study(study_key, study.generation, planned, done_reason)
        if jobs is None:
            return []  # a late instance re-opened it meanwhile
        faults.point("plan:committed", index=self.s.index)
        if jobs:
            logger.info("study complete: %d job(s)", len(jobs), extra={"study_key": study_key})
        else:
            logger.info("study needs no analysis", extra={"study_key": study_key, "routes": len(plans)})
        return jobs

    # -- running ---------------------------------------------------------------------------------

    def stage_queue(self, job: JobRow, stage: str | None = None) -> str:
        """The Celery queue of the job's ``stage`` (default: its current one; analyse: per algorithm,
        ``celery.analyse_queues``)."""
        celery = self.s.settings.celery
        return celery.analyse_queue(job.algorithm) if (stage or job.stage) == Stage.ANALYSE else celery.queue

    def run_job(self, job_id: int, queues: Collection[str] | None = None) -> str:
        """Claim a job and run its stages from the one it is at, until it ends or (with ``queues``)
        its next stage belongs to a queue this worker does not serve.

        Returns
        -------
        str
            The job's state (``delivered``, ``refused``, ``failed``, ``pending`` for a retry, ...),
            :data:`HANDED_OFF` when the next stage waits for another queue, or ``running`` when
            another worker holds the job (nothing was done).
        """
        with self._running_lock:
            if job_id in self._running:  # submitted twice: the run under way is the one
                return JobState.RUNNING
            self._running.add(job_id)
        try:
            return self._claim_and_run(job_id, queues)
        finally:
            self.stages.forget(job_id)
            with self._running_lock:
                self._running.discard(job_id)

    def _claim_and_run(self, job_id: int, queues: Collection[str] | None) -> str:
        job = self.s.index.job(job_id)
        if job is None or job.state in FINISHED_JOB_STATES:
            return job.state if job else JobState.FAILED
        claimed = self.s.index.claim_job(job_id, self.s.worker, self.s.settings.node.lease_s)
        if claimed is None:  # held under a live lease, waiting for its retry time, or finished
            return job.state
        job = claimed
        faults.point("job:running", index=self.s.index)
        extra = {"study_key": job.study_key, "job_id": job_id, "algorithm": job.algorithm, "stage": job.stage}
        timings: dict[str, float] = json.loads(job.timings)
        try:
            state = self._run_stages(job, timings, queues)
            if state in (HANDED_OFF, JobState.SUPERSEDED):
                return state
        except LeaseLostError:
            logger.warning("lease lost: another worker has taken the job over", extra=extra)
            return JobState.RUNNING
        except QuarantinedError as exc:
            state = self._end(job, JobState.QUARANTINED, str(exc), timings)
            logger.warning("series quarantined: %s", exc, extra=extra)
        except sdk.SeriesRefused as exc:  # the node's or the algorithm's own refusal
            state = self._end(job, JobState.REFUSED, exc.reason, timings)
            logger.info("series refused: %s", exc.reason, extra=extra)
        except AinodeError as exc:
            if is_transient(exc):
                counted = not isinstance(exc, OutOfResourcesError)  # a full disk waits, never dead-letters
                state = self._retry_or_dead_letter(job, str(exc), timings, counted)
                logger.warning("job interrupted (%s): %s", state, exc, extra=extra)
            else:
                state = self._end(job, JobState.FAILED, str(exc), timings)
                logger.error("job failed: %s", exc, extra=extra)
        except sdk.AlgorithmError as exc:  # a plugin that cannot load, a model that does not fit
            state = self._end(job, JobState.FAILED, str(exc), timings)
            logger.error("job failed: %s", exc, extra=extra)
        except Exception as exc:  # job boundary: a defect fails this job, never the node
            state = self._end(job, JobState.FAILED, f"internal error: {type(exc).__name__}", timings)
            logger.exception("job failed with an internal error", extra=extra)
        self._finish_study(job.study_key)
        return state

    def _hold(self, job: JobRow, release: str | None = None, **values: Any) -> None:
        """Write to the job this worker holds (fenced by the lease); ``job`` mirrors what was written.

        Raises
        ------
        LeaseLostError
            Another worker holds the job now.
        """
        if not self.s.index.update_held_job(job.id, self.s.worker, release, **values):
            raise LeaseLostError(f"job {job.id}: lease lost")
        for key, value in values.items():
            setattr(job, key, value if isinstance(value, str | int | float | None) else json.dumps(value))

    def _close(self, job: JobRow, state: str, **values: Any) -> None:
        """Record the job's terminal ``state`` (releasing the lease) and delete its intermediate
        outputs, those recorded and any this process wrote but did not record.

        Raises
        ------
        LeaseLostError
            Another worker holds the job now (it keeps the outputs).
        """
        outputs = job.stage_outputs
        outputs["unrecorded"] = self.stages.forget(job.id)
        self._hold(job, "released", state=state, stage_object_ids={}, **values)
        self.stages.discard(outputs)

    def _end(self, job: JobRow, state: str, reason: str, timings: dict[str, float]) -> str:
        """End a job that did not deliver; a job replayed later (``ainode jobs retry``) starts again
        at de-identification, or only delivers when its results were built."""
        stage = Stage.DELIVER if job.result_ids else Stage.DEIDENTIFY
        try:
            self._close(job, state, reason=reason, timings=timings, stage=stage)
        except LeaseLostError:
            return JobState.RUNNING
        outcome = "timeout" if state == JobState.FAILED and "past its timeout" in reason else str(state)
        try:
            plan: JobPlan | None = self._plan(job)
        except ConfigError:  # its route is gone: recorded without its role
            plan = None
        self.stages.record_outcome(job, plan, outcome, reason)
        return state

    def _plan(self, job: JobRow) -> JobPlan:
        """The job's plan: its snapshot, or (jobs of releases without one) its route as now.

        Raises
        ------
        ConfigError
            The snapshot cannot be read, or (no snapshot) the route is no longer configured.
        """
        return JobPlan.from_json(job.route_snapshot) if job.route_snapshot else (
            JobPlan.current(self.s.settings, job.route, job.algorithm)
        )  # fmt: skip

    def _run_stages(self, job: JobRow, t: dict[str, float], queues: Collection[str] | None) -> str:
        plan = self._plan(job)
        if self._supersede_if_stale(job):
            return JobState.SUPERSEDED
        outputs = job.stage_outputs
        while True:
            if queues is not None and self.stage_queue(job) not in queues:  # e.g. analyse on a GPU queue
                reason = f"waiting for a worker of queue {self.stage_queue(job)}"
                self._hold(job, "handed-off", state=JobState.PENDING, timings=t, reason=reason)
                return HANDED_OFF
            stage, start = Stage(job.stage), time.perf_counter()
            values: dict[str, Any] = {}
            if stage == Stage.DEIDENTIFY:
                outputs[stage] = self.stages.deidentify(job, plan)
                t["deidentify_s"] = time.perf_counter() - start
                if queues is None or self.stage_queue(job, Stage.ANALYSE) in queues:
                    # analysed here, while the de-identified series is written: both stages are
                    # recorded once both outputs are durable (a crash meanwhile redoes both)
                    outputs[Stage.ANALYSE] = self.stages.analyse(job, plan, outputs[stage], t)
                    stage = Stage.ANALYSE
            elif stage == Stage.ANALYSE:
                outputs[stage] = self.stages.analyse(job, plan, outputs[Stage.DEIDENTIFY], t)
            elif stage == Stage.BUILD:
                values["result_object_ids"] = self.stages.build(job, plan, outputs, t)
            else:
                return self._deliver(job, plan, t)
            self.stages.flush(job)  # the stage's outputs are durable before it is recorded as done
            self._hold(job, stage=NEXT_STAGE[stage], stage_object_ids=outputs, timings=t, **values)

    def _deliver(self, job: JobRow, plan: JobPlan, t: dict[str, float]) -> str:
        if self._supersede_if_stale(job):
            return JobState.SUPERSEDED
        objects = self.stages.deliver(job, plan, job.result_ids, t)
        self.stages.withdraw_superseded(job, plan, objects[0])
        t["delivered_at"] = time.time()
        self._close(job, JobState.DELIVERED, stage=Stage.DONE, reason=None, timings=t)
        self.stages.record_outcome(job, plan, "delivered", None)
        logger.info("results delivered", extra={"job_id": job.id, **rounded(t)})
        return JobState.DELIVERED

    def _supersede_if_stale(self, job: JobRow) -> bool:
        """A job of an older generation whose results are not yet delivered is dropped: the study
        was re-opened by a late instance and its re-analysis replaces this one."""
        study = self.s.index.study(job.study_key)
        if study is None or study.generation <= job.generation:
            return False
        reason = f"superseded: the study was re-opened (generation {study.generation}) before delivery"
        self._close(job, JobState.SUPERSEDED, reason=reason)
        logger.info("job superseded before delivery", extra={"job_id": job.id, "study_key": job.study_key})
        return True

    def _retry_or_dead_letter(self, job: JobRow, reason: str, timings: dict[str, float], counted: bool = True) -> str:
        """Schedule another attempt of the failed stage with exponential backoff and full jitter,
        or dead-letter the job (after ``delivery.max_attempts``; an attempt that is not
        ``counted`` never dead-letters). Any transient failure is retried this way: an index
        that was locked, a broker, a destination."""
        policy = self.s.settings.delivery
        attempts = job.attempts + (1 if counted else 0)
        if counted and attempts >= policy.max_attempts:
            return self._end(job, JobState.FAILED, f"dead letter after {attempts} attempt(s): {reason}", timings)
        delay = min(policy.max_backoff_s, policy.backoff_s * 2 ** max(0, attempts - 1))
        delay = delay / 2 + random.uniform(0, delay / 2)
        try:
            self._hold(
                job, "retry", state=JobState.PENDING, next_attempt_at=self.s.clock() + delay, timings=timings,
                attempts=attempts, reason=f"attempt {attempts} failed, retrying in {delay:.0f} s: {reason}",
            )  # fmt: skip
        except LeaseLostError:
            return JobState.RUNNING
        return JobState.PENDING

    def _finish_study(self, study_key: str) -> None:
        study = self.s.index.study(study_key)
        if study is None or study.state != StudyState.PROCESSING:
            return
        jobs = [j for j in self.s.index.jobs(study_key) if j.generation == study.generation]
        if any(j.state in (JobState.PENDING, JobState.RUNNING) for j in jobs):
            return
        try:  # once every job of the generation ended; monitoring never holds the study up
            compare_shadows(self.s.index, self.s.store, jobs)
        except AinodeError as exc:
            logger.warning("shadow comparison not stored: %s", exc, extra={"study_key": study_key})
        failed = [j for j in jobs if j.state == JobState.FAILED]
        if failed:
            self.s.index.set_study_state(study_key, StudyState.FAILED, reason=f"{len(failed)} job(s) failed")
        else:
            self.s.index.set_study_state(study_key, StudyState.DONE)
