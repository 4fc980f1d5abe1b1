"""Retention: a study's originals, pseudonym map and results are deleted after delivery.

``storage.retention_days`` after a study finished (results delivered, or no route matched), or at
once with ``ainode purge``, every object the study owns is deleted from the encrypted store and
the study leaves the index; a DICOM Study Deleted audit record (110105) is written.
Failed studies are kept until an administrator retries or purges them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from node.audit import STUDY_DELETED, AuditEvent, AuditLog, Participant, study_key_object
from node.storage.index import STAGE_PREFIX, Index, JobState, job_of_stage_object
from node.storage.store import ObjectStore

logger = logging.getLogger(__name__)


def purge_study(
    index: Index,
    store: ObjectStore,
    study_key: str,
    audit: AuditLog | None,
    why: str,
    participants: Sequence[Participant] = (),
) -> int:
    """Delete everything the node holds for one study; returns the number of objects deleted.
    ``participants``: who asked (an administrator), for the audit record.

    Raises
    ------
    StorageError
        A job of the study is running under a live lease (see :meth:`Index.delete_study`).
    """
    object_ids = index.delete_study(study_key)
    for object_id in object_ids:
        store.delete(object_id)
    store.reclaim_segments(object_ids)  # segments left with no live record are removed
    if audit is not None and object_ids:
        audit.record(
            AuditEvent(STUDY_DELETED, "D", participants=participants, objects=[study_key_object(study_key)],
                       description=why)
        )  # fmt: skip
    logger.info("study purged (%s): %d object(s)", why, len(object_ids), extra={"study_key": study_key})
    return len(object_ids)


def purge_expired(index: Index, store: ObjectStore, retention_days: float, audit: AuditLog | None) -> int:
    """Purge every finished study older than the retention period; returns how many."""
    expired = index.expired_studies(time.time() - retention_days * 86400)
    for study_key in expired:
        purge_study(index, store, study_key, audit, f"retention of {retention_days:g} day(s) passed")
    return len(expired)


def sweep_stage_outputs(index: Index, store: ObjectStore) -> int:
    """Delete stage outputs (:func:`node.storage.index.stage_object_id`) no job needs: those of
    finished or removed jobs that a crash left behind (a worker killed after it recorded the
    outcome, before it deleted them). Outputs of unfinished jobs stay: their stage may be re-run
    and overwrites them. Lists only the stage outputs' shards of the store. Returns how many were
    deleted."""
    from node.jobs.pipeline import FINISHED_JOB_STATES

    by_job: dict[int, list[str]] = {}
    for object_id in store.object_ids(prefix=STAGE_PREFIX):
        job_id = job_of_stage_object(object_id)
        if job_id is not None:
            by_job.setdefault(job_id, []).append(object_id)
    deleted = 0
    for job_id, object_ids in by_job.items():
        job = index.job(job_id)
        if job is not None and job.state not in (*FINISHED_JOB_STATES, JobState.FAILED):
            continue  # unfinished: its stage may be re-run
        kept = set(job.result_ids) if job is not None else set()  # delivered results stay
        for object_id in object_ids:
            if object_id not in kept:
                store.delete(object_id)
                deleted += 1
    if deleted:
        logger.info("left-over stage outputs deleted: %d", deleted)
    return deleted
