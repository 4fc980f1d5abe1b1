"""The work done on a complete study: route, de-identify, analyse, build results, re-identify, deliver.

:meth:`Pipeline.plan` turns a quiet study into jobs (one per route, algorithm and series);
:meth:`Pipeline.run_job` runs one job end to end. Both are functions of ids in the index and
objects in the encrypted store, so any executor (in-process threads now, Celery workers later)
can run them, and a job can be re-run after a crash.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from pydicom import Dataset

from algorithms import errors as sdk
from algorithms.base import AlgorithmResult, Device, Volume
from algorithms.models.spec import ModelDeclaration
from algorithms.registry import Registry, check_accepts
from node import faults
from node.audit import (
    DESTINATION_ROLE,
    INSTANCES_ACCESSED,
    INSTANCES_TRANSFERRED,
    SOURCE_ROLE,
    AuditLog,
    Participant,
    study_event,
)
from node.deid import InstanceDeidentifier
from node.deid.pseudonyms import Pseudonymizer, derive_uid
from node.deid.reid import PseudonymMap, reidentify
from node.dicomio import decode, encode
from node.errors import (
    AinodeError,
    ConfigError,
    DeidentificationError,
    OutOfResourcesError,
    PluginError,
    QuarantinedError,
    StorageError,
    is_transient,
)
from node.jobs.delivery import deliver, withdraw
from node.jobs.devices import DevicePool
from node.jobs.isolation import SharedVolume, run_isolated
from node.jobs.models import ModelWorkers
from node.jobs.volume import load_volume
from node.results import build_rejection_note, build_results
from node.routing.router import RoutePlan, plan_routes
from node.routing.rules import header_of, keywords_of, matches, prepare
from node.settings.models import Deidentification, ResultKind, Settings
from node.storage.index import Index, InstanceRow, JobState, PlannedJob, StudyState
from node.storage.secrets import PSEUDONYM_SECRET, NodeSecrets
from node.storage.store import ObjectStore

logger = logging.getLogger(__name__)

FINISHED_JOB_STATES = (JobState.DELIVERED, JobState.REFUSED, JobState.QUARANTINED, JobState.SUPERSEDED)


@dataclass
class Services:
    """What the pipeline needs, passed in (no module globals)."""

    settings: Settings
    store: ObjectStore
    index: Index
    secrets: NodeSecrets
    registry: Registry
    device: Device
    clock: Callable[[], float] = time.time
    audit: AuditLog | None = None
    devices: DevicePool = field(default_factory=lambda: DevicePool([]))
    models: ModelWorkers | None = None


class Pipeline:
    """Plans and runs the jobs of complete studies."""

    def __init__(self, services: Services) -> None:
        self.s = services

    # -- planning --------------------------------------------------------------------------------

    def _headers(self, instances: list[InstanceRow]) -> dict[str, Dataset]:
        """One decoded header (no pixels) per series key."""
        first: dict[str, InstanceRow] = {}
        for row in instances:
            first.setdefault(row.series_key, row)
        return {key: decode(self.s.store.get(row.object_id), stop_before_pixels=True) for key, row in first.items()}

    def plan(self, study_key: str) -> list[int]:
        """Route a quiet study and create its jobs; returns their ids ([] if it is not yet due).

        The study becomes ``processing`` (jobs created), ``done`` (routes matched, nothing to run),
        ``no_match`` (no route matched) in one transaction, or stays ``receiving`` when a matched
        route's quiet period has not yet passed. A crash at any point leaves it either unplanned
        (planned again after restart) or fully planned.

        Raises
        ------
        AinodeError
            The study's headers or the index cannot be read; transient ones
            (:func:`node.errors.is_transient`) are worth retrying.
        """
        study = self.s.index.study(study_key)
        if study is None or study.state != StudyState.RECEIVING:
            return []
        instances = self.s.index.instances(study_key)
        headers = self._headers(instances)
        plans = plan_routes(self.s.settings, headers, study.calling_ae_title, self.s.settings.node.ae_title)
        if plans and not self._complete(plans, headers, study.first_received_at, study.last_received_at):
            return []
        planned = [
            PlannedJob(plan.route.name, algorithm.name, series_key)
            for plan in plans
            for series_key in plan.series_keys
            for algorithm in plan.route.algorithms
        ]
        faults.point("plan:routed", index=self.s.index)
        done_reason = f"matched {', '.join(p.route.name for p in plans)}: nothing to run" if plans else None
        jobs = self.s.index.plan_study(study_key, study.generation, planned, done_reason)
        if jobs is None:
            return []  # a late instance re-opened it meanwhile
        faults.point("plan:committed", index=self.s.index)
        if jobs:
            logger.info("study complete: %d job(s)", len(jobs), extra={"study_key": study_key})
        else:
            logger.info("study needs no analysis", extra={"study_key": study_key, "routes": len(plans)})
        return jobs

    def _complete(
        self, plans: list[RoutePlan], headers: dict[str, Dataset], first_received: float, last_received: float
    ) -> bool:
        """Whether the matched routes' completion rules hold (quiet period and expected series,
        or their maximum wait has passed)."""
        now = self.s.clock()
        waits = [p.route.completion.max_wait_s for p in plans if p.route.completion.max_wait_s is not None]
        if waits and now - first_received >= min(waits):
            return True
        if now - last_received < max(p.route.completion.quiet_period_s for p in plans):
            return False
        for plan in plans:
            expected = plan.route.completion.expected_series
            if expected is not None and not any(
                matches(expected, prepare(header_of(ds, keywords_of(expected), "", ""))) for ds in headers.values()
            ):
                return False
        return True

    # -- running ---------------------------------------------------------------------------------

    def _pseudonymizer(self) -> Pseudonymizer:
        return Pseudonymizer(self.s.secrets.get(PSEUDONYM_SECRET), PSEUDONYM_SECRET)

    def _deidentify_series(self, study_key: str, series_key: str, profile: Deidentification) -> list[Dataset]:
        """De-identify one series and merge its pseudonyms into the study's stored map."""
        rows = [r for r in self.s.index.instances(study_key) if r.series_key == series_key]
        pseudonyms = self._pseudonymizer()
        deid = InstanceDeidentifier(pseudonyms, profile)
        datasets = [decode(self.s.store.get(r.object_id)) for r in rows]
        mapping = PseudonymMap.capture(pseudonyms.key_id, datasets[0])
        for ds in datasets:
            mapping.add(deid(ds).uid_map)
        self._merge_map(study_key, mapping)
        return datasets

    def _merge_map(self, study_key: str, mapping: PseudonymMap) -> None:
        """Store the study's pseudonym map with ``mapping`` merged in: one map per study covering
        every series and generation analysed (pseudonyms are deterministic, so they agree). A
        concurrent job's merge is not lost: the map is replaced only if unchanged meanwhile."""
        for _attempt in range(10):
            study = self.s.index.study(study_key)
            previous = study.map_object_id if study is not None else None
            merged = PseudonymMap.from_bytes(self.s.store.get(previous)) if previous else mapping
            if previous:
                merged.add(mapping.uids)
            map_id = self.s.store.put(merged.to_bytes())
            if self.s.index.set_map_object(study_key, map_id, expect=previous):
                if previous:
                    self.s.store.delete(previous)
                return
            self.s.store.delete(map_id)  # another job merged first: merge into its map
        raise StorageError("pseudonym map: could not record the merged map after concurrent updates")

    def _stored_map(self, study_key: str) -> PseudonymMap:
        """The study's stored pseudonym map: what re-identification uses.

        Raises
        ------
        DeidentificationError
            The study has no stored map (nothing of it was de-identified).
        """
        study = self.s.index.study(study_key)
        if study is None or not study.map_object_id:
            raise DeidentificationError("the study has no stored pseudonym map")
        return PseudonymMap.from_bytes(self.s.store.get(study.map_object_id))

    def run_job(self, job_id: int) -> str:
        """Run one job to a terminal state and return it (``delivered``, ``refused``, ``failed``)."""
        job = self.s.index.job(job_id)
        if job is None or job.state in FINISHED_JOB_STATES:
            return job.state if job else JobState.FAILED
        if self._supersede_if_stale(job_id):
            return JobState.SUPERSEDED
        self.s.index.update_job(job_id, state=JobState.RUNNING, attempts=job.attempts + 1)
        faults.point("job:running", index=self.s.index)
        extra = {"study_key": job.study_key, "job_id": job_id, "algorithm": job.algorithm}
        timings: dict[str, float] = {}
        try:
            state = self._run(job_id, job.study_key, job.series_key, job.algorithm, job.route, timings)
        except QuarantinedError as exc:
            state = JobState.QUARANTINED
            self.s.index.update_job(job_id, state=state, reason=str(exc), timings=timings)
            logger.warning("series quarantined: %s", exc, extra=extra)
        except sdk.SeriesRefused as exc:  # the node's or the algorithm's own refusal
            state = JobState.REFUSED
            self.s.index.update_job(job_id, state=state, reason=exc.reason, timings=timings)
            logger.info("series refused: %s", exc.reason, extra=extra)
        except AinodeError as exc:
            if is_transient(exc):
                counted = not isinstance(exc, OutOfResourcesError)  # a full disk waits, never dead-letters
                state = self._retry_or_dead_letter(job_id, job.attempts + 1, str(exc), timings, counted)
                logger.warning("job interrupted (%s): %s", state, exc, extra=extra)
                self._finish_study(job.study_key)
                return state
            state = JobState.FAILED
            self.s.index.update_job(job_id, state=state, reason=str(exc), timings=timings)
            logger.error("job failed: %s", exc, extra=extra)
        except sdk.AlgorithmError as exc:  # a plugin that cannot load, a model that does not fit
            state = JobState.FAILED
            self.s.index.update_job(job_id, state=state, reason=str(exc), timings=timings)
            logger.error("job failed: %s", exc, extra=extra)
        except Exception as exc:  # job boundary: a defect fails this job, never the node
            state = JobState.FAILED
            self.s.index.update_job(job_id, state=state, reason=f"internal error: {type(exc).__name__}")
            logger.exception("job failed with an internal error", extra=extra)
        self._finish_study(job.study_key)
        return state

    def _supersede_if_stale(self, job_id: int) -> bool:
        """A job of an older generation whose results are not yet delivered is dropped: the study
        was re-opened by a late instance and its re-analysis replaces this one."""
        job = self.s.index.job(job_id)
        study = self.s.index.study(job.study_key) if job is not None else None
        if job is None or study is None or study.generation <= job.generation:
            return False
        reason = f"superseded: the study was re-opened (generation {study.generation}) before delivery"
        self.s.index.update_job(job_id, state=JobState.SUPERSEDED, reason=reason)
        logger.info("job superseded before delivery", extra={"job_id": job_id, "study_key": job.study_key})
        return True

    def _retry_or_dead_letter(
        self, job_id: int, attempts: int, reason: str, timings: dict[str, float], counted: bool = True
    ) -> str:
        """Schedule another attempt with exponential backoff and full jitter, or dead-letter the job
        (after ``delivery.max_attempts``; an attempt that is not ``counted`` never dead-letters)."""
        policy = self.s.settings.delivery
        attempts -= 0 if counted else 1  # an uncounted attempt gives its number back
        if counted and attempts >= policy.max_attempts:
            self.s.index.update_job(
                job_id,
                state=JobState.FAILED,
                reason=f"dead letter after {attempts} attempt(s): {reason}",
                timings=timings,
            )
            return JobState.FAILED
        delay = min(policy.max_backoff_s, policy.backoff_s * 2 ** max(0, attempts - 1))
        delay = delay / 2 + random.uniform(0, delay / 2)
        self.s.index.update_job(
            job_id, state=JobState.PENDING, next_attempt_at=self.s.clock() + delay, timings=timings,
            attempts=attempts, reason=f"attempt {attempts} failed, retrying in {delay:.0f} s: {reason}",
        )  # fmt: skip
        return JobState.PENDING

    def _run(
        self, job_id: int, study_key: str, series_key: str, name: str, route_name: str, t: dict[str, float]
    ) -> str:
        settings = self.s.settings  # one configuration for the whole job, even across a reload
        route = next((r for r in settings.routes if r.name == route_name), None)
        if route is None:  # permanent: a reload removed it; retrying cannot bring it back
            raise ConfigError(f"route {route_name!r} is no longer configured")
        job = self.s.index.job(job_id)
        if job is not None and job.result_ids:  # built before a crash or a failed delivery: send only
            t.update({k: v for k, v in json.loads(job.timings).items() if k not in t})
            return self._deliver(job_id, job.result_ids, route.destinations, settings, t)
        algorithm = self.s.registry.get(name)
        spec = algorithm.spec

        start = time.perf_counter()
        profile = settings.deidentification[route.deidentification]
        datasets = self._deidentify_series(study_key, series_key, profile)
        t["deidentify_s"] = time.perf_counter() - start

        mapping = self._stored_map(study_key)  # re-identification uses the stored map, nothing else
        study_uid = mapping.original_study_instance_uid
        self._audit(INSTANCES_ACCESSED, "R", study_uid, f"series de-identified for {spec.name}")

        ref = next((a for a in route.algorithms if a.name == name), None)
        try:
            params = algorithm.Params.model_validate(ref.parameters if ref is not None else {})
        except ValidationError as exc:
            raise PluginError(f"parameters of {name} in route {route.name}: {exc.errors()[0]['msg']}") from None
        kinds: set[ResultKind] = set().union(*(settings.destinations[d].result_kinds() for d in route.destinations))
        with SharedVolume() as shared:  # the voxels go to the algorithm's process without a copy
            start = time.perf_counter()
            volume, slices = load_volume(datasets, allocate=shared.allocate)
            for ds in datasets:  # from here on only the headers are needed (result references)
                if "PixelData" in ds:
                    del ds.PixelData
            del datasets
            t["load_volume_s"] = time.perf_counter() - start
            check_accepts(spec, volume)
            start = time.perf_counter()
            timeout = settings.node.algorithm_timeout_s
            declared = self.s.registry.declaration(name)
            if declared is not None:
                result = self._run_model(name, declared, volume, shared, route.priority, timeout, t)
                spec = dataclasses.replace(spec, weights_sha256=result.parameters.get("weights_sha256"))
            else:
                entry_point = self.s.registry.entry_point(name)
                result = run_isolated(entry_point, volume, self.s.device, params, timeout, shared)
            t["algorithm_s"] = time.perf_counter() - start
            self._audit(
                INSTANCES_ACCESSED, "R", study_uid, f"algorithm {spec.name} {spec.version} ran on {self.s.device}"
            )

            start = time.perf_counter()
            study = self.s.index.study(study_key)
            generation = str(study.generation if study else 1)
            original_study = mapping.original_study_instance_uid
            original_series = mapping.uids.get(str(slices[0].SeriesInstanceUID), "")

            def uid(kind: str) -> str:
                weights = (spec.weights_sha256,) if spec.weights_sha256 else ()
                return derive_uid(original_study, original_series, spec.name, spec.version, *weights, generation, kind)

            node_title = settings.node.ae_title  # key images need the voxels: built while they are mapped
            built_objects = build_results(slices, result, spec, uid, node_title, kinds or {"SEG", "SR"}, volume)
            del volume
        pseudo_study = {str(slices[0].StudyInstanceUID)}
        result_ids = []
        for built in built_objects:
            obj = copy.deepcopy(built)  # highdicom shares data elements between SEG and SR
            reidentify(obj, mapping, pseudo_study)
            result_ids.append(self.s.store.put(encode(obj)))
        t["build_results_s"] = time.perf_counter() - start
        self.s.index.update_job(job_id, result_object_ids=result_ids, timings=t)

        return self._deliver(job_id, result_ids, route.destinations, settings, t)

    def _run_model(
        self, name: str, declared: ModelDeclaration, volume: Volume, shared: SharedVolume, priority: str,
        timeout_s: float, t: dict[str, float],
    ) -> AlgorithmResult:  # fmt: skip
        """Run a declared model in its device's model worker, on a device with room for it."""
        if self.s.models is None:
            self.s.models = ModelWorkers(self.s.settings.node.data_dir / "run")
        res = declared.resources
        with self.s.devices.place(name, res.gpu, res.gpu_memory_gib, res.cpu_fallback, priority) as device:
            result, timings, loads = self.s.models.on(device).run(
                name, declared.model_dump_json(), volume, shared, timeout_s
            )
        t.update({f"model_{k}": v for k, v in timings.items()})
        t["model_loads"] = float(loads.get(name, 0))
        logger.info("model ran", extra={"algorithm": name, "device": device, **_rounded(timings)})
        return result

    def _deliver(
        self, job_id: int, result_ids: list[str], destinations: list[str], settings: Settings, t: dict[str, float]
    ) -> str:
        if self._supersede_if_stale(job_id):
            return JobState.SUPERSEDED
        start = time.perf_counter()
        objects = [decode(self.s.store.get(oid)) for oid in result_ids]
        deliver(settings, destinations, objects)
        t["send_s"] = time.perf_counter() - start
        receivers = [Participant(name, DESTINATION_ROLE) for name in destinations]
        kinds = ", ".join(str(o.Modality) for o in objects)
        self._audit(INSTANCES_TRANSFERRED, "R", str(objects[0].StudyInstanceUID), f"results sent ({kinds})", receivers)
        self._withdraw_superseded(job_id, objects[0], destinations, settings)
        t["delivered_at"] = time.time()
        self.s.index.update_job(job_id, state=JobState.DELIVERED, reason=None, timings=t)
        logger.info("results delivered", extra={"job_id": job_id, **_rounded(t)})
        return JobState.DELIVERED

    def _withdraw_superseded(
        self, job_id: int, new_result: Dataset, destinations: list[str], settings: Settings
    ) -> None:
        """Withdraw the delivered results of earlier generations of this job (same study, route,
        algorithm and series) now that ``job_id``'s results are delivered: an IOCM Rejection Note to
        DICOM destinations, file removal in folders. The earlier jobs become ``superseded``.

        Raises
        ------
        DeliveryError
            A destination did not accept the rejection note (the job is retried as a whole).
        """
        job = self.s.index.job(job_id)
        if job is None:
            return
        earlier = [
            j for j in self.s.index.jobs(job.study_key, state=JobState.DELIVERED)
            if j.generation < job.generation and j.result_ids
            and (j.route, j.algorithm, j.series_key) == (job.route, job.algorithm, job.series_key)
        ]  # fmt: skip
        if not earlier:
            return
        withdrawn = [decode(self.s.store.get(oid), stop_before_pixels=True) for j in earlier for oid in j.result_ids]
        anchor = str(new_result.SOPInstanceUID)  # deterministic: a re-sent note replaces itself
        note = build_rejection_note(
            withdrawn,
            series_instance_uid=derive_uid(anchor, "rejection-series"),
            sop_instance_uid=derive_uid(anchor, "rejection"),
            device_name=settings.node.ae_title,
            device_uid=derive_uid("ainode-device", settings.node.ae_title),
            description=f"superseded by the re-analysis of generation {job.generation}",
        )
        done = withdraw(settings, destinations, withdrawn, note)
        receivers = [Participant(name, DESTINATION_ROLE) for name in done]
        self._audit(INSTANCES_TRANSFERRED, "U", str(note.StudyInstanceUID), "superseded results withdrawn", receivers)
        for j in earlier:
            reason = (
                f"superseded by job {job_id} (generation {job.generation}); withdrawn from {', '.join(done) or 'none'}"
            )
            self.s.index.update_job(j.id, state=JobState.SUPERSEDED, reason=reason)
        logger.info("superseded results withdrawn", extra={"job_id": job_id, "superseded": [j.id for j in earlier]})

    def _audit(
        self, event_id: tuple[str, str], action: str, study_uid: str, text: str, who: list[Participant] | None = None
    ) -> None:
        if self.s.audit is not None:
            me = Participant(self.s.settings.node.ae_title, SOURCE_ROLE)
            self.s.audit.record(study_event(event_id, action, study_uid, text, [me, *(who or [])]))

    def _finish_study(self, study_key: str) -> None:
        study = self.s.index.study(study_key)
        if study is None or study.state != StudyState.PROCESSING:
            return
        jobs = [j for j in self.s.index.jobs(study_key) if j.generation == study.generation]
        if any(j.state in (JobState.PENDING, JobState.RUNNING) for j in jobs):
            return
        failed = [j for j in jobs if j.state == JobState.FAILED]
        if failed:
            self.s.index.set_study_state(study_key, StudyState.FAILED, reason=f"{len(failed)} job(s) failed")
        else:
            self.s.index.set_study_state(study_key, StudyState.DONE)


def _rounded(t: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in t.items()}
