"""The receiving side of the node: Storage SCP -> encrypted store + index, with its audit trail.

A node runs one :class:`Receiver` in its main process and, with ``node.receivers`` > 1, more in
child processes, so that concurrent associations use several cores despite Python's global
interpreter lock: the main process accepts every connection and hands it to the receiver with the
fewest open connections, itself included (:class:`~node.network.transport.ConnectionDispatcher`).
Every receiver stores durably before it answers Success, into the shared data directory: its own
segment files, the SQLite index (WAL; writers take turns) and the audit log (whole-line appends).
Only the main process plans and runs jobs; it starts the children after the node's secrets exist,
restarts one that dies, forwards SIGHUP (reload) and stops them on shutdown. A child dies with the
main process (``PR_SET_PDEATHSIG``), so ``kill -9`` of the node leaves no receiver behind.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

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
from node.network.scp import (
    STORAGE_SOP_CLASSES,
    AssociationSummary,
    Handover,
    PeerRule,
    ReceivedInstance,
    StorageSCP,
)
from node.network.tls import server_context
from node.network.transport import ConnectionDispatcher, SharedCount, SharedTime, connection_line
from node.settings import load_settings
from node.settings.models import Settings
from node.storage import segments
from node.storage.batch import IndexWriter
from node.storage.damage import damaged_instances, set_aside
from node.storage.index import Index, InstanceKeys, JobState, NewInstance, job_of_stage_object
from node.storage.secrets import NodeSecrets
from node.storage.store import ObjectStore

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
HEARTBEAT_S = 0.2
"""How often a child receiver shows the main process that it runs."""
UNKNOWN_CALLER = "(unknown)"


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


def reconcile(data: DataDir, ingest: Ingest, stale_after_s: float = 60.0) -> Reconciliation:
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
    tmp = data.store.root / "tmp"
    now = time.time()
    temp_removed = 0
    for path in tmp.iterdir():
        if path.is_file() and now - path.stat().st_mtime > stale_after_s:
            path.unlink(missing_ok=True)
            temp_removed += 1
    indexed = reconcile_segments(data, ingest, data.store.segment_paths(), audit=False)
    damaged = damaged_instances(data.index, data.store)
    for damage in damaged:
        set_aside(data.index, data.store, damage,
                  lambda text: data.audit.record(security_alert(OBJECT_SECURITY_ATTRIBUTES_CHANGED, text)))  # fmt: skip
    referenced = data.index.referenced_object_ids()
    deleted = 0
    for object_id in data.store.object_ids():
        if (
            object_id in referenced or object_id.startswith("secret-") or job_of_stage_object(object_id) is not None
            or segments.is_segment_id(object_id)
        ):  # fmt: skip
            continue  # stage outputs belong to their job (swept by node.jobs.retention.sweep_stage_outputs)
        instance = _as_received_instance(data.store.get(object_id))
        if instance is not None and ingest.index_stored(object_id, instance):
            indexed += 1
        else:
            data.store.delete(object_id)
            deleted += 1
    done = Reconciliation(temp_removed, indexed, deleted, len(damaged))
    if temp_removed or indexed or deleted or damaged:
        text = (
            f"start-up reconciliation: {temp_removed} unfinished temporary file(s) removed, {indexed} stored "
            f"instance(s) indexed, {deleted} unreferenced object(s) deleted, {len(damaged)} damaged or missing "
            "instance(s) set aside"
        )
        logger.warning(text)
        data.audit.record(AuditEvent(APPLICATION_ACTIVITY, "D", description=text))
    return done


def reconcile_segments(data: DataDir, ingest: Ingest, paths: list[Path] | None = None, audit: bool = True) -> int:
    """Index every record of the segments at ``paths`` (by default those left unfinished by a
    process that died: :func:`node.storage.segments.unfinished`) that the index lacks, then mark
    the segments no live process writes to as done. Returns how many instances were indexed.
    Run at start (every segment) and when a receiver that died is restarted."""
    root = data.store.segments_root
    paths = segments.unfinished(root) if paths is None else paths
    indexed = 0
    for path in paths:
        known = data.index.indexed_object_ids(segments.segment_prefix(path))
        for object_id in data.store.segment_object_ids(path):
            if object_id in known:
                continue
            instance = _as_received_instance(data.store.get(object_id))
            if instance is not None and ingest.index_stored(object_id, instance):
                indexed += 1
        if not segments.held(path):
            segments.mark_done(path)
    if indexed and audit:
        text = f"reconciliation: {indexed} stored instance(s) of a stopped receiver indexed"
        logger.warning(text)
        data.audit.record(AuditEvent(APPLICATION_ACTIVITY, "U", description=text))
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


def peer_rules(settings: Settings) -> list[PeerRule]:
    """The access rules of the configured peers."""
    return [PeerRule(p.ae_title, tuple(p.source_addresses), p.certificate_subject) for p in settings.peers]


class Receiver:
    """One Storage SCP with its ingest and audit hooks, over a data directory's store and index.

    Parameters
    ----------
    handover
        How it shares the port with the other receiver processes (default: it does not).
    """

    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        index: Index,
        secrets: NodeSecrets,
        audit: AuditLog,
        *,
        handover: Handover | None = None,
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
            on_refused_instance=self._instance_refused,
            ssl_context=server_context(n.tls) if n.tls is not None else None,
            max_associations=n.max_associations,
            max_per_address=n.max_connections_per_address,
            max_pdu_bytes=n.max_pdu_bytes,
            network_timeout_s=n.network_timeout_s,
            dimse_timeout_s=n.dimse_timeout_s,
            handover=handover,
            max_dataset_bytes=n.max_dataset_bytes,
            spool=store.spool,
        )

    def _logged_title(self, calling: str) -> str:
        """The calling AE title as the association log keeps it: a configured peer's, else
        ``(unknown)`` (a stranger's title is not ours to keep, nor a metric label to multiply)."""
        return calling if any(p.ae_title == calling for p in self.settings.peers) else UNKNOWN_CALLER

    def _log_association(self, calling: str, summary: AssociationSummary | None) -> None:
        """One row in the association log (``summary`` is ``None`` for a rejected association)."""
        title = self._logged_title(calling)
        try:
            if summary is None:
                self.ingest.index.record_association(title, "rejected", time.time())
            else:
                self.ingest.index.record_association(
                    title, summary.outcome, summary.started_at, summary.stored, summary.refused, summary.bytes_received
                )
        except AinodeError as exc:  # the log is for monitoring: never fail an association over it
            logger.warning("association not logged: %s", exc)

    def _association_refused(self, calling: str, address: str, reason: str) -> None:
        who = [Participant(calling or "unknown", requestor=True, address=address)]
        self.audit.record(security_alert(NODE_AUTHENTICATION, reason, who))
        self._log_association(calling, None)

    def _instance_refused(self, calling: str, address: str, status: str, reason: str) -> None:
        """Audit an instance refused for what it holds (the reason names the attribute, never its value)."""
        who = [
            Participant(self._logged_title(calling), SOURCE_ROLE, requestor=True, address=address),
            Participant(self.settings.node.ae_title, DESTINATION_ROLE),
        ]
        text = f"C-STORE refused ({status}): {reason}"[:300]
        self.audit.record(AuditEvent(INSTANCES_TRANSFERRED, "C", 4, participants=who, description=text))

    def _association_ended(self, summary: AssociationSummary) -> None:
        calling, address = summary.calling_ae_title, summary.address
        self._log_association(calling, summary)
        for study_uid, count in self.ingest.take_received(summary.association_id).items():
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
        """Stop accepting associations, write the queued index rows, close the segments."""
        self.scp.stop()
        self.ingest.close()


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux), and check it is not too late."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError) as exc:  # not Linux: the parent's shutdown still stops us
        logger.warning("receiver cannot follow its parent's death: %s", exc)
    if os.getppid() != parent_pid:
        os._exit(0)


def _receiver_main(
    config_path: str, number: int, parent_pid: int, log_level: str, inbox: socket.socket, ended: SharedCount,
    heartbeat: SharedTime,
) -> None:  # fmt: skip
    """Entry point of a child receiver process: it serves the connections the main process hands
    it over ``inbox``, counts each it finished in ``ended`` and beats ``heartbeat`` while it runs."""
    _die_with_parent(parent_pid)
    logs.configure(log_level)
    configure_pydicom()
    path = Path(config_path)
    settings = load_settings(path)
    data = open_data_dir(settings, role=f"receiver-{number}")
    handover = Handover(inbox=inbox, ended=ended)
    receiver = Receiver(settings, data.store, data.index, data.secrets, data.audit, handover=handover)
    data.store.on_tamper = receiver.tamper_detected
    done, reload_requested = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides (Ctrl-C reaches the group)
    signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
    receiver.start()
    heartbeat.value = time.monotonic()  # ready: the main process may hand it connections now
    logger.info("receiver %d listening (connections handed over by the main process)", number)
    while not done.wait(HEARTBEAT_S):
        heartbeat.value = time.monotonic()  # the main process hands connections only to a receiver that beats
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
    """The node's child receiver processes (numbers 1..count-1; the main process is receiver 0,
    whose Storage SCP hands connections to them through :attr:`dispatcher`)."""

    def __init__(self, config_path: Path, count: int, log_level: str = "INFO", network_timeout_s: float = 60.0) -> None:
        self.config_path = config_path
        self.count = count
        self.log_level = log_level
        # a receiver silent this long gets no connection; after hang_s it is restarted (both well
        # within the network timeout a sender waits before it gives up)
        self.hang_s = max(2 * HEARTBEAT_S, min(network_timeout_s / 2, 10.0))
        self.dispatcher = ConnectionDispatcher(stale_s=max(HEARTBEAT_S * 5, self.hang_s / 3))
        self._context = multiprocessing.get_context("spawn")
        self._processes: dict[int, BaseProcess] = {}
        self._heartbeats: dict[int, Any] = {}
        self._spawned_at: dict[int, float] = {}

    @property
    def handover(self) -> Handover:
        """The main receiver's part: accept, and hand connections to the least busy receiver."""
        return Handover(dispatcher=self.dispatcher if self.count > 1 else None)

    def _spawn(self, number: int) -> None:
        line, inbox = connection_line()  # a new line for each child process
        ended = self._context.Value("q", 0, lock=False)
        heartbeat = self._context.Value("d", 0.0, lock=False)
        process = self._context.Process(
            target=_receiver_main,
            args=(str(self.config_path), number, os.getpid(), self.log_level, inbox, ended, heartbeat),
            name=f"ainode-receiver-{number}",
            daemon=False,
        )
        process.start()
        inbox.close()  # the child has its own copy: when it dies, handing over to it fails
        self._processes[number], self._heartbeats[number] = process, heartbeat
        self._spawned_at[number] = time.monotonic()
        self.dispatcher.attach(number, line, ended, heartbeat)

    def start(self) -> None:
        """Start the child receivers (call from the main thread: a child dies with that thread)."""
        for number in range(1, self.count):
            self._spawn(number)

    def supervise(self, on_death: Callable[[], object] | None = None) -> None:
        """Restart any child receiver that has died (main thread); ``on_death`` runs first (the
        node indexes what the dead receiver stored but had not indexed yet)."""
        for number, process in list(self._processes.items()):
            if not process.is_alive():
                logger.error("receiver %d exited (code %s); restarting it", number, process.exitcode)
            elif self._hung(number):
                logger.error("receiver %d made no progress for %.0f s (stopped or hung); restarting it",
                             number, self.hang_s)  # fmt: skip
                process.kill()  # SIGKILL ends a stopped process too; its associations end with it
                process.join(5)
            else:
                continue
            if on_death is not None:
                on_death()
            self._spawn(number)

    def _hung(self, number: int) -> bool:
        """Whether child ``number`` has not beaten for ``hang_s`` (a minute's grace to start)."""
        last = self._heartbeats[number].value
        since = last if last > 0 else self._spawned_at[number] + 60.0
        return time.monotonic() - since > self.hang_s

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
        self.dispatcher.close()
