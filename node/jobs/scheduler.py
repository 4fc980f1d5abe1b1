"""Study completion and job execution.

The scheduler polls the index for studies that have been quiet long enough, asks the pipeline to
plan them, and hands the job ids to an executor. :class:`InProcessExecutor` (threads in the node's
process) is the embedded default; an executor that sends ids to Celery workers implements the
same ``submit``/``shutdown`` pair, since jobs are plain ids in a shared index and store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from node.jobs.pipeline import Pipeline
from node.settings.models import Settings
from node.storage.index import Index, JobState, StudyState

logger = logging.getLogger(__name__)


class JobExecutor(Protocol):
    """Runs jobs by id somewhere (threads here, Celery workers when scaled out)."""

    def submit(self, job_id: int) -> None:
        """Queue ``job_id`` for execution."""
        ...

    def shutdown(self, wait: bool = True) -> None:
        """Stop taking jobs; with ``wait``, finish the running ones."""
        ...


class InProcessExecutor:
    """Runs jobs on a small thread pool inside the node (the embedded default)."""

    def __init__(self, run: Callable[[int], object], workers: int = 1) -> None:
        self._run = run
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ainode-job")

    def _run_safely(self, job_id: int) -> None:
        try:
            self._run(job_id)
        except Exception:  # executor boundary: the pipeline records job failures itself
            logger.exception("job runner raised", extra={"job_id": job_id})

    def submit(self, job_id: int) -> None:
        """Queue ``job_id``."""
        self._pool.submit(self._run_safely, job_id)

    def shutdown(self, wait: bool = True) -> None:
        """Stop the pool; queued jobs stay ``pending`` in the index and resume at the next start."""
        self._pool.shutdown(wait=wait, cancel_futures=True)


class Scheduler:
    """Detects complete studies and submits their jobs."""

    def __init__(self, pipeline: Pipeline, index: Index, settings: Settings, executor: JobExecutor) -> None:
        self.pipeline = pipeline
        self.index = index
        self.settings = settings
        self.executor = executor

    @property
    def min_quiet_period_s(self) -> float:
        """Shortest quiet period of any route (a study is looked at no earlier than this)."""
        periods = [r.completion.quiet_period_s for r in self.settings.routes]
        return min(periods) if periods else 60.0

    def recover(self) -> int:
        """Resubmit the jobs a previous run left pending or running; returns how many."""
        jobs = self.index.jobs(state=JobState.PENDING) + self.index.jobs(state=JobState.RUNNING)
        for job in sorted(jobs, key=lambda j: j.id):
            self.executor.submit(job.id)
        for study in self.index.studies(StudyState.COMPLETE):
            # planned but no job recorded before a crash: plan again
            if not self.index.jobs(study.study_key):
                self.index.set_study_state(study.study_key, StudyState.RECEIVING)
        if jobs:
            logger.info("resumed %d unfinished job(s)", len(jobs))
        return len(jobs)

    def tick(self) -> int:
        """Plan every quiet study once; returns the number of jobs submitted."""
        submitted = 0
        for study_key in self.index.quiet_studies(self.min_quiet_period_s):
            try:
                job_ids = self.pipeline.plan(study_key)
            except Exception:  # one unreadable study must not stop the others
                logger.exception("planning failed", extra={"study_key": study_key})
                self.index.set_study_state(study_key, StudyState.FAILED, reason="planning failed")
                continue
            for job_id in job_ids:
                self.executor.submit(job_id)
            submitted += len(job_ids)
        return submitted

    def run(
        self, stop: threading.Event, interval_s: float = 0.25, housekeeping: Callable[[], object] | None = None
    ) -> None:
        """Tick until ``stop`` is set; run ``housekeeping`` (retention) about once a minute."""
        last_housekeeping = 0.0
        while not stop.wait(interval_s):
            try:
                self.tick()
                if housekeeping is not None and time.monotonic() - last_housekeeping > 60:
                    last_housekeeping = time.monotonic()
                    housekeeping()
            except Exception:  # keep the loop alive: the next tick retries
                logger.exception("scheduler tick failed")
