"""The stages of a job: de-identify -> analyse -> build results -> deliver (-> withdraw superseded).

Each stage reads the stored outputs of the one before and stores its own in the encrypted store
under ids derived from the job (:func:`stage_object_id`), so a stage re-run after a crash
overwrites what the crashed run wrote — the same objects, the same UIDs — and leaves no orphan.
The stages see the job's :class:`~node.jobs.snapshot.JobPlan` (its route as planned), never the
configuration as it is now, except for the network addresses of peers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom import Dataset

from ainode_sdk.base import AlgorithmResult, AlgorithmSpec, Prior, Volume
from ainode_sdk.errors import AlgorithmError
from ainode_sdk.registry import Registry
from node import faults
from node.audit import (
    DESTINATION_ROLE,
    INSTANCES_ACCESSED,
    INSTANCES_TRANSFERRED,
    OBJECT_SECURITY_ATTRIBUTES_CHANGED,
    SOURCE_ROLE,
    AuditLog,
    Participant,
    security_alert,
    study_event,
)
from node.deid import InstanceDeidentifier
from node.deid.maps import StudyMaps
from node.deid.pseudonyms import Pseudonymizer, derive_uid
from node.deid.reid import PseudonymMap, reidentify
from node.dicomio import decode, encode
from node.errors import AinodeError, InvalidInstanceError, StorageError
from node.jobs.delivery import deliver, withdraw
from node.jobs.devices import DevicePool
from node.jobs.isolation import SharedVolume, packed_masks, unpack_result
from node.jobs.model_workers import ModelWorkers
from node.jobs.priors import fetch_priors
from node.jobs.readahead import Prepared, ReadAhead, profile_fingerprint
from node.jobs.runner import algorithm_params, run_algorithm
from node.jobs.series import SeriesWrite, drop_pixel_data, unframe_series
from node.jobs.snapshot import JobPlan
from node.jobs.volume import load_volume, sort_slices
from node.monitoring.describe import describe_inputs, describe_outputs
from node.process import give_back_freed_memory, lower_thread_priority
from node.settings import ActiveSettings
from node.settings.config import Deidentification, Settings
from node.storage.damage import Damage, set_aside
from node.storage.index import Index, InstanceRow, JobRow, JobState, stage_object_id
from node.storage.secrets import PSEUDONYM_SECRET, NodeSecrets
from node.storage.store import ObjectStore

if TYPE_CHECKING:
    from ainode_sdk.base import Device

logger = logging.getLogger(__name__)


@dataclass
class Services:
    """What the pipeline needs, passed in (no module globals).

    ``active`` is the configuration in force (its holder: a reload replaces it there);
    ``worker`` is this process's worker id in the ledger (:func:`node.jobs.leases.worker_id`)."""

    active: ActiveSettings
    store: ObjectStore
    index: Index
    secrets: NodeSecrets
    registry: Registry
    device: Device
    clock: Any = time.time
    audit: AuditLog | None = None
    devices: DevicePool = field(default_factory=lambda: DevicePool([]))
    models: ModelWorkers | None = None
    worker: str = "node"

    def __post_init__(self) -> None:
        self.active = ActiveSettings.of(self.active)  # a plain configuration gets a holder of its own

    @property
    def settings(self) -> Settings:
        """The configuration in force now."""
        return self.active.current


class Stages:
    """The four stages of a job over the shared store and index."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self.maps = StudyMaps(services.store, services.index)
        # the de-identified series is written beside the algorithm's process, in the CPU it leaves
        self._writer = ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="ainode-stage-write", initializer=lower_thread_priority
        )
        self._series: dict[int, SeriesWrite] = {}  # job id -> its de-identified series, while here
        self._volumes: dict[int, SharedVolume] = {}  # job id -> the shared block its volume will fill
        self.read_ahead: ReadAhead | None = None  # instances prepared in the quiet period (embedded executor)

    def _begin_write(self, series: SeriesWrite) -> Future[str]:
        """The series' write to the store, begun now unless it was already."""
        if series.write is None:

            def write() -> str:
                frames = series.frames(lambda: faults.point("stage:deidentify", index=self.s.index))  # half
                object_id = self.s.store.put_stream(frames, series.object_id, size_hint=series.size_hint())
                if series.dropping():
                    give_back_freed_memory()  # the framed instances' pixel data, dropped as they went
                return object_id

            series.write = self._writer.submit(write)
        return series.write

    def flush(self, job: JobRow) -> None:
        """Wait until the job's background stage writes are durable.

        Raises
        ------
        StorageError
            A write failed (the stage is not recorded as done and is run again).
        """
        series = self._series.get(job.id)
        if series is not None:
            self._begin_write(series).result()  # begun here if the volume was not loaded here

    def forget(self, job_id: int) -> list[str]:
        """Drop what this process keeps of a job whose run ended here; returns the ids of stage
        outputs it wrote that may not be recorded (to delete with the job's other outputs)."""
        volume = self._volumes.pop(job_id, None)
        if volume is not None:  # prepared, not analysed here
            volume.close()
        series = self._series.pop(job_id, None)
        if series is None or series.write is None:
            return []
        wait([series.write])
        return [series.object_id]

    # -- de-identify -----------------------------------------------------------------------------

    def deidentify(self, job: JobRow, plan: JobPlan) -> list[str]:
        """De-identify the job's series (PS3.15 Annex E, the plan's profile), merge its pseudonyms
        into the study's stored map and store the de-identified instances; returns the object id."""
        volume = SharedVolume()  # its pages touched on the idle core while the series is de-identified
        try:
            datasets, study_uid = self._deidentify_series(
                job.study_key, job.series_key, plan.deidentification, lambda read: self._prepare(volume, read)
            )
        except BaseException:
            volume.close()
            raise
        self._volumes[job.id] = volume
        # one object for the series (one durable write, not one per instance): the encoded
        # instances framed inside the authenticated encryption, written in the background while the
        # next stage runs here on the datasets in memory (SeriesWrite; the stage is recorded as
        # done only once the write is durable: see flush)
        object_id = stage_object_id(job, "deid", 0)
        self._series[job.id] = SeriesWrite(datasets, object_id)
        ids = [object_id]
        self._audit(INSTANCES_ACCESSED, "R", study_uid, f"series de-identified for {plan.algorithm}")
        return ids

    def deidentified_series(self, job: JobRow, object_ids: list[str]) -> list[Dataset]:
        """The de-identified instances of the job: as de-identified here, or as the de-identify
        stage stored them (another process de-identified, or this one restarted)."""
        if job.id in self._series:
            return self._series[job.id].datasets
        return [decode(b) for oid in object_ids for b in unframe_series(self.s.store.get(oid))]

    def _pseudonymizer(self) -> Pseudonymizer:
        return Pseudonymizer(self.s.secrets.get(PSEUDONYM_SECRET), PSEUDONYM_SECRET)

    def _prepare(self, volume: SharedVolume, datasets: list[Dataset]) -> None:
        """Prepare ``volume`` for the single-frame images ``datasets`` (one slice each)."""
        first = datasets[0]
        rows, columns = first.get("Rows"), first.get("Columns")
        if rows and columns and int(first.get("NumberOfFrames", 1) or 1) == 1:
            try:
                volume.prepare((len(datasets), int(rows), int(columns)), self._writer)
            except OSError as exc:  # no room in shared memory now: the analysis allocates (or fails) then
                logger.warning("volume block not prepared: %s", exc, extra={"slices": len(datasets)})

    def _deidentify_series(
        self, study_key: str, series_key: str, profile: Deidentification,
        read: Callable[[list[Dataset]], None] = lambda _datasets: None,
    ) -> tuple[list[Dataset], str]:  # fmt: skip
        """The series de-identified (in place) and the original Study Instance UID; its pseudonyms
        are merged into the study's stored map. ``read`` is given the instances once they are
        read (those read ahead de-identified already)."""
        rows = [r for r in self.s.index.instances(study_key) if r.series_key == series_key]
        secret = self.s.secrets.get(PSEUDONYM_SECRET)
        pseudonyms = Pseudonymizer(secret, PSEUDONYM_SECRET)
        deid = InstanceDeidentifier(pseudonyms, profile)
        fingerprint = profile_fingerprint(secret, profile)  # what a read-ahead one must have been done under
        prepared = [p for r in rows if (p := self._readable(r, fingerprint)) is not None]
        if not prepared:
            raise StorageError(f"series {series_key}: no instance of it can be read (each set aside, see the audit)")
        datasets = [p.dataset for p in prepared]
        read(datasets)
        first = prepared[0]
        mapping = (
            first.originals if first.deidentified and first.originals is not None
            else PseudonymMap.capture(pseudonyms.key_id, first.dataset)
        )  # fmt: skip
        for p in prepared:
            mapping.add(p.uid_map if p.deidentified else deid(p.dataset).uid_map)
        self.maps.merge(study_key, mapping)
        return datasets, mapping.original_study_instance_uid

    def _readable(self, row: InstanceRow, fingerprint: str) -> Prepared | None:
        """A received instance decoded — as read ahead (:mod:`node.jobs.readahead`), and then
        de-identified already when that was under ``fingerprint`` — or ``None`` when its record is
        damaged or missing: it is then set aside (:func:`node.storage.damage.set_aside`) and the
        series analysed without it."""
        ahead = self.read_ahead.take(row) if self.read_ahead is not None else None
        if ahead is not None and ahead.deidentified in (None, fingerprint):
            return ahead
        try:
            return Prepared(decode(self.s.store.get(row.object_id)))
        except (StorageError, InvalidInstanceError) as exc:  # tampered ones are already quarantined
            damage = Damage(row.object_id, row.study_key, str(exc))
            set_aside(self.s.index, self.s.store, damage, lambda text: self._alert(text))
            return None

    def _alert(self, text: str) -> None:
        if self.s.audit is not None:
            self.s.audit.record(security_alert(OBJECT_SECURITY_ATTRIBUTES_CHANGED, text))

    def stored_map(self, study_key: str) -> PseudonymMap:
        """The study's stored pseudonym map (:meth:`node.deid.maps.StudyMaps.stored`)."""
        return self.maps.stored(study_key)

    # -- analyse ---------------------------------------------------------------------------------

    def analyse(self, job: JobRow, plan: JobPlan, deidentified: list[str], t: dict[str, float]) -> list[str]:
        """Run the plan's algorithm on the de-identified series and store its result; returns the
        result's object id.

        Raises
        ------
        PluginError
            The route's parameters do not fit the algorithm, or the algorithm failed.
        SeriesRefused
            The node or the algorithm declines the series.
        """
        spec = self.s.registry.get(plan.algorithm).spec
        params = algorithm_params(self.s.registry, plan.algorithm, plan.parameters, f"route {plan.route}")
        # the voxels go to the algorithm's process without a copy (in the block prepared for them)
        with self._volumes.pop(job.id, None) or SharedVolume() as shared:
            start = time.perf_counter()
            datasets = self.deidentified_series(job, deidentified)
            volume, _slices = load_volume(datasets, allocate=shared.allocate)
            inputs = describe_inputs(datasets)
            if plan.priors is not None:
                begun = time.perf_counter()
                volume = dataclasses.replace(volume, priors=self._priors(job, plan, datasets[0]))
                t["priors_s"] = time.perf_counter() - begun
            series = self._series.get(job.id)
            if series is not None:
                self._begin_write(series)  # framed and written while the algorithm runs
            if "SC" not in plan.result_kinds():  # the build needs only the headers (key images: the voxels)
                if series is not None:  # once framed for the store
                    series.drop_pixel_data()
                else:
                    for ds in datasets:
                        drop_pixel_data(ds)
            del datasets
            t["load_volume_s"] = time.perf_counter() - start
            start = time.perf_counter()
            if self.s.models is None:
                self.s.models = ModelWorkers(self.s.settings.node.data_dir / "run")
            packed, seconds = run_algorithm(  # the result stays as its process sent it (masks bit-packed)
                self.s.registry, plan.algorithm, params, volume, shared, self.s.models, device=self.s.device,
                devices=self.s.devices, priority=plan.priority, timeout_s=self.s.settings.node.algorithm_timeout_s,
            )  # fmt: skip
            t.update(seconds)
            t["algorithm_s"] = time.perf_counter() - start
            bare, _bits, rest = packed  # the masks unpacked one at a time: never all at once here
            outputs = describe_outputs(dataclasses.replace(rest, segments=bare), volume, packed_masks(packed))
            del volume
        self.s.index.record_model_run(
            job.id, route=plan.route, algorithm=plan.algorithm, model=spec.name, version=spec.version, role=plan.role,
            against=plan.against, outcome="analysed", reason=None, inference_s=round(t["algorithm_s"], 3),
            inputs=json.dumps(inputs, sort_keys=True), outputs=json.dumps(outputs, sort_keys=True),
            comparison=None, recorded_at=self.s.clock(),
        )  # fmt: skip
        faults.point("stage:analyse", index=self.s.index)  # inferred, nothing stored yet
        study_uid = self.maps.original_study_uid(job.study_key)
        self._audit(INSTANCES_ACCESSED, "R", study_uid, f"algorithm {spec.name} {spec.version} ran on {self.s.device}")
        # pickle of our own dataclasses, in an authenticated encrypted object only ainode writes
        payload = pickle.dumps(packed, protocol=pickle.HIGHEST_PROTOCOL)
        return [self.s.store.put(payload, object_id=stage_object_id(job, "analysis", 0))]

    def _priors(self, job: JobRow, plan: JobPlan, deidentified: Dataset) -> tuple[Prior, ...]:
        """The patient's priors for the job (:mod:`node.jobs.priors`); the plan asks for them."""
        assert plan.priors is not None
        row = next(r for r in self.s.index.instances(job.study_key) if r.series_key == job.series_key)
        original = decode(self.s.store.get(row.object_id), stop_before_pixels=True)
        deid = InstanceDeidentifier(self._pseudonymizer(), plan.deidentification)
        return fetch_priors(self.s, plan.priors, original, deidentified, deid)

    # -- build results ---------------------------------------------------------------------------

    def build(self, job: JobRow, plan: JobPlan, outputs: dict[str, list[str]], t: dict[str, float]) -> list[str]:
        """Build the result objects the plan's destinations take (SEG, SR, GSPS, SC), re-identify
        them into the original study and store them; returns their object ids.

        Raises
        ------
        ResultBuildError
            A result object cannot be built from the stored result.
        """
        start = time.perf_counter()
        result: AlgorithmResult = unpack_result(pickle.loads(self.s.store.get(outputs["analyse"][0])))
        spec: AlgorithmSpec = self.s.registry.get(plan.algorithm).spec
        if self.s.registry.declaration(plan.algorithm) is not None:
            spec = dataclasses.replace(spec, weights_sha256=result.parameters.get("weights_sha256"))
        kinds = plan.result_kinds()
        mapping = self.stored_map(job.study_key)
        series = self._series.pop(job.id, None)
        datasets = series.datasets if series is not None else self.deidentified_series(job, outputs["deidentify"])
        volume: Volume | None = None
        if "SC" in kinds:  # key images burn outlines into the voxels
            volume, slices = load_volume(datasets)
        else:
            slices = sort_slices(datasets)
        for ds in datasets:  # from here on only the headers are needed (result references)
            drop_pixel_data(ds)
        del datasets
        original_study = mapping.original_study_instance_uid
        original_series = mapping.uids.get(str(slices[0].SeriesInstanceUID), "")

        def uid(kind: str) -> str:
            weights = (spec.weights_sha256,) if spec.weights_sha256 else ()
            generation = str(job.generation)
            return derive_uid(original_study, original_series, spec.name, spec.version, *weights, generation, kind)

        node_title = self.s.settings.node.ae_title
        from node.results import build_results  # highdicom: loaded by the node's warm-up, not at start

        built = build_results(slices, result, spec, uid, node_title, kinds, volume)
        del volume
        pseudo_study = {str(slices[0].StudyInstanceUID)}
        ids: list[str] = []
        keys: list[str] = []  # a reader's rejection note references these (re-identified) UIDs
        for number, obj in enumerate(built):
            obj = reidentify(obj, mapping, pseudo_study)  # a new data set: highdicom shares elements
            ids.append(self.s.store.put(encode(obj), object_id=stage_object_id(job, "result", number)))
            keys.append(self.s.secrets.index_key(str(obj.SOPInstanceUID)))
            if number == 0:
                faults.point("stage:build", index=self.s.index)  # one result object stored
        self.s.index.add_result_keys(job.id, keys)
        t["build_results_s"] = time.perf_counter() - start
        return ids

    def record_outcome(self, job: JobRow, plan: JobPlan | None, outcome: str, reason: str | None) -> None:
        """Record how the job's model run ended (``delivered``, ``refused``, ``failed``,
        ``timeout``, ``quarantined``) in its monitoring record. The job has ended already: a
        record that cannot be written is logged, never the job's failure."""
        try:
            self._record_outcome(job, plan, outcome, reason)
        except AinodeError as exc:
            logger.warning("monitoring record not written: %s", exc, extra={"job_id": job.id})

    def _record_outcome(self, job: JobRow, plan: JobPlan | None, outcome: str, reason: str | None) -> None:
        values: dict[str, Any] = {"outcome": outcome, "reason": reason[:300] if reason else None}
        if self.s.index.model_record(job.id) is None:  # it ended before its model ran
            try:
                spec = self.s.registry.get(job.algorithm).spec
                model, version = spec.name, spec.version
            except AlgorithmError:
                model, version = job.algorithm, "?"
            values.update(
                route=job.route, algorithm=job.algorithm, model=model, version=version,
                role=plan.role if plan else "live", against=plan.against if plan else None,
                recorded_at=self.s.clock(),
            )  # fmt: skip
        self.s.index.record_model_run(job.id, **values)

    # -- deliver ---------------------------------------------------------------------------------

    def deliver(self, job: JobRow, plan: JobPlan, result_ids: list[str], t: dict[str, float]) -> list[Dataset]:
        """Send the results to the plan's destinations (peers at their current addresses) and
        withdraw what they supersede; returns the objects delivered.

        Raises
        ------
        DeliveryError
            A destination refused or could not be reached (transient: the stage is retried; the
            results keep their SOP Instance UIDs, so a destination holds each once).
        """
        start = time.perf_counter()
        settings = plan.settings_for_delivery(self.s.settings)
        destinations = list(plan.destinations)
        objects = [decode(self.s.store.get(oid)) for oid in result_ids]
        deliver(settings, destinations, objects, self.s.index)
        faults.point("stage:deliver", index=self.s.index)  # sent, not yet recorded
        t["send_s"] = time.perf_counter() - start
        receivers = [Participant(name, DESTINATION_ROLE) for name in destinations]
        kinds = ", ".join(str(o.Modality) for o in objects)
        self._audit(INSTANCES_TRANSFERRED, "R", str(objects[0].StudyInstanceUID), f"results sent ({kinds})", receivers)
        return objects

    def withdraw_superseded(self, job: JobRow, plan: JobPlan, new_result: Dataset) -> list[JobRow]:
        """Withdraw the delivered results of earlier generations of this job (same study, route,
        algorithm and series): an IOCM Rejection Note to DICOM destinations, file removal in
        folders. Returns the earlier jobs (to mark ``superseded``).

        Raises
        ------
        DeliveryError
            A destination did not accept the rejection note (the stage is retried).
        """
        earlier = [
            j for j in self.s.index.jobs(job.study_key, state=JobState.DELIVERED)
            if j.generation < job.generation and j.result_ids
            and (j.route, j.algorithm, j.series_key) == (job.route, job.algorithm, job.series_key)
        ]  # fmt: skip
        if not earlier:
            return []
        settings = plan.settings_for_delivery(self.s.settings)
        withdrawn = [decode(self.s.store.get(oid), stop_before_pixels=True) for j in earlier for oid in j.result_ids]
        anchor = str(new_result.SOPInstanceUID)  # deterministic: a re-sent note replaces itself
        from node.results import build_rejection_note

        note = build_rejection_note(
            withdrawn,
            series_instance_uid=derive_uid(anchor, "rejection-series"),
            sop_instance_uid=derive_uid(anchor, "rejection"),
            device_name=settings.node.ae_title,
            device_uid=derive_uid("ainode-device", settings.node.ae_title),
            description=f"superseded by the re-analysis of generation {job.generation}",
        )
        done = withdraw(settings, list(plan.destinations), withdrawn, note, self.s.index)
        receivers = [Participant(name, DESTINATION_ROLE) for name in done]
        self._audit(INSTANCES_TRANSFERRED, "U", str(note.StudyInstanceUID), "superseded results withdrawn", receivers)
        reason = f"superseded by job {job.id} (generation {job.generation}); withdrawn from {', '.join(done) or 'none'}"
        for j in earlier:
            self.s.index.update_job(j.id, state=JobState.SUPERSEDED, reason=reason)
        logger.info("superseded results withdrawn", extra={"job_id": job.id, "superseded": [j.id for j in earlier]})
        return earlier

    def discard(self, outputs: dict[str, list[str]]) -> None:
        """Delete the intermediate outputs (de-identified series, analysis) of a finished job."""
        for ids in outputs.values():
            for object_id in ids:
                self.s.store.delete(object_id)

    def _audit(
        self, event_id: tuple[str, str], action: str, study_uid: str, text: str, who: list[Participant] | None = None
    ) -> None:
        if self.s.audit is not None:
            me = Participant(self.s.settings.node.ae_title, SOURCE_ROLE)
            self.s.audit.record(study_event(event_id, action, study_uid, text, [me, *(who or [])]))


def rounded(t: dict[str, Any]) -> dict[str, Any]:
    """Timings rounded to milliseconds, for log lines."""
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in t.items()}
