"""The composition root: builds the node's parts from a configuration and runs them.

Receive (``node.network``) -> store (``node.storage``) -> complete and route (``node.jobs``,
``node.routing``) -> de-identify (``node.deid``) -> analyse (``algorithms``) -> results
(``node.results``) -> deliver. Only this module knows all of them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from ainode_sdk.base import Device
from ainode_sdk.errors import AlgorithmError
from ainode_sdk.registry import Registry
from node import roles
from node.audit import (
    APPLICATION_ACTIVITY,
    APPLICATION_ROLE,
    APPLICATION_START,
    APPLICATION_STOP,
    SOFTWARE_CONFIGURATION,
    AuditEvent,
    Participant,
    security_alert,
)
from node.datadir import DataDir
from node.dicomio import configure_pydicom
from node.errors import AinodeError, ConfigError
from node.health import disk_problem, index_problem, scp_problem, store_problem
from node.jobs.devices import DeviceInfo, DevicePool
from node.jobs.isolation import probe_devices, warm_up
from node.jobs.leases import Heartbeat, worker_id
from node.jobs.model_workers import ModelWorkers
from node.jobs.pipeline import Pipeline, Services
from node.jobs.readahead import ReadAhead
from node.jobs.retention import purge_expired, sweep_stage_outputs
from node.jobs.scheduler import InProcessExecutor, JobExecutor, Scheduler
from node.process import ProcessLoop, freeze_start_up_objects, set_up_process_memory
from node.receiver import AuditNotices, Receiver, ReceiverPool
from node.routing.canary import CANARY_SECRET
from node.settings import ActiveSettings, config_digest, load_settings
from node.settings.config import Settings
from node.storage.ingest import reconcile, reconcile_segments

if TYPE_CHECKING:
    from node.console.app import ConsoleServer

logger = logging.getLogger(__name__)


def check_algorithms(settings: Settings, registry: Registry, where: str) -> None:
    """The declared models join the registry; every algorithm a route names exists and accepts the
    route's parameters.

    Raises
    ------
    ConfigError
        ``FILE: routes[i].algorithms[j]: problem``.
    """
    try:
        registry.set_models(settings.models)
    except AlgorithmError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    for i, route in enumerate(settings.routes):
        for j, ref in enumerate(route.algorithms):
            key = f"{where}: routes[{i}].algorithms[{j}]"
            served = [(key, ref.name, ref.parameters)]
            if ref.canary is not None:
                served.append((f"{key}.canary", ref.canary.algorithm, ref.canary.parameters))
            if j == 0:
                served += [(f"{where}: routes[{i}].shadow[{k}]", s.algorithm, s.parameters)
                           for k, s in enumerate(route.shadow)]  # fmt: skip
            for at, name, parameters in served:
                try:
                    algorithm = registry.get(name)
                except AlgorithmError as exc:
                    raise ConfigError(f"{at}: {exc}") from None
                try:
                    algorithm.Params.model_validate(parameters)
                except ValidationError as exc:
                    err = exc.errors()[0]
                    field = ".".join(str(x) for x in err["loc"])
                    raise ConfigError(f"{at}.parameters.{field}: {err['msg']}") from None


def job_services(
    active: ActiveSettings,
    data: DataDir,
    registry: Registry,
    where: str,
    role: str,
    probed: tuple[Device, list[DeviceInfo]] | None = None,
) -> tuple[Services, int]:
    """What runs jobs in this process (a node's job threads or an ``ainode worker``): the data
    directory's parts, the checked registry, the devices (probed in a child: the process itself
    never imports torch; ``probed`` when that was done already), the model workers and this
    process's worker id in the ledger.

    Returns
    -------
    Services, int
        The services and the number of GPUs found.

    Raises
    ------
    ConfigError
        A route names an unknown algorithm or parameters it does not accept.
    """
    settings = active.current
    check_algorithms(settings, registry, where)
    device, gpus = probed if probed is not None else probe_devices()
    services = Services(
        active, data.store, data.index, data.secrets, registry, device, audit=data.audit,
        devices=DevicePool(gpus), models=ModelWorkers(settings.node.data_dir / "run"), worker=worker_id(role),
    )  # fmt: skip
    logger.info("jobs run here", extra={"device": device, "algorithms": registry.names(), "worker": services.worker})
    return services, len(gpus)


class Node:
    """A running ainode: Storage SCP, scheduler and job executor over one data directory."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry | None = None,
        config_path: Path | None = None,
        log_level: str = "INFO",
    ) -> None:
        self.active = ActiveSettings(settings)
        self.config_path = config_path
        set_up_process_memory()  # before the first instance's buffers and the forkserver (the probe starts it)
        # the devices are probed in a child of the forkserver, whose imports (torch) take seconds:
        # the node receives meanwhile, and its job side starts once they are known (start)
        probe = ThreadPoolExecutor(1, thread_name_prefix="ainode-device-probe")
        self._probe = probe.submit(probe_devices)
        probe.shutdown(wait=False)  # the thread ends with the probe
        configure_pydicom()
        data = self.data = roles.node_data(settings)
        self.store, self.index, self.secrets, self.audit = data.store, data.index, data.secrets, data.audit
        self.registry = registry or Registry()
        self.where = str(config_path or "configuration")
        check_algorithms(settings, self.registry, self.where)  # a bad configuration is refused at once
        self.secrets.get("index")  # created now, before any other receiving process needs it
        self.secrets.get(CANARY_SECRET)  # and before a full disk could stop a canary from being planned
        receivers = settings.node.receivers if config_path is not None else 1
        self.pool = (
            ReceiverPool(config_path, receivers, log_level, settings.node.network_timeout_s)
            if config_path is not None else None
        )  # fmt: skip
        handover = self.pool.handover if self.pool is not None else None
        self.receiver = Receiver(self.active, self.store, self.index, self.secrets, self.audit, handover=handover)
        self.store.on_tamper = self.receiver.tamper_detected
        self.pipeline: Pipeline | None = None
        self.executor: JobExecutor | None = None
        self.heartbeat: Heartbeat | None = None
        self.scheduler: Scheduler | None = None
        self.models: ModelWorkers | None = None
        self.device, self.gpus = "starting", list[DeviceInfo]()
        self._stop = threading.Event()
        self._reload_lock = threading.Lock()
        self._algorithms_ready = threading.Event()
        self.console = self._console() if settings.console.port is not None else None
        logger.info("node ready to receive", extra={"executor": settings.node.executor})

    @property
    def settings(self) -> Settings:
        """The configuration in force now."""
        return self.active.current

    def _start_jobs(self) -> None:
        """The job side, once the devices are known: pipeline, executor, lease heartbeat and
        scheduler; unfinished jobs of an earlier run resume."""
        device, gpus = self._probe.result()
        with self._reload_lock:
            settings = self.settings
            services, n_gpus = job_services(self.active, self.data, self.registry, self.where, "node", (device, gpus))
            assert services.models is not None
            self.device, self.gpus, self.models = device, gpus, services.models
            self.pipeline = pipeline = Pipeline(services)
            if settings.node.executor == "celery":  # jobs run in `ainode worker` processes
                from node.jobs.distributed import CeleryExecutor, make_app

                self.executor = CeleryExecutor(make_app(settings), pipeline)
            else:  # one job thread per GPU (each GPU has its model worker), one on a CPU-only node
                self.executor = InProcessExecutor(pipeline.run_job, workers=max(1, n_gpus))
                pipeline.stages.read_ahead = read_ahead = ReadAhead(services, pipeline.headers)
                threading.Thread(
                    target=read_ahead.run, args=(self._stop,), name="ainode-read-ahead", daemon=True
                ).start()
            self.heartbeat = Heartbeat(self.index, services.worker, settings.node.lease_s, pipeline.running)
            self.scheduler = scheduler = Scheduler(pipeline, self.index, self.active, self.executor)
        threading.Thread(target=self._warm_up, name="ainode-warm-up", daemon=True).start()
        self.heartbeat.start()
        scheduler.recover()
        retention = settings.storage.retention_days

        def housekeeping() -> int:
            sweep_stage_outputs(self.index, self.store)
            self.index.prune_associations(time.time() - retention * 86400)  # the log follows retention
            return purge_expired(self.index, self.store, retention, self.audit)

        threading.Thread(
            target=scheduler.run, args=(self._stop, 0.25, housekeeping), name="ainode-scheduler", daemon=True
        ).start()

    def _console(self) -> ConsoleServer:
        """The console over this node's ledger, store and configuration (``console.port``)."""
        from node.console.app import ConsoleServer, create_app  # the web stack only where it is served
        from node.console.metrics import LedgerCollector
        from node.console.service import ConsoleContext, ConsoleService

        collector = LedgerCollector(self.index, self.store, lambda: self.settings)

        def algorithms() -> str | None:
            return None if self._algorithms_ready.is_set() else "algorithm process server starting"

        checks = {
            "scp": lambda: scp_problem(self.settings.node),
            "index": lambda: index_problem(self.index),
            "disk": lambda: disk_problem(self.store),
            "store": lambda: store_problem(self.store),
            "algorithms": algorithms,
        }
        context = ConsoleContext(
            settings=lambda: self.settings, data=self.data, registry=self.registry, reload=self.reload_problem,
            devices=lambda: (self.device, self.gpus), config_path=self.config_path,
        )  # fmt: skip
        console = self.settings.console
        stow = None
        if self.settings.dicomweb.clients:
            from node.instances import STORAGE_SOP_CLASSES
            from node.monitoring.feedback import KOS_SOP_CLASS
            from node.network.stow import StowApp

            accepted = frozenset([*STORAGE_SOP_CLASSES.values(), KOS_SOP_CLASS])
            stow = StowApp(lambda: self.settings, self.receiver, self.store.spool, accepted)
        app = create_app(collector, checks, ConsoleService(context), console, stow)
        return ConsoleServer(app, console.host, console.port or 0, console.tls, console.trusted_proxies)

    def _application(self, event_type: tuple[str, str]) -> None:
        me = [Participant(self.settings.node.ae_title, APPLICATION_ROLE)]
        self.audit.record(AuditEvent(APPLICATION_ACTIVITY, "E", event_type=event_type, participants=me))

    def _warm_up(self) -> None:
        warm_up()
        from node.results.warmup import warm_up as warm_up_results  # highdicom and its tables, now

        warm_up_results(self.settings.node.ae_title)
        freeze_start_up_objects()  # full collections no longer scan what start-up and warm-up made

        self._algorithms_ready.set()
        logger.info("algorithm process server ready")

    def start(self) -> None:
        """Make store and index agree, listen for associations (here and in the child receivers,
        when ``node.receivers`` > 1), serve the console, then start the job side (it waits for the
        device probe) and resume unfinished work."""
        self._application(APPLICATION_START)
        reconcile(self.receiver.ingest, AuditNotices(self.audit))  # after a crash: store and index agree again
        if self.config_path is not None:
            digest = config_digest(self.config_path)
            self.audit.record(security_alert(SOFTWARE_CONFIGURATION, f"configuration in force: sha256 {digest}"))
        self.receiver.start()
        if self.pool is not None:
            self.pool.start()
        if self.console is not None:
            self.console.start()
        self._start_jobs()

    def stop(self) -> None:
        """Stop accepting associations, then let the running job finish (pending ones resume later)."""
        if self.console is not None:
            self.console.stop()
        self.receiver.stop()
        if self.pool is not None:
            self.pool.stop()
        self._stop.set()
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.models is not None:
            self.models.stop()
        self._application(APPLICATION_STOP)
        self.data.close()

    def reload(self) -> bool:
        """Load, validate and swap in the configuration file again (routes, peers, destinations,
        de-identification, audit); the old configuration stays when the new one is invalid.

        Changes to ``node``, ``keys`` or ``console`` need a restart and are refused. Running
        associations and jobs are not disturbed: a job keeps the configuration it started with.
        """
        return self.reload_problem() is None

    def reload_problem(self) -> str | None:
        """:meth:`reload`, returning ``None`` when done, else why it was refused (file, line, key)."""
        if self.config_path is None:
            return "the node was started without a configuration file"
        try:
            new = load_settings(self.config_path)
            for section in ("node", "keys", "console"):
                if getattr(new, section) != getattr(self.settings, section):
                    raise ConfigError(f"{self.config_path}: {section}: changed; this needs a restart")
            check_algorithms(new, self.registry, str(self.config_path))
        except AinodeError as exc:
            logger.error("configuration reload refused: %s", exc)
            self.audit.record(security_alert(SOFTWARE_CONFIGURATION, f"configuration reload refused: {exc}"))
            return str(exc)
        with self._reload_lock:
            self.receiver.set_settings(new)  # its peers; and the one holder everything here reads
            if self.pool is not None:
                self.pool.reload()
        digest = config_digest(self.config_path)
        self.audit.record(security_alert(SOFTWARE_CONFIGURATION, f"configuration reloaded: sha256 {digest}"))
        logger.info("configuration reloaded", extra={"sha256": digest})
        return None

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT; SIGHUP reloads the configuration. Writes ``ainode.pid``."""
        loop = ProcessLoop(self.data.refresh_keys)
        loop.install()  # before the pid file tells `ainode config reload` where to send SIGHUP
        pid_file = self.settings.node.data_dir / "ainode.pid"
        pid_file.write_text(f"{os.getpid()}\n")
        self.start()

        def supervise() -> None:
            if self.pool is not None:
                self.pool.supervise(lambda: reconcile_segments(self.receiver.ingest, AuditNotices(self.audit)))

        loop.run(supervise, self.reload)
        logger.info("shutting down")
        self.stop()
        pid_file.unlink(missing_ok=True)


class Worker:
    """An ``ainode worker``: runs the stages of jobs that Celery brings from ``queues``, over the
    same data directory (shared store path, PostgreSQL ledger) as the node that planned them."""

    def __init__(self, settings: Settings, queues: list[str], concurrency: int = 1,
                 config_path: Path | None = None) -> None:  # fmt: skip
        self.active, self.queues, self.concurrency = ActiveSettings(settings), queues, concurrency
        set_up_process_memory()  # before job_services probes the devices (starting the forkserver)
        configure_pydicom()
        self.data = roles.worker_data(settings)
        services, _gpus = job_services(
            self.active, self.data, Registry(), str(config_path or "configuration"), "worker"
        )
        self.pipeline = Pipeline(services)
        self.heartbeat = Heartbeat(self.data.index, services.worker, settings.node.lease_s, self.pipeline.running)

    def serve_forever(self) -> None:
        """Consume the queues until SIGTERM (running jobs finish first)."""
        from node.jobs.distributed import run_worker

        self.heartbeat.start()
        loop = ProcessLoop(self.data.refresh_keys)  # Celery owns the main thread and its signals
        loop.refresh_keys_in_background()
        name = f"ainode-worker-{self.pipeline.s.worker.rsplit('/', 1)[-1]}@{os.uname().nodename}"
        try:
            run_worker(self.pipeline, self.queues, self.concurrency, name)
        finally:
            loop.stop()
            self.heartbeat.stop()
            if self.pipeline.s.models is not None:
                self.pipeline.s.models.stop()
            self.data.close()
