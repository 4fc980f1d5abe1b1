"""Prometheus metrics of a node, read from the shared ledger and store at scrape time.

Reading the ledger (not counters kept in memory) makes the figures the fleet's: jobs run by
``ainode worker`` processes on other hosts and instances received by the node's receiving
processes are in the index all of them share. Label values are states, priorities, stage names
and calling AE titles (device names): never a UID, a name, an ID or a date.

Metrics (``ainode_`` prefix)::

    instances_received_total{calling_ae_title}   instances in the index, by the sender of their study
    studies{state}                               studies by state
    jobs{state}                                  jobs by state
    queue_depth{priority}                        jobs pending, by their route's priority
    dead_letters                                 failed jobs (node.storage.reports.DEAD_LETTER)
    leases_held                                  running jobs under a live lease
    delivery_attempts_total                      failed attempts of every job (retried or dead)
    stage_seconds{stage}                         histogram of delivered jobs' stage durations
    receive_to_delivery_seconds                  histogram: study's last instance -> results delivered
    disk_free_bytes, disk_watermark_bytes         the store's file system and the refusal watermark
    store_objects                                encrypted objects the index names (instances, maps, results)
    associations_total{calling_ae_title,outcome}  associations logged: released, aborted, rejected
    instances_total{calling_ae_title,status}     C-STORE requests answered, by status (SUCCESS or the refusal)
    received_bytes_total{calling_ae_title}       bytes of data sets received
    model_load_seconds{model,device}             how long the model's last load took in its worker
    model_memory_bytes{model,device}             memory of a loaded model's weights
    gpu_memory_bytes{device}                     GPU memory reserved by the device's model worker
    model_drift{model,version,feature}           PSI of an input or output feature, recent vs reference window
    model_runs_total{model,version,role,outcome} jobs of a model version (live, canary, shadow) by outcome
    model_outcome_ratio{model,version,outcome}   share of the recent window failed, refused, timed out, quarantined
    model_inference_seconds_median{model,version,window}   median seconds per run, reference and recent window
    model_window_studies{model,version,window}   jobs in each drift window
    model_rejections_total{model,version,reason_code}      results rejected by readers (IOCM rejection notes)

``stage_seconds`` has the stages ``receive_to_complete`` (the study's last instance -> its jobs
planned), ``deidentify``, ``load_volume``, ``inference``, ``build`` and ``deliver``. A calling AE
title that is no configured peer is logged as ``(unknown)``, so label values stay bounded.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from node.jobs.model_workers import read_status
from node.monitoring.summary import ModelSummary, model_summaries
from node.settings.config import Settings
from node.storage.index import Index, JobState, StudyState
from node.storage.reports import Reports
from node.storage.store import ObjectStore

STAGES = {
    "deidentify": "deidentify_s",
    "load_volume": "load_volume_s",
    "inference": "algorithm_s",
    "build": "build_results_s",
    "deliver": "send_s",
}
"""Stage label -> the job timing it is read from."""
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 150.0, 600.0)


def _histogram(name: str, doc: str, labels: list[str], series: dict[tuple[str, ...], list[float]]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for label_values, values in series.items():
        counts = [sum(1 for v in values if v <= bound) for bound in BUCKETS]
        buckets = [(str(b), float(c)) for b, c in zip(BUCKETS, counts, strict=True)] + [("+Inf", float(len(values)))]
        family.add_metric(list(label_values), buckets, sum(values))
    return family


class LedgerCollector(Collector):
    """Collects the metrics listed in the module docstring from ``index`` and ``store``.

    Parameters
    ----------
    index, store
        The node's index (the shared ledger) and encrypted store.
    settings
        A callable returning the configuration in force (routes' priorities, the disk watermark).
    """

    def __init__(self, index: Index, store: ObjectStore, settings: Any) -> None:
        self.index, self.store, self.settings = index, store, settings

    def collect(self) -> Iterator[Metric]:
        """One scrape (a few aggregate queries and one pass over the delivered jobs' timings)."""
        settings: Settings = self.settings()
        reports = Reports(self.index)
        counts = reports.counts()
        by_ae = reports.received_by_calling_ae()
        associations, refusals = reports.associations()
        delivered = reports.delivered_timings()
        received = CounterMetricFamily(
            "ainode_instances_received", "Instances received and indexed, by calling AE title",
            labels=["calling_ae_title"],
        )  # fmt: skip
        for ae_title, count in by_ae:
            received.add_metric([ae_title], float(count))
        yield received
        yield _gauges("ainode_studies", "Studies by state", "state", counts.studies, [s.value for s in StudyState])
        yield _gauges("ainode_jobs", "Jobs by state", "state", counts.jobs, [s.value for s in JobState])
        priority = {r.name: r.priority for r in settings.routes}
        depth: dict[str, int] = {}
        for route, count in counts.pending_routes.items():
            depth[priority.get(route, "routine")] = depth.get(priority.get(route, "routine"), 0) + count
        yield _gauges("ainode_queue_depth", "Jobs pending, by priority", "priority", depth,
                      ["stat", "routine", "background"])  # fmt: skip
        yield GaugeMetricFamily(
            "ainode_dead_letters", "Jobs failed (dead letters: waiting for an administrator)", value=counts.dead_letters
        )
        yield GaugeMetricFamily("ainode_leases_held", "Running jobs under a live lease", value=counts.leases_held)
        yield CounterMetricFamily(
            "ainode_delivery_attempts", "Failed attempts of all jobs (retried or dead-lettered)",
            value=float(counts.failed_attempts),
        )  # fmt: skip
        stages: dict[tuple[str, ...], list[float]] = {(label,): [] for label in ["receive_to_complete", *STAGES]}
        turnaround: list[float] = []
        for timings_json, last_received, planned_at in delivered:
            timings = json.loads(timings_json)
            stages[("receive_to_complete",)].append(max(0.0, planned_at - last_received))
            for label, key in STAGES.items():
                if isinstance(timings.get(key), int | float):
                    stages[(label,)].append(float(timings[key]))
            if isinstance(timings.get("delivered_at"), int | float):
                turnaround.append(max(0.0, float(timings["delivered_at"]) - last_received))
        yield _histogram("ainode_stage_seconds", "Duration of each stage of delivered jobs", ["stage"], stages)
        yield _histogram(
            "ainode_receive_to_delivery_seconds", "Study's last instance received -> its results delivered", [],
            {(): turnaround},
        )  # fmt: skip
        usage = shutil.disk_usage(self.store.root)
        yield GaugeMetricFamily("ainode_disk_free_bytes", "Free space on the store's file system", value=usage.free)
        watermark = settings.node.min_free_disk_mb * 2**20
        yield GaugeMetricFamily(
            "ainode_disk_watermark_bytes", "Free space below which C-STORE is refused (A700)", value=watermark
        )
        # counted from the index (instances, maps, results), not by listing the store at each scrape
        stored = counts.stored_objects
        yield GaugeMetricFamily("ainode_store_objects", "Encrypted objects the index names", value=stored)
        yield from _association_metrics(associations, refusals)
        yield from _model_metrics(read_status(settings.node.data_dir / "run"))
        yield from monitoring_metrics(model_summaries(self.index, settings.monitoring))


def monitoring_metrics(summaries: Iterable[ModelSummary]) -> Iterator[Metric]:
    """The models' monitoring metrics (:mod:`node.monitoring`), per model and version."""
    labels = ["model", "version"]
    drift = GaugeMetricFamily("ainode_model_drift", "PSI of a feature, recent window vs reference window",
                              labels=[*labels, "feature"])  # fmt: skip
    runs = CounterMetricFamily("ainode_model_runs", "Jobs of the model version by role and outcome",
                               labels=[*labels, "role", "outcome"])  # fmt: skip
    ratio = GaugeMetricFamily("ainode_model_outcome_ratio", "Share of the recent window's jobs with this outcome",
                              labels=[*labels, "outcome"])  # fmt: skip
    seconds = GaugeMetricFamily("ainode_model_inference_seconds_median", "Median seconds per run in the window",
                                labels=[*labels, "window"])  # fmt: skip
    window = GaugeMetricFamily("ainode_model_window_studies", "Jobs in the drift window", labels=[*labels, "window"])
    rejections = CounterMetricFamily("ainode_model_rejections", "Results rejected by readers (IOCM rejection notes)",
                                     labels=[*labels, "reason_code"])  # fmt: skip
    for m in summaries:
        for d in m.drift:
            drift.add_metric([m.model, m.version, d.feature], d.psi)
        for (role, outcome), count in m.role_outcomes.items():
            runs.add_metric([m.model, m.version, role, outcome], float(count))
        for outcome, share in m.recent_ratios.items():
            ratio.add_metric([m.model, m.version, outcome], share)
        for name, value in m.inference_s.items():
            if value is not None:
                seconds.add_metric([m.model, m.version, name], value)
        window.add_metric([m.model, m.version, "reference"], float(m.reference_n))
        window.add_metric([m.model, m.version, "recent"], float(m.recent_n))
        for (code, _reason), count in m.rejections.items():
            rejections.add_metric([m.model, m.version, code], float(count))
    yield from (drift, runs, ratio, seconds, window, rejections)


def _association_metrics(associations: Iterable[Any], refusals: Iterable[Any]) -> Iterator[Metric]:
    """Associations by outcome, C-STORE requests by status and bytes, per calling AE title."""
    outcomes = CounterMetricFamily(
        "ainode_associations", "Associations, by calling AE title and outcome", labels=["calling_ae_title", "outcome"]
    )
    statuses = CounterMetricFamily(
        "ainode_instances", "C-STORE requests answered, by calling AE title and status",
        labels=["calling_ae_title", "status"],
    )  # fmt: skip
    received = CounterMetricFamily("ainode_received_bytes", "Bytes of data sets received", labels=["calling_ae_title"])
    stored: Counter[str] = Counter()
    bytes_by_ae: Counter[str] = Counter()
    for ae_title, outcome, count, instances, size in associations:
        outcomes.add_metric([ae_title, outcome], float(count))
        stored[ae_title] += int(instances)
        bytes_by_ae[ae_title] += int(size)
    refused: Counter[tuple[str, str]] = Counter()
    for ae_title, refused_json in refusals:
        for status, n in json.loads(refused_json).items():
            refused[(ae_title, status)] += int(n)
    for ae_title, n in stored.items():
        statuses.add_metric([ae_title, "SUCCESS"], float(n))
    for (ae_title, status), n in refused.items():
        statuses.add_metric([ae_title, status], float(n))
    for ae_title, n in bytes_by_ae.items():
        received.add_metric([ae_title], float(n))
    yield from (outcomes, statuses, received)


def _model_metrics(workers: list[dict[str, Any]]) -> Iterator[Metric]:
    """Model load time and memory per model and device; GPU memory per device (model workers' status)."""
    load = GaugeMetricFamily("ainode_model_load_seconds", "Last load of a model in its worker",
                             labels=["model", "device"])  # fmt: skip
    memory = GaugeMetricFamily("ainode_model_memory_bytes", "Memory of a loaded model's weights",
                               labels=["model", "device"])  # fmt: skip
    gpu = GaugeMetricFamily("ainode_gpu_memory_bytes", "GPU memory reserved by the device's model worker",
                            labels=["device"])  # fmt: skip
    for worker in workers:
        for name, model in worker.get("models", {}).items():
            device = str(model.get("device", worker.get("device", "")))
            load.add_metric([name, device], float(model.get("load_s", 0.0)))
            memory.add_metric([name, device], float(model.get("memory_bytes", 0)))
        if "gpu_memory_bytes" in worker:
            gpu.add_metric([str(worker.get("device", ""))], float(worker["gpu_memory_bytes"]))
    yield from (load, memory, gpu)


def _gauges(name: str, doc: str, label: str, values: dict[str, int], always: Iterable[str]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key in dict.fromkeys([*always, *values]):
        family.add_metric([key], float(values.get(key, 0)))
    return family
