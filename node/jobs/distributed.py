"""The Celery executor: job ids over RabbitMQ (or Redis) to ``ainode worker`` processes.

``node.executor: celery``. The node keeps receiving and planning; it sends each job's id to the
queue of the job's current stage (``celery.queue``; the analyse stage of an algorithm to its
``celery.analyse_queues`` entry, e.g. a GPU class). A worker (:func:`run_worker`) claims the job
in the shared ledger, runs its stages while they belong to its queues and hands the job on to
the next stage's queue otherwise. The message carries the id only; the ledger is the truth, so a
message delivered twice (``acks_late``: a worker killed mid-task has its message redelivered) or
lost (the node offers stale pending jobs again) changes nothing: a job runs under one lease.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from node.errors import ConfigError, ExecutorError
from node.jobs.pipeline import HANDED_OFF, Pipeline
from node.process import freeze_start_up_objects
from node.settings.config import Settings

logger = logging.getLogger(__name__)

TASK = "ainode.run_job"
"""The one task: run job ``job_id`` from its current stage."""
BROKER_ENV, BACKEND_ENV = "AINODE_BROKER_URL", "AINODE_RESULT_BACKEND"


def broker_url(settings: Settings) -> str:
    """The broker URL: ``celery.broker_url`` or ``$AINODE_BROKER_URL``.

    Raises
    ------
    ConfigError
        Neither is set.
    """
    url = settings.celery.broker_url or os.environ.get(BROKER_ENV)
    if not url:
        raise ConfigError(f"node.executor is celery: set celery.broker_url or {BROKER_ENV}")
    return url


def make_app(settings: Settings) -> Any:
    """The Celery application of this configuration (JSON messages, late acknowledgement, one
    message prefetched per worker thread, results ignored: outcomes are in the ledger)."""
    from celery import Celery  # only the processes that use Celery import it

    app = Celery(
        "ainode", broker=broker_url(settings), backend=settings.celery.result_backend or os.environ.get(BACKEND_ENV)
    )
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.celery.queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        enable_utc=True,
    )
    return app


def broker_reachable(settings: Settings, timeout_s: float = 5.0) -> None:
    """Connect to the broker once (for health probes).

    Raises
    ------
    ExecutorError
        The broker does not answer within ``timeout_s``.
    """
    from kombu import Connection

    try:
        with Connection(broker_url(settings), connect_timeout=timeout_s) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout_s)
    except Exception as exc:  # kombu and py-amqp raise their own and OSError subclasses
        raise ExecutorError(f"broker unreachable: {type(exc).__name__}") from None


class CeleryExecutor:
    """Sends job ids to the queue of their current stage (the node side of ``node.executor: celery``)."""

    def __init__(self, app: Any, pipeline: Pipeline) -> None:
        self.app, self.pipeline = app, pipeline

    def submit(self, job_id: int, priority: str = "routine") -> None:
        """Send ``job_id`` to its stage's queue (``priority`` orders nothing on a plain queue; the
        ledger keeps the job ``pending`` until a worker claims it).

        Raises
        ------
        ExecutorError
            The broker cannot be reached (transient: the job stays ``pending`` and is sent again).
        """
        job = self.pipeline.s.index.job(job_id)
        if job is None:
            return
        queue = self.pipeline.stage_queue(job)
        try:
            self.app.send_task(TASK, args=[job_id], queue=queue)
        except Exception as exc:  # kombu raises its own and OSError subclasses; the ledger keeps the job
            raise ExecutorError(f"broker unreachable, job {job_id} not sent to {queue}: {exc}") from None

    def shutdown(self, wait: bool = True) -> None:
        """Close the broker connections (jobs in flight belong to the workers)."""
        self.app.close()


def run_worker(pipeline: Pipeline, queues: Sequence[str], concurrency: int, name: str) -> None:
    """Consume ``queues`` and run the jobs they carry until SIGTERM (warm shutdown: running jobs
    finish) or SIGKILL (their leases expire and another worker takes them over).

    Parameters
    ----------
    pipeline
        The worker's pipeline over the shared ledger and store (its ``worker`` id in the ledger).
    queues
        The queues to consume (e.g. ``ainode`` for de-identify/build/deliver, ``gpu`` for analyse).
    concurrency
        Jobs run at once (threads; one per GPU is usual).
    name
        The Celery node name.
    """
    settings = pipeline.s.settings
    app = make_app(settings)
    executor = CeleryExecutor(app, pipeline)
    served = list(queues)

    @app.task(name=TASK)
    def run_job(job_id: int) -> str:
        state = pipeline.run_job(job_id, served)
        if state == HANDED_OFF:
            executor.submit(job_id)  # the next stage's queue
        return str(state)

    worker = app.Worker(
        queues=served, concurrency=concurrency, pool="threads", hostname=name, loglevel="INFO",
        without_mingle=True, without_gossip=True, optimization="fair",
    )  # fmt: skip
    logger.info("worker consuming %s", ", ".join(served), extra={"worker": pipeline.s.worker})
    from node.results.warmup import warm_up  # highdicom's tables, loaded while the worker connects

    def warm() -> None:
        warm_up(settings.node.ae_title)
        freeze_start_up_objects()

    threading.Thread(target=warm, name="ainode-warm-up", daemon=True).start()
    worker.start()
