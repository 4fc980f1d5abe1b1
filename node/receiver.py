"""The receiving side of the node: Storage SCP -> encrypted store + index, with its audit trail.

A node runs one :class:`Receiver` in its main process and, with ``node.receivers`` > 1, more in
child processes listening on the same port (``SO_REUSEPORT``: the kernel spreads incoming
associations over the listeners), so that concurrent associations use several cores despite
Python's global interpreter lock. Every receiver stores durably before it answers Success, into
the shared data directory: object files, the SQLite index (WAL; writers take turns) and the audit
log (whole-line appends). Only the main process plans and runs jobs; it starts the children after
the node's secrets exist, restarts one that dies, forwards SIGHUP (reload) and stops them on
shutdown. A child dies with the main process (``PR_SET_PDEATHSIG``), so ``kill -9`` of the node
leaves no receiver behind.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path

from node import logs
from node.audit import (
    APPLICATION_ACTIVITY,
    DESTINATION_ROLE,
    INSTANCES_TRANSFERRED,
    NODE_AUTHENTICATION,
    OBJECT_SECURITY_ATTRIBUTES_CHANGED,
    SOURCE_ROLE,
    AuditEvent,
    AuditLog,
    Participant,
    security_alert,
    study_event,
)
from node.datadir import DataDir, open_data_dir
from node.dicomio import configure_pydicom, decode
from node.errors import AinodeError, OutOfResourcesError
from node.network.scp import STORAGE_SOP_CLASSES, PeerRule, ReceivedInstance, StorageSCP
from node.network.tls import server_context
from node.settings import load_settings
from node.settings.models import Settings
from node.storage.index import Index, InstanceRow, JobState, job_of_stage_object
from node.storage.secrets import NodeSecrets
from node.storage.store import ObjectStore

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class Ingest:
    """Stores one received instance encrypted and durably, then indexes it (the C-STORE work).

    Only keyed digests of the UIDs reach the index; the encoded bytes go to the encrypted store.
    It also counts, per association, the instances of each study, for the audit record written
    when the association ends.
    """

    def __init__(self, store: ObjectStore, index: Index, secrets: NodeSecrets, max_queued_jobs: int = 1000) -> None:
        self.store = store
        self.index = index
        self.secrets = secrets
        self.max_queued_jobs = max_queued_jobs
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
        """Store ``instance``.

        Raises
        ------
        OutOfResourcesError
            The disk watermark is reached or too many jobs are waiting (DIMSE 0xA700, so the
            sender keeps the instance and retries later).
        StorageError
            The instance could not be written.
        """
        self._check_backlog()
        object_id = self.store.put(instance.encoded)
        self.index_stored(object_id, instance)
        with self._lock:
            self._received[instance.association_id][instance.study_instance_uid] += 1

    def index_stored(self, object_id: str, instance: ReceivedInstance) -> bool:
        """Index an instance already stored as ``object_id``; a duplicate SOP instance is deleted
        from the store (the first copy stays). Returns whether it was indexed.

        Raises
        ------
        StorageError
            The index could not record the instance.
        """
        key = self.secrets.index_key
        row = InstanceRow(
            object_id=object_id,
            sop_key=key(instance.sop_instance_uid),
            study_key=key(instance.study_instance_uid),
            series_key=key(instance.series_instance_uid),
            sop_class_uid=instance.sop_class_uid,
            transfer_syntax_uid=instance.transfer_syntax_uid,
            size=len(instance.encoded),
            received_at=time.time(),
        )
        if not self.index.add_instance(row, instance.calling_ae_title):
            self.store.delete(object_id)  # a duplicate: the first copy stays
            return False
        return True

    def take_received(self, association_id: int) -> Counter[str]:
        """Instances received per Study Instance UID on an association (forgotten afterwards)."""
        with self._lock:
            return self._received.pop(association_id, Counter())


@dataclass(frozen=True)
class Reconciliation:
    """What :func:`reconcile` found after an unclean stop."""

    temp_removed: int = 0
    indexed: int = 0
    deleted: int = 0


def reconcile(data: DataDir, ingest: Ingest, stale_after_s: float = 60.0) -> Reconciliation:
    """Make the store and the index agree again after a crash (run at start, before receiving).

    - Temporary files of writes that never finished (``store/tmp``, older than ``stale_after_s``)
      are removed: they hold sealed, partly written objects nobody can use.
    - A stored object no index row names is either a received instance whose index insert did not
      happen (killed between the two; it is indexed now, as if the C-STORE had completed), or a map
      or result of a job that crashed before recording it (deleted: the job rebuilds it). Stage
      outputs are left to their job, which re-runs the stage and overwrites them.

    Every change is audited; nothing identifying is logged.
    """
    tmp = data.store.root / "tmp"
    now = time.time()
    temp_removed = 0
    for path in tmp.iterdir():
        if path.is_file() and now - path.stat().st_mtime > stale_after_s:
            path.unlink(missing_ok=True)
            temp_removed += 1
    referenced = data.index.referenced_object_ids()
    indexed = deleted = 0
    for object_id in data.store.object_ids():
        if object_id in referenced or object_id.startswith("secret-") or job_of_stage_object(object_id) is not None:
            continue  # stage outputs belong to their job (swept by node.jobs.retention.sweep_stage_outputs)
        instance = _as_received_instance(data.store.get(object_id))
        if instance is not None and ingest.index_stored(object_id, instance):
            indexed += 1
        else:
            data.store.delete(object_id)
            deleted += 1
    done = Reconciliation(temp_removed, indexed, deleted)
    if temp_removed or indexed or deleted:
        text = (
            f"start-up reconciliation: {temp_removed} unfinished temporary file(s) removed, {indexed} stored "
            f"instance(s) indexed, {deleted} unreferenced object(s) deleted"
        )
        logger.warning(text)
        data.audit.record(AuditEvent(APPLICATION_ACTIVITY, "D", description=text))
    return done


def _as_received_instance(plaintext: bytes) -> ReceivedInstance | None:
    """The received instance an orphan object holds, or ``None`` when it is not one (a map, a
    result, anything the Storage SCP would not have accepted)."""
    try:
        ds = decode(plaintext, stop_before_pixels=True)
        sop_class = str(ds.SOPClassUID)
        if sop_class not in STORAGE_SOP_CLASSES.values():
            return None  # a SEG, SR or KOS built by a job
        return ReceivedInstance(
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=sop_class,
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            calling_ae_title="",
            encoded=plaintext,
        )
    except (AttributeError, KeyError, ValueError, TypeError, EOFError, AinodeError):
        return None  # not a DICOM data set: a pseudonym map


def peer_rules(settings: Settings) -> list[PeerRule]:
    """The access rules of the configured peers."""
    return [PeerRule(p.ae_title, tuple(p.source_addresses), p.certificate_subject) for p in settings.peers]


class Receiver:
    """One Storage SCP with its ingest and audit hooks, over a data directory's store and index.

    Parameters
    ----------
    reuse_port
        Listen with ``SO_REUSEPORT`` so that other receivers can share the port.
    """

    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        index: Index,
        secrets: NodeSecrets,
        audit: AuditLog,
        *,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        self.audit = audit
        n = settings.node
        self.ingest = Ingest(store, index, secrets, n.max_queued_jobs)
        self.scp = StorageSCP(
            n.ae_title,
            peer_rules(settings),
            self.ingest,
            on_security_event=self._association_refused,
            on_release=self._association_ended,
            ssl_context=server_context(n.tls) if n.tls is not None else None,
            max_associations=n.max_associations,
            max_per_address=n.max_connections_per_address,
            max_pdu_bytes=n.max_pdu_bytes,
            network_timeout_s=n.network_timeout_s,
            dimse_timeout_s=n.dimse_timeout_s,
            reuse_port=reuse_port,
        )

    def _association_refused(self, calling: str, address: str, reason: str) -> None:
        who = [Participant(calling or "unknown", requestor=True, address=address)]
        self.audit.record(security_alert(NODE_AUTHENTICATION, reason, who))

    def _association_ended(self, association_id: int, calling: str, address: str) -> None:
        for study_uid, count in self.ingest.take_received(association_id).items():
            participants = [
                Participant(calling, SOURCE_ROLE, requestor=True, address=address),
                Participant(self.settings.node.ae_title, DESTINATION_ROLE),
            ]
            self.audit.record(
                study_event(
                    INSTANCES_TRANSFERRED, "C", study_uid, "instances received", participants,
                    {"NumberOfInstances": str(count)},
                )
            )  # fmt: skip

    def tamper_detected(self, object_id: str, reason: str) -> None:
        """Log and audit an object that failed authentication (the store has quarantined it)."""
        logger.error("stored object failed authentication; quarantined", extra={"object_id": object_id})
        self.audit.record(security_alert(OBJECT_SECURITY_ATTRIBUTES_CHANGED, f"tamper detected: {reason}"))

    def set_settings(self, settings: Settings) -> None:
        """Take a reloaded configuration (its peers; ``node`` changes need a restart)."""
        self.scp.set_peers(peer_rules(settings))
        self.settings = settings

    def start(self) -> None:
        """Listen on the configured address and port."""
        self.scp.start(self.settings.node.host, self.settings.node.port)

    def stop(self) -> None:
        """Stop accepting associations."""
        self.scp.stop()


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux), and check it is not too late."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError) as exc:  # not Linux: the parent's shutdown still stops us
        logger.warning("receiver cannot follow its parent's death: %s", exc)
    if os.getppid() != parent_pid:
        os._exit(0)


def _receiver_main(config_path: str, number: int, parent_pid: int, log_level: str) -> None:
    """Entry point of a child receiver process."""
    _die_with_parent(parent_pid)
    logs.configure(log_level)
    configure_pydicom()
    path = Path(config_path)
    settings = load_settings(path)
    data = open_data_dir(settings, role=f"receiver-{number}")
    receiver = Receiver(settings, data.store, data.index, data.secrets, data.audit, reuse_port=True)
    data.store.on_tamper = receiver.tamper_detected
    done, reload_requested = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides (Ctrl-C reaches the group)
    signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
    receiver.start()
    logger.info("receiver %d listening", number, extra={"port": settings.node.port})
    while not done.wait(0.2):
        data.refresh_keys()  # a key rotation reaches this process within one loop
        if reload_requested.is_set():
            reload_requested.clear()
            try:
                receiver.set_settings(load_settings(path))
                logger.info("receiver %d reloaded its configuration", number)
            except AinodeError as exc:  # the main process validated it; keep the old peers
                logger.error("receiver %d kept its configuration: %s", number, exc)
    receiver.stop()
    data.close()


class ReceiverPool:
    """The node's child receiver processes (numbers 1..count-1; the main process is receiver 0)."""

    def __init__(self, config_path: Path, count: int, log_level: str = "INFO") -> None:
        self.config_path = config_path
        self.count = count
        self.log_level = log_level
        self._context = multiprocessing.get_context("spawn")
        self._processes: dict[int, BaseProcess] = {}

    def _spawn(self, number: int) -> None:
        process = self._context.Process(
            target=_receiver_main,
            args=(str(self.config_path), number, os.getpid(), self.log_level),
            name=f"ainode-receiver-{number}",
            daemon=False,
        )
        process.start()
        self._processes[number] = process

    def start(self) -> None:
        """Start the child receivers (call from the main thread: a child dies with that thread)."""
        for number in range(1, self.count):
            self._spawn(number)

    def supervise(self) -> None:
        """Restart any child receiver that has died (main thread)."""
        for number, process in list(self._processes.items()):
            if not process.is_alive():
                logger.error("receiver %d exited (code %s); restarting it", number, process.exitcode)
                self._spawn(number)

    def reload(self) -> None:
        """Ask every child to reload its peers from the configuration file."""
        for process in self._processes.values():
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGHUP)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM every child and wait; kill what does not exit in time."""
        for process in self._processes.values():
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + timeout_s
        for process in self._processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)
        self._processes.clear()
