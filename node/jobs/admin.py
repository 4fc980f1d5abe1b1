"""What an administrator does to studies and jobs, from the CLI or the console: replay a dead
letter, analyse a study again, purge it. Each raises :class:`~node.errors.NotFoundError` or
:class:`~node.errors.ConflictError` with the reason when it does not apply; the caller audits who
asked."""

from __future__ import annotations

import time

from node.errors import ConflictError, NotFoundError
from node.storage.index import Index, JobRow, JobState, StudyState


def retry_job(index: Index, job_id: int) -> JobRow:
    """Queue a dead-lettered (``failed``) or waiting (``pending``) job again at once, its attempts
    counted afresh; a running node picks it up within a second. Returns the job as it was.

    Raises
    ------
    NotFoundError
        No such job.
    ConflictError
        The job is running or finished.
    """
    job = index.job(job_id)
    if job is None:
        raise NotFoundError(f"no job {job_id}")
    if job.state not in (JobState.FAILED, JobState.PENDING):
        raise ConflictError(f"job {job_id} is {job.state}; only failed (dead-letter) or waiting jobs are retried")
    index.update_job(job_id, state=JobState.PENDING, attempts=0, next_attempt_at=time.time(), reason="retry requested")
    index.set_study_state(job.study_key, StudyState.PROCESSING)
    return job


def rerun_study(index: Index, study_key: str) -> int:
    """Analyse a study again from its stored instances: it is re-opened as the next generation
    (as a late instance would), planned at the scheduler's next tick, and once the new results
    are delivered the ones they replace are withdrawn (IOCM). Returns the new generation.

    Raises
    ------
    NotFoundError
        No such study.
    ConflictError
        The study is still receiving (it is analysed once it is complete).
    """
    study = index.study(study_key)
    if study is None:
        raise NotFoundError(f"no study {study_key}")
    generation = index.reopen_study(study_key)
    if generation is None:
        raise ConflictError(f"study {study_key} is still {study.state}; it is analysed once it is complete")
    return generation
