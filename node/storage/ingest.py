"""Ingest: what the Storage SCP receives, stored encrypted and durably and indexed — and, after
a crash, start-up reconciliation that makes the store and the index agree again.

The C-STORE's work (:class:`Ingest`) appends the encoded instance to this process's segment
(durable before Success is answered) and hands its index row to the batching writer. What is
audited is told to a :class:`Notices` (the receiver wires it to the audit trail): the storage
layer does not depend on the audit module, which itself seals its records with the store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from node.dicomio import decode
from node.errors import AinodeError, OutOfResourcesError
from node.instances import STORAGE_SOP_CLASSES, ReceivedInstance
from node.storage import segments
from node.storage.batch import IndexWriter
from node.storage.damage import damaged_instances, set_aside
from node.storage.index import Index, InstanceKeys, JobState, NewInstance, job_of_stage_object
from node.storage.secrets import NodeSecrets
from node.storage.store import ObjectStore

logger = logging.getLogger(__name__)


class Notices(Protocol):
    """Where ingest and reconciliation report what the audit trail must hold."""

    def activity(self, action: str, text: str) -> None:
        """An application activity (action ``C``, ``R``, ``U``, ``D``) described by ``text``."""
        ...

    def alert(self, text: str) -> None:
        """A security alert (a damaged or tampered stored object) described by ``text``."""
        ...


class Ingest:
    """Stores one received instance encrypted and durably, then has it indexed (the C-STORE work).

    The encoded bytes are appended to this process's segment (:meth:`ObjectStore.append`: durable
    before Success is answered); the index row, with only keyed digests of the UIDs, goes to the
    batching :class:`~node.storage.batch.IndexWriter`, off the association's thread. It also
    counts, per association, the instances of each study, for the audit record written when the
    association ends.
    """

    def __init__(self, store: ObjectStore, index: Index, secrets: NodeSecrets, max_queued_jobs: int = 1000) -> None:
        self.store = store
        self.index = index
        self.secrets = secrets
        self.max_queued_jobs = max_queued_jobs
        self.writer = IndexWriter(index, store)
        self._backlog_checked = 0.0
        self._backlog_full = False
        self._received: dict[int, Counter[str]] = defaultdict(Counter)
        self._lock = threading.Lock()

    def _check_backlog(self) -> None:
        now = time.monotonic()
        if now - self._backlog_checked > 1.0:  # a count query at most once a second
            self._backlog_checked = now
            self._backlog_full = self.index.count_jobs(JobState.PENDING) >= self.max_queued_jobs
        if self._backlog_full:
            raise OutOfResourcesError(f"{self.max_queued_jobs} jobs are waiting; refusing new instances for now")

    def __call__(self, instance: ReceivedInstance) -> None:
        """Store ``instance`` durably and queue its index row.

        Raises
        ------
        OutOfResourcesError
            The disk watermark is reached, too many jobs or index rows are waiting (DIMSE
            0xA700, so the sender keeps the instance and retries later).
        StorageError
            The instance could not be written.
        """
        self._check_backlog()
        if instance.parts is not None:  # a large data set: sealed part by part from its spool
            object_id = self.store.append_stream(instance.parts(), instance.size)
        else:
            object_id = self.store.append(instance.encoded)
        self.writer.submit(self.new_instance(object_id, instance))
        with self._lock:
            self._received[instance.association_id][instance.study_instance_uid] += 1

    def new_instance(self, object_id: str, instance: ReceivedInstance) -> NewInstance:
        """The index row of an instance stored as ``object_id`` (keyed digests only)."""
        key, lookup = self.secrets.index_key, self.secrets.lookup_key
        row = InstanceKeys(
            object_id=object_id,
            sop_key=key(instance.sop_instance_uid),
            study_key=key(instance.study_instance_uid),
            series_key=key(instance.series_instance_uid),
            sop_class_uid=instance.sop_class_uid,
            transfer_syntax_uid=instance.transfer_syntax_uid,
            size=instance.size,
            received_at=time.time(),
        )
        return NewInstance(row, instance.calling_ae_title, lookup("PatientID", instance.patient_id),
                           lookup("AccessionNumber", instance.accession_number))  # fmt: skip

    def index_stored(self, object_id: str, instance: ReceivedInstance) -> bool:
        """Index an instance already stored as ``object_id`` now (reconciliation); a duplicate SOP
        instance is deleted from the store (the first copy stays). Returns whether it was indexed.

        Raises
        ------
        StorageError
            The index could not record the instance.
        """
        if not self.index.add_instances([self.new_instance(object_id, instance)])[0]:
            self.store.delete(object_id)  # a duplicate: the first copy stays
            return False
        return True

    def take_received(self, association_id: int) -> Counter[str]:
        """Instances received per Study Instance UID on an association (forgotten afterwards)."""
        with self._lock:
            return self._received.pop(association_id, Counter())

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Wait until every queued index row is written; ``False`` if that took over ``timeout_s``."""
        return self.writer.flush(timeout_s)

    def close(self) -> None:
        """Write the queued index rows, then close this process's segments and mark them done
        (every record indexed); rows that could not be written leave their segments to
        reconciliation."""
        written = self.writer.close()
        for path in self.store.close_segments():
            if written:
                segments.mark_done(path)


@dataclass(frozen=True)
class Reconciliation:
    """What :func:`reconcile` found after an unclean stop."""

    temp_removed: int = 0
    indexed: int = 0
    deleted: int = 0
    damaged: int = 0


def reconcile(ingest: Ingest, notices: Notices, stale_after_s: float = 60.0) -> Reconciliation:
    """Make the store and the index agree again after a crash (run at start, before receiving).

    - Temporary files of writes that never finished (``store/tmp``, older than ``stale_after_s``)
      are removed: they hold sealed, partly written objects nobody can use.
    - Every segment record the index lacks is a received instance whose index row was not written
      yet (the process was killed before its batching writer got to it): it is indexed now, as
      the C-STORE's Success promised (:func:`reconcile_segments`, here over every segment).
    - A stored object file no index row names is either a received instance of a release before
      segments (indexed), or a map or result of a job that crashed before recording it (deleted:
      the job rebuilds it). Stage outputs are left to their job, which re-runs the stage and
      overwrites them.
    - Every index row of a received instance is checked against its record; one that is not whole
      (damaged or lost after it was acknowledged) is quarantined, audited and forgotten, so its
      study is analysed without it (:mod:`node.storage.damage`).

    Every change is audited; nothing identifying is logged.
    """
    store, index = ingest.store, ingest.index
    tmp = store.root / "tmp"
    now = time.time()
    temp_removed = 0
    for path in tmp.iterdir():
        if path.is_file() and now - path.stat().st_mtime > stale_after_s:
            path.unlink(missing_ok=True)
            temp_removed += 1
    indexed = reconcile_segments(ingest, notices, store.segment_paths(), audit=False)
    damaged = damaged_instances(index, store)
    for damage in damaged:
        set_aside(index, store, damage, notices.alert)
    referenced = index.referenced_object_ids()
    deleted = 0
    for object_id in store.object_ids():
        if (
            object_id in referenced or object_id.startswith("secret-") or job_of_stage_object(object_id) is not None
            or segments.is_segment_id(object_id)
        ):  # fmt: skip
            continue  # stage outputs belong to their job (swept by node.jobs.retention.sweep_stage_outputs)
        instance = _as_received_instance(store.get(object_id))
        if instance is not None and ingest.index_stored(object_id, instance):
            indexed += 1
        else:
            store.delete(object_id)
            deleted += 1
    done = Reconciliation(temp_removed, indexed, deleted, len(damaged))
    if temp_removed or indexed or deleted or damaged:
        text = (
            f"start-up reconciliation: {temp_removed} unfinished temporary file(s) removed, {indexed} stored "
            f"instance(s) indexed, {deleted} unreferenced object(s) deleted, {len(damaged)} damaged or missing "
            "instance(s) set aside"
        )
        logger.warning(text)
        notices.activity("D", text)
    return done


def reconcile_segments(ingest: Ingest, notices: Notices, paths: list[Path] | None = None, audit: bool = True) -> int:
    """Index every record of the segments at ``paths`` (by default those left unfinished by a
    process that died: :func:`node.storage.segments.unfinished`) that the index lacks, then mark
    the segments no live process writes to as done. Returns how many instances were indexed.
    Run at start (every segment) and when a receiver that died is restarted."""
    store, index = ingest.store, ingest.index
    root = store.segments_root
    paths = segments.unfinished(root) if paths is None else paths
    indexed = 0
    for path in paths:
        known = index.indexed_object_ids(segments.segment_prefix(path))
        for object_id in store.segment_object_ids(path):
            if object_id in known:
                continue
            instance = _as_received_instance(store.get(object_id))
            if instance is not None and ingest.index_stored(object_id, instance):
                indexed += 1
        if not segments.held(path):
            segments.mark_done(path)
    if indexed and audit:
        text = f"reconciliation: {indexed} stored instance(s) of a stopped receiver indexed"
        logger.warning(text)
        notices.activity("U", text)
    return indexed


def _as_received_instance(plaintext: bytes) -> ReceivedInstance | None:
    """The received instance an orphan object holds, or ``None`` when it is not one (a map, a
    result, anything the Storage SCP would not have accepted)."""
    try:
        ds = decode(plaintext, stop_before_pixels=True)
        sop_class = str(ds.SOPClassUID)
        if sop_class not in STORAGE_SOP_CLASSES.values():
            return None  # a SEG, SR or KOS built by a job
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
        return ReceivedInstance.from_header(ds, plaintext, sop_class_uid=sop_class, transfer_syntax_uid=transfer_syntax)
    except (AttributeError, KeyError, ValueError, TypeError, EOFError, AinodeError):
        return None  # not a DICOM data set: a pseudonym map
