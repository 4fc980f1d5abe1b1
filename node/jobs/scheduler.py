"""Study completion and job execution.

The scheduler polls the index for studies that have been quiet long enough, asks the pipeline to
plan them, and hands the job ids to an executor. :class:`InProcessExecutor` (threads in the node's
process) is the embedded default; :class:`node.jobs.distributed.CeleryExecutor` sends the ids to
``ainode worker`` processes and implements the same ``submit``/``shutdown`` pair, since jobs are
plain ids in a shared ledger and store. Each tick also offers again the jobs whose lease expired
(a worker died), so no job is stranded.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

from node.errors import AinodeError, is_transient
from node.jobs.leases import dead_local_workers
from node.jobs.pipeline import Pipeline
from node.settings import ActiveSettings
from node.settings.config import Settings
from node.storage.index import Index, JobState, StudyState

logger = logging.getLogger(__name__)


DEFER_S = 1.0
QUIET_MARGIN_S = 0.002
"""Woken this long after a study's quiet period ends (its last instance's time, read back from the
index, compares as quiet)."""
RERUN_LIMIT = 10
MAX_PLANNING_BACKOFF_S = 60.0
PRIORITY_RANK = {"stat": 0, "routine": 1, "background": 2}


class JobExecutor(Protocol):
    """Runs jobs by id somewhere (threads here, Celery workers when scaled out)."""

    def submit(self, job_id: int, priority: str = "routine") -> None:
        """Queue ``job_id``; ``stat`` jobs run before ``routine`` before ``background``."""
        ...

    def shutdown(self, wait: bool = True) -> None:
        """Stop taking jobs; with ``wait``, finish the running ones."""
        ...


class InProcessExecutor:
    """Runs jobs on worker threads inside the node (the embedded default), by priority then age."""

    def __init__(self, run: Callable[[int], object], workers: int = 1) -> None:
        self._run = run
        self._queue: queue.PriorityQueue[tuple[int, int, int]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._stopping = threading.Event()
        self._raised: dict[int, int] = {}
        self._queued: set[int] = set()
        self._queued_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"ainode-job-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while True:
            rank, _seq, job_id = self._queue.get()
            if job_id < 0 or self._stopping.is_set():
                return
            with self._queued_lock:
                self._queued.discard(job_id)
            try:
                self._run(job_id)
                self._raised.pop(job_id, None)
            except Exception as exc:  # executor boundary: the pipeline could not even record the outcome
                self._run_again_later(job_id, rank, exc)

    def _run_again_later(self, job_id: int, rank: int, exc: Exception) -> None:
        """A job whose run raised (e.g. the index was locked while its outcome was recorded) is
        run again after a backoff; it stays ``running`` in the index meanwhile, so a restart
        resumes it too."""
        tries = self._raised[job_id] = self._raised.get(job_id, 0) + 1
        if tries > RERUN_LIMIT:
            logger.error("job runner raised %d times; left for the next start", tries, extra={"job_id": job_id})
            self._raised.pop(job_id, None)
            return
        delay = min(60.0, 2.0**tries)
        if is_transient(exc):
            logger.warning("job interrupted: %s; running it again in %.0f s", exc, delay, extra={"job_id": job_id})
        else:
            logger.exception("job runner raised; running it again in %.0f s", delay, extra={"job_id": job_id})
        timer = threading.Timer(delay, lambda: self._queue.put((rank, next(self._seq), job_id)))
        timer.daemon = True
        timer.start()

    def submit(self, job_id: int, priority: str = "routine") -> None:
        """Queue ``job_id`` at ``priority`` (once: a job already waiting in the queue is not queued again)."""
        with self._queued_lock:
            if job_id in self._queued:
                return
            self._queued.add(job_id)
        self._queue.put((PRIORITY_RANK.get(priority, 1), next(self._seq), job_id))

    def shutdown(self, wait: bool = True) -> None:
        """Stop after the running jobs; queued jobs stay ``pending`` in the index and resume at the
        next start."""
        self._stopping.set()
        for _ in self._threads:
            self._queue.put((-1, -1, -1))
        if wait:
            for thread in self._threads:
                thread.join()


class Scheduler:
    """Detects complete studies and submits their jobs."""

    def __init__(
        self, pipeline: Pipeline, index: Index, settings: Settings | ActiveSettings, executor: JobExecutor
    ) -> None:
        self.pipeline = pipeline
        self.index = index
        self.active = ActiveSettings.of(settings)
        self.executor = executor
        self._deferred: dict[str, tuple[float, float]] = {}
        self._planning_failures: dict[str, int] = {}
        self._pending_swept = time.monotonic()

    @property
    def settings(self) -> Settings:
        """The configuration in force now."""
        return self.active.current

    @property
    def min_quiet_period_s(self) -> float:
        """Shortest quiet period of any route (a study is looked at no earlier than this)."""
        periods = [r.completion.quiet_period_s for r in self.settings.routes]
        return min(periods) if periods else 60.0

    def _defer(self, study_key: str, delay_s: float = DEFER_S) -> None:
        """A study planned too early (quiet period, expected series): look again in a few seconds,
        or at once when another instance arrives."""
        study = self.index.study(study_key)
        if study is not None and study.state == StudyState.RECEIVING:
            self._deferred[study_key] = (study.last_received_at, time.monotonic() + delay_s)

    def _planning_failed(self, study_key: str, exc: Exception) -> None:
        """A transient failure is retried with exponential backoff (the study stays ``receiving``);
        a permanent one fails the study with the reason."""
        if is_transient(exc):
            failures = self._planning_failures[study_key] = self._planning_failures.get(study_key, 0) + 1
            delay = min(MAX_PLANNING_BACKOFF_S, DEFER_S * 2**failures)
            logger.warning("planning interrupted: %s; retrying in %.0f s", exc, delay, extra={"study_key": study_key})
            self._deferred[study_key] = (-1.0, time.monotonic() + delay)  # -1: a new instance does not end it
            return
        self._planning_failures.pop(study_key, None)
        if isinstance(exc, AinodeError):
            logger.error("planning failed: %s", exc, extra={"study_key": study_key})
            reason = f"planning failed: {exc}"
        else:
            logger.exception("planning failed with an internal error", extra={"study_key": study_key})
            reason = f"planning failed: internal error {type(exc).__name__}"
        self.index.set_study_state(study_key, StudyState.FAILED, reason=reason)

    def _still_deferred(self, study_key: str) -> bool:
        deferred = self._deferred.get(study_key)
        if deferred is None:
            return False
        study = self.index.study(study_key)
        arrived = deferred[0] >= 0 and (study is None or study.last_received_at != deferred[0])
        if time.monotonic() >= deferred[1] or study is None or arrived:
            del self._deferred[study_key]
            return False
        return True

    def _priority(self, route_name: str) -> str:
        route = next((r for r in self.settings.routes if r.name == route_name), None)
        return route.priority if route is not None else "routine"

    def recover(self) -> int:
        """Resubmit the jobs a previous run left pending, and those running under a lease of a
        process of this host that is gone (a crash: its leases end now, not at expiry); jobs
        leased by live workers elsewhere are theirs. Returns how many were submitted."""
        self.index.expire_leases(dead_local_workers(self.index.lease_holders()))
        self.index.reoffer_expired(self.settings.delivery.max_attempts)
        jobs = self.index.jobs(state=JobState.PENDING)
        jobs = [j for j in jobs if j.next_attempt_at is None]  # waiting retries come back through tick()
        for job in sorted(jobs, key=lambda j: j.id):
            self.executor.submit(job.id, self._priority(job.route))
        for study in self.index.studies(StudyState.COMPLETE):
            # left by a release that planned in several transactions: finish its partial plan
            planned = [j for j in self.index.jobs(study.study_key) if j.generation == study.generation]
            self.index.set_study_state(study.study_key, StudyState.PROCESSING if planned else StudyState.RECEIVING)
        if jobs:
            logger.info("resumed %d unfinished job(s)", len(jobs))
        return len(jobs)

    def tick(self) -> int:
        """Plan every quiet study once and submit jobs whose retry time has come; returns the
        number of jobs submitted."""
        submitted = 0
        offered = self.index.reoffer_expired(self.settings.delivery.max_attempts)
        for row in offered:
            logger.warning("lease expired: job offered again", extra={"job_id": row.id, "study_key": row.study_key})
        due = [*offered, *self.index.claim_due_jobs(time.time())]
        lease_s = self.settings.node.lease_s
        if time.monotonic() - self._pending_swept > lease_s:  # a message lost on the way to a worker
            self._pending_swept = time.monotonic()
            known = {j.id for j in due}
            due += [j for j in self.index.stale_pending(time.time() - 2 * lease_s) if j.id not in known]
        for row in due:
            self.executor.submit(row.id, self._priority(row.route))
            submitted += 1
        candidates = self.index.quiet_studies(self.min_quiet_period_s)
        waits = [r.completion.max_wait_s for r in self.settings.routes if r.completion.max_wait_s is not None]
        if waits:
            candidates += [k for k in self.index.receiving_since(time.time() - min(waits)) if k not in candidates]
        for study_key in candidates:
            if self._still_deferred(study_key):
                continue
            try:
                job_ids = self.pipeline.plan(study_key)
            except Exception as exc:  # one unreadable study must not stop the others
                self._planning_failed(study_key, exc)
                continue
            self._planning_failures.pop(study_key, None)
            if not job_ids:
                self._defer(study_key)
            for job_id in job_ids:
                job = self.index.job(job_id)
                self.executor.submit(job_id, self._priority(job.route if job else ""))
            submitted += len(job_ids)
        return submitted

    def next_wait_s(self, interval_s: float, now: float | None = None) -> float:
        """Seconds until the next tick: ``interval_s``, or less when a study still receiving
        becomes quiet sooner (the shortest quiet period of any route), so its planning does not wait
        for the next poll."""
        now = time.time() if now is None else now
        quiet_at = self.index.next_quiet_at(self.min_quiet_period_s, now)
        if quiet_at is None:
            return interval_s
        return min(interval_s, max(quiet_at - now + QUIET_MARGIN_S, QUIET_MARGIN_S))

    def run(
        self, stop: threading.Event, interval_s: float = 0.25, housekeeping: Callable[[], object] | None = None
    ) -> None:
        """Tick until ``stop`` is set, every ``interval_s`` seconds and, sooner, when a study's
        quiet period ends (:meth:`next_wait_s`); run ``housekeeping`` (retention) about once a minute."""
        last_housekeeping = 0.0
        wait_s = interval_s
        while not stop.wait(wait_s):
            wait_s = interval_s
            try:
                self.tick()
                wait_s = self.next_wait_s(interval_s)
                if housekeeping is not None and time.monotonic() - last_housekeeping > 60:
                    last_housekeeping = time.monotonic()
                    housekeeping()
            except Exception:  # keep the loop alive: the next tick retries
                logger.exception("scheduler tick failed")
