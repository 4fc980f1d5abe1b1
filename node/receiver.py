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
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from node import logs, roles
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
from node.dicomio import configure_pydicom
from node.errors import AinodeError
from node.instances import STORAGE_SOP_CLASSES, ReceivedInstance
from node.monitoring.feedback import KOS_SOP_CLASS, ReaderFeedback
from node.network.association import Peer
from node.network.commitment import Commitment, send_report
from node.network.scp import AssociationSummary, Handover, PeerRule, StorageSCP
from node.network.tls import client_context, server_context
from node.network.transport import ConnectionDispatcher, SharedCount, SharedTime, connection_line
from node.process import ProcessLoop, freeze_start_up_objects, set_up_process_memory
from node.settings import ActiveSettings, load_settings
from node.settings.config import Settings
from node.storage.index import Index
from node.storage.ingest import Ingest
from node.storage.secrets import NodeSecrets
from node.storage.store import ObjectStore

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
HEARTBEAT_S = 0.2
"""How often a child receiver shows the main process that it runs."""
UNKNOWN_CALLER = "(unknown)"
COMMIT_WAIT_S = 5.0
"""How long a storage commitment waits for instances whose index rows are still queued."""


class AuditNotices:
    """:class:`~node.storage.ingest.Notices` written to the audit trail."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def activity(self, action: str, text: str) -> None:
        self.audit.record(AuditEvent(APPLICATION_ACTIVITY, action, description=text))

    def alert(self, text: str) -> None:
        self.audit.record(security_alert(OBJECT_SECURITY_ATTRIBUTES_CHANGED, text))


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
        settings: Settings | ActiveSettings,
        store: ObjectStore,
        index: Index,
        secrets: NodeSecrets,
        audit: AuditLog,
        *,
        handover: Handover | None = None,
    ) -> None:
        self.active = ActiveSettings.of(settings)
        self.audit = audit
        n = self.settings.node
        self.ingest = Ingest(store, index, secrets, n.max_queued_jobs)
        self.feedback = ReaderFeedback(index, secrets, audit, n.ae_title)
        self.scp = StorageSCP(
            n.ae_title,
            peer_rules(self.settings),
            self.receive,
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
            sop_classes=(*STORAGE_SOP_CLASSES.values(), KOS_SOP_CLASS),
            on_commitment=self._commit,
            on_commitment_report=self._commitment_reported,
        )
        self._secrets = secrets

    def receive(self, instance: ReceivedInstance) -> None:
        """One received instance (C-STORE or STOW-RS): a reader's rejection note is feedback
        (counted, never stored as a study), anything else is stored (:class:`~node.storage.ingest.Ingest`)."""
        if instance.sop_class_uid == KOS_SOP_CLASS:
            self.feedback(instance)
        else:
            self.ingest(instance)

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
        self._log_association(summary.calling_ae_title, summary)
        self.transfer_ended(summary.calling_ae_title, summary.address, summary.association_id)

    def transfer_ended(self, calling: str, address: str, transfer_id: int) -> None:
        """Audit what one association (or one STOW-RS request) stored: one record per study."""
        for study_uid, count in self.ingest.take_received(transfer_id).items():
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

    def _commit(self, calling: str, address: str, commitment: Commitment) -> None:
        """A peer asks the node to commit what it sent: answered now, reported from a thread."""
        threading.Thread(target=self._report_commitment, args=(calling, address, commitment),
                         name="ainode-commitment", daemon=True).start()  # fmt: skip

    def _report_commitment(self, calling: str, address: str, commitment: Commitment) -> None:
        """Report which of the instances are stored encrypted and durably (PS3.4 J.3.3); an
        instance whose index row is still queued is waited for briefly."""
        keys = {uid: self._secrets.index_key(uid) for _c, uid in commitment.references}
        deadline = time.monotonic() + COMMIT_WAIT_S
        while True:
            held = self.ingest.index.held_sop_keys(list(keys.values()))
            if len(held) == len(keys) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        committed = {uid for uid, key in keys.items() if key in held}
        settings = self.settings
        try:
            peer = settings.peer(calling)
            tls = client_context(settings.node.tls) if peer.tls and settings.node.tls is not None else None
            event = send_report(Peer(peer.ae_title, peer.host, peer.port, tls), settings.node.ae_title, commitment,
                                committed)  # fmt: skip
        except (AinodeError, KeyError) as exc:
            logger.error("storage commitment report not sent: %s", exc, extra={"calling_ae": calling})
            return
        text = (f"storage commitment reported to {calling}: {len(committed)} committed, "
                f"{len(keys) - len(committed)} failed (event type {event})")  # fmt: skip
        logger.info(text)
        who = [Participant(calling, SOURCE_ROLE, requestor=True, address=address),
               Participant(settings.node.ae_title, DESTINATION_ROLE)]  # fmt: skip
        self.audit.record(AuditEvent(INSTANCES_TRANSFERRED, "R", participants=who, description=text))

    def _commitment_reported(self, calling: str, address: str, report: Commitment) -> None:
        """A destination's report on a commitment a delivery asked for: recorded for the delivery."""
        failures = [f"0x{reason:04X}" for _c, _uid, reason in report.failed]
        committed = len(report.references)
        if not self.ingest.index.record_commitment_report(report.transaction_uid, calling, committed, failures):
            logger.warning("storage commitment report for a transaction not asked of this peer: ignored",
                           extra={"calling_ae": calling})  # fmt: skip

    def tamper_detected(self, object_id: str, reason: str) -> None:
        """Log and audit an object that failed authentication (the store has quarantined it)."""
        logger.error("stored object failed authentication; quarantined", extra={"object_id": object_id})
        self.audit.record(security_alert(OBJECT_SECURITY_ATTRIBUTES_CHANGED, f"tamper detected: {reason}"))

    @property
    def settings(self) -> Settings:
        """The configuration in force now."""
        return self.active.current

    def set_settings(self, settings: Settings) -> None:
        """Take a reloaded configuration (its peers; ``node`` changes need a restart)."""
        self.scp.set_peers(peer_rules(settings))
        self.active.replace(settings)

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
    set_up_process_memory(starts_children=False)
    configure_pydicom()
    path = Path(config_path)
    settings = load_settings(path)
    data = roles.receiver_data(settings, number)
    handover = Handover(inbox=inbox, ended=ended)
    receiver = Receiver(settings, data.store, data.index, data.secrets, data.audit, handover=handover)
    data.store.on_tamper = receiver.tamper_detected

    def beat() -> None:  # the main process hands connections only to a receiver that beats
        heartbeat.value = time.monotonic()

    def reload() -> None:
        try:
            receiver.set_settings(load_settings(path))
            logger.info("receiver %d reloaded its configuration", number)
        except AinodeError as exc:  # the main process validated it; keep the old peers
            logger.error("receiver %d kept its configuration: %s", number, exc)

    loop = ProcessLoop(data.refresh_keys, HEARTBEAT_S)
    loop.install(interrupt=False)  # Ctrl-C reaches the group: the node decides
    receiver.start()
    freeze_start_up_objects()
    beat()  # ready: the main process may hand it connections now
    logger.info("receiver %d listening (connections handed over by the main process)", number)
    loop.run(beat, reload)
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
