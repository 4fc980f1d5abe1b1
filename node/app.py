"""The composition root: builds the node's parts from a configuration and runs them.

Receive (``node.network``) -> store (``node.storage``) -> complete and route (``node.jobs``,
``node.routing``) -> de-identify (``node.deid``) -> analyse (``algorithms``) -> results
(``node.results``) -> deliver. Only this module knows all of them.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from algorithms.registry import Registry, select_device
from node.dicomio import configure_pydicom
from node.jobs.pipeline import Pipeline, Services
from node.jobs.scheduler import InProcessExecutor, Scheduler
from node.network.scp import ReceivedInstance, StorageSCP
from node.settings.models import Settings
from node.storage.index import Index, InstanceRow
from node.storage.keys import load_key_provider
from node.storage.secrets import NodeSecrets
from node.storage.store import ObjectStore

logger = logging.getLogger(__name__)


class Ingest:
    """Stores one received instance encrypted and durably, then indexes it (the C-STORE work).

    Only keyed digests of the UIDs reach the index; the encoded bytes go to the encrypted store.
    """

    def __init__(self, store: ObjectStore, index: Index, secrets: NodeSecrets) -> None:
        self.store = store
        self.index = index
        self.secrets = secrets

    def __call__(self, instance: ReceivedInstance) -> None:
        """Store ``instance``; raises :class:`~node.errors.StorageError` subclasses on failure."""
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


class Node:
    """A running ainode: Storage SCP, scheduler and job executor over one data directory."""

    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self.settings = settings
        configure_pydicom()
        data_dir = settings.node.data_dir
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.keys = load_key_provider(settings.keys)
        self.store = ObjectStore(data_dir / "store", self.keys, settings.node.min_free_disk_mb * 2**20)
        self.index = Index.for_data_dir(data_dir)
        self.secrets = NodeSecrets(self.store)
        self.registry = registry or Registry()
        device = select_device()
        self.pipeline = Pipeline(Services(settings, self.store, self.index, self.secrets, self.registry, device))
        self.executor = InProcessExecutor(self.pipeline.run_job, workers=1)
        self.scheduler = Scheduler(self.pipeline, self.index, settings, self.executor)
        n = settings.node
        self.scp = StorageSCP(
            n.ae_title,
            [p.ae_title for p in settings.peers],
            Ingest(self.store, self.index, self.secrets),
            max_associations=n.max_associations,
            max_pdu_bytes=n.max_pdu_bytes,
            network_timeout_s=n.network_timeout_s,
            dimse_timeout_s=n.dimse_timeout_s,
        )
        self._stop = threading.Event()
        logger.info("node ready", extra={"device": device, "algorithms": self.registry.names()})

    def start(self) -> None:
        """Resume unfinished work, start the scheduler thread and listen for associations."""
        self.scheduler.recover()
        threading.Thread(target=self.scheduler.run, args=(self._stop,), name="ainode-scheduler", daemon=True).start()
        self.scp.start(self.settings.node.host, self.settings.node.port)

    def stop(self) -> None:
        """Stop accepting associations, then let the running job finish (pending ones resume later)."""
        self.scp.stop()
        self._stop.set()
        self.executor.shutdown(wait=True)
        self.index.engine.dispose()

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT."""
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        done.wait()
        logger.info("shutting down")
        self.stop()
