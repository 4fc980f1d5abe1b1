"""The composition root: builds the node's parts from a configuration and runs them.

Receive (``node.network``) -> store (``node.storage``) -> complete and route (``node.jobs``,
``node.routing``) -> de-identify (``node.deid``) -> analyse (``algorithms``) -> results
(``node.results``) -> deliver. Only this module knows all of them.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from pydantic import ValidationError

from algorithms.registry import Registry, select_device
from node.audit import (
    APPLICATION_ACTIVITY,
    APPLICATION_ROLE,
    APPLICATION_START,
    APPLICATION_STOP,
    DESTINATION_ROLE,
    INSTANCES_TRANSFERRED,
    NODE_AUTHENTICATION,
    OBJECT_SECURITY_ATTRIBUTES_CHANGED,
    SOFTWARE_CONFIGURATION,
    SOURCE_ROLE,
    AuditEvent,
    AuditLog,
    Participant,
    security_alert,
    study_event,
)
from node.dicomio import configure_pydicom
from node.errors import AinodeError, ConfigError, OutOfResourcesError, PluginError
from node.jobs.isolation import warm_up
from node.jobs.pipeline import Pipeline, Services
from node.jobs.retention import purge_expired
from node.jobs.scheduler import InProcessExecutor, Scheduler
from node.network.scp import PeerRule, ReceivedInstance, StorageSCP
from node.network.tls import server_context
from node.settings import config_digest, load_settings
from node.settings.models import Settings
from node.storage.index import Index, InstanceRow, JobState
from node.storage.keys import load_key_provider
from node.storage.secrets import NodeSecrets
from node.storage.store import ObjectStore

logger = logging.getLogger(__name__)


def check_algorithms(settings: Settings, registry: Registry, where: str) -> None:
    """Every algorithm a route names exists and accepts the route's parameters.

    Raises
    ------
    ConfigError
        ``FILE: routes[i].algorithms[j]: problem``.
    """
    for i, route in enumerate(settings.routes):
        for j, ref in enumerate(route.algorithms):
            key = f"{where}: routes[{i}].algorithms[{j}]"
            try:
                algorithm = registry.get(ref.name)
            except PluginError as exc:
                raise ConfigError(f"{key}: {exc}") from None
            try:
                algorithm.Params.model_validate(ref.parameters)
            except ValidationError as exc:
                err = exc.errors()[0]
                field = ".".join(str(x) for x in err["loc"])
                raise ConfigError(f"{key}.parameters.{field}: {err['msg']}") from None


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
        with self._lock:
            self._received[instance.association_id][instance.study_instance_uid] += 1

    def take_received(self, association_id: int) -> Counter[str]:
        """Instances received per Study Instance UID on an association (forgotten afterwards)."""
        with self._lock:
            return self._received.pop(association_id, Counter())


class Node:
    """A running ainode: Storage SCP, scheduler and job executor over one data directory."""

    def __init__(self, settings: Settings, registry: Registry | None = None, config_path: Path | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        configure_pydicom()
        data_dir = settings.node.data_dir
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.keys = load_key_provider(settings.keys)
        self.store = ObjectStore(data_dir / "store", self.keys, settings.node.min_free_disk_mb * 2**20)
        self.index = Index.for_data_dir(data_dir)
        self.secrets = NodeSecrets(self.store)
        syslog = (settings.audit.syslog_host, settings.audit.syslog_port) if settings.audit.syslog_host else None
        self.audit = AuditLog.for_data_dir(data_dir, self.store, settings.node.ae_title, syslog)
        self.store.on_tamper = self._tamper_detected
        self.registry = registry or Registry()
        check_algorithms(settings, self.registry, str(config_path or "configuration"))
        device = select_device()
        self.pipeline = Pipeline(
            Services(settings, self.store, self.index, self.secrets, self.registry, device, audit=self.audit)
        )
        self.executor = InProcessExecutor(self.pipeline.run_job, workers=1)
        self.scheduler = Scheduler(self.pipeline, self.index, settings, self.executor)
        n = settings.node
        self.ingest = Ingest(self.store, self.index, self.secrets, n.max_queued_jobs)
        rules = [PeerRule(p.ae_title, tuple(p.source_addresses), p.certificate_subject) for p in settings.peers]
        self.scp = StorageSCP(
            n.ae_title,
            rules,
            self.ingest,
            on_security_event=self._association_refused,
            on_release=self._association_ended,
            ssl_context=server_context(n.tls) if n.tls is not None else None,
            max_associations=n.max_associations,
            max_pdu_bytes=n.max_pdu_bytes,
            network_timeout_s=n.network_timeout_s,
            dimse_timeout_s=n.dimse_timeout_s,
        )
        self._stop = threading.Event()
        self._reload_lock = threading.Lock()
        logger.info("node ready", extra={"device": device, "algorithms": self.registry.names()})

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
                    INSTANCES_TRANSFERRED,
                    "C",
                    study_uid,
                    "instances received",
                    participants,
                    {"NumberOfInstances": str(count)},
                )
            )

    def _tamper_detected(self, object_id: str, reason: str) -> None:
        logger.error("stored object failed authentication; quarantined", extra={"object_id": object_id})
        self.audit.record(security_alert(OBJECT_SECURITY_ATTRIBUTES_CHANGED, f"tamper detected: {reason}"))

    def _application(self, event_type: tuple[str, str]) -> None:
        me = [Participant(self.settings.node.ae_title, APPLICATION_ROLE)]
        self.audit.record(AuditEvent(APPLICATION_ACTIVITY, "E", event_type=event_type, participants=me))

    def start(self) -> None:
        """Resume unfinished work, start the scheduler thread and listen for associations."""
        self._application(APPLICATION_START)
        threading.Thread(target=warm_up, name="ainode-warm-up", daemon=True).start()
        if self.config_path is not None:
            digest = config_digest(self.config_path)
            self.audit.record(security_alert(SOFTWARE_CONFIGURATION, f"configuration in force: sha256 {digest}"))
        self.scheduler.recover()
        retention = self.settings.storage.retention_days

        def housekeeping() -> int:
            return purge_expired(self.index, self.store, retention, self.audit)

        threading.Thread(
            target=self.scheduler.run, args=(self._stop, 0.25, housekeeping), name="ainode-scheduler", daemon=True
        ).start()
        self.scp.start(self.settings.node.host, self.settings.node.port)

    def stop(self) -> None:
        """Stop accepting associations, then let the running job finish (pending ones resume later)."""
        self.scp.stop()
        self._stop.set()
        self.executor.shutdown(wait=True)
        self._application(APPLICATION_STOP)
        self.index.engine.dispose()

    def reload(self) -> bool:
        """Load, validate and swap in the configuration file again (routes, peers, destinations,
        de-identification, audit); the old configuration stays when the new one is invalid.

        Changes to ``node`` or ``keys`` need a restart and are refused. Running associations and
        jobs are not disturbed: a job keeps the configuration it started with.
        """
        if self.config_path is None:
            return False
        try:
            new = load_settings(self.config_path)
            check_algorithms(new, self.registry, str(self.config_path))
            for section in ("node", "keys"):
                if getattr(new, section) != getattr(self.settings, section):
                    raise ConfigError(f"{self.config_path}: {section}: changed; this needs a restart")
        except AinodeError as exc:
            logger.error("configuration reload refused: %s", exc)
            self.audit.record(security_alert(SOFTWARE_CONFIGURATION, f"configuration reload refused: {exc}"))
            return False
        rules = [PeerRule(p.ae_title, tuple(p.source_addresses), p.certificate_subject) for p in new.peers]
        with self._reload_lock:
            self.scp.set_peers(rules)
            self.settings = new
            self.pipeline.s.settings = new
            self.scheduler.settings = new
        digest = config_digest(self.config_path)
        self.audit.record(security_alert(SOFTWARE_CONFIGURATION, f"configuration reloaded: sha256 {digest}"))
        logger.info("configuration reloaded", extra={"sha256": digest})
        return True

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT; SIGHUP reloads the configuration. Writes ``ainode.pid``."""
        done, reload_requested = threading.Event(), threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
        pid_file = self.settings.node.data_dir / "ainode.pid"
        pid_file.write_text(f"{os.getpid()}\n")
        self.start()
        while not done.wait(0.2):
            if reload_requested.is_set():
                reload_requested.clear()
                self.reload()
        logger.info("shutting down")
        self.stop()
        pid_file.unlink(missing_ok=True)
