"""The console's operations, shared by its JSON API (:mod:`node.console.api`) and its pages
(:mod:`node.console.pages`): what the node holds, and the administrators' actions.

Reads come from the shared index (the ledger) and store, so a fleet's workers are seen too. Each
action checks the user's role, does what the CLI's command does (one implementation:
:mod:`node.jobs.admin`, :func:`node.jobs.retention.purge_study`, :func:`node.datadir.rotate_keys`,
the node's own reload) and is audited with the user's name and address. PHI leaves here only
through :meth:`ConsoleService.lookup` for roles allowed to re-identify (audited); audit records show
a Study Instance UID as its study key to everyone else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydicom import Dataset

from ainode_sdk.registry import Registry
from node.audit import (
    APPLICATION_ACTIVITY,
    EXPORT,
    INSTANCES_ACCESSED,
    QUERY,
    SECURITY_CONFIGURATION,
    SOFTWARE_CONFIGURATION,
    STUDY_UID_TYPE,
    AuditEvent,
    Participant,
    ParticipantObject,
    parse,
    security_alert,
    study_key_object,
)
from node.conditions import to_spec
from node.console import schemas
from node.console.auth import CurrentUser
from node.console.metrics import STAGES
from node.datadir import DataDir, rotate_keys
from node.dicomio import decode
from node.errors import AinodeError, ConflictError, NotFoundError
from node.instances import STORAGE_SOP_CLASSES
from node.jobs import admin
from node.jobs.model_workers import read_status
from node.jobs.retention import purge_study
from node.routing.dryrun import explain
from node.settings.config import FileKeySource, Settings
from node.storage import segments
from node.storage.index import JobRow, JobState
from node.storage.reports import Listing, Reports, StudyListed

logger = logging.getLogger(__name__)

SOP_CLASS_NAMES = {uid: name for name, uid in STORAGE_SOP_CLASSES.items()}
PHI_ATTRIBUTES = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyDate", "StudyTime",
    "StudyDescription", "StudyInstanceUID", "ReferringPhysicianName", "InstitutionName", "Modality",
)  # fmt: skip
"""What a lookup shows a role allowed to re-identify."""
AUDIT_XML_FIELDS = ("number", "time", "event", "type", "action", "outcome", "description")


@dataclass
class ConsoleContext:
    """What the console reads and acts on: the node's configuration in force, its data directory,
    its algorithms, how to reload it, and its GPUs."""

    settings: Callable[[], Settings]
    data: DataDir
    registry: Registry
    reload: Callable[[], str | None]
    """Reload the configuration file; returns ``None``, or why it was refused (file, line, key)."""
    devices: Callable[[], tuple[str, Sequence[Any]]] = lambda: ("cpu", ())
    """Where algorithms run (``cpu``, ``cuda``; ``starting`` while probed) and the GPUs."""
    config_path: Path | None = None


def _priority(job: JobRow) -> str:
    try:
        return str(json.loads(job.route_snapshot or "{}").get("priority", "routine"))
    except ValueError:
        return "routine"


def job_summary(job: JobRow) -> schemas.JobSummary:
    """A job row as the API shows it."""
    return schemas.JobSummary(
        id=job.id, study_key=job.study_key, generation=job.generation, route=job.route, algorithm=job.algorithm,
        priority=_priority(job), state=job.state, stage=job.stage, attempts=job.attempts, reason=job.reason,
        worker=job.worker, created_at=job.created_at, updated_at=job.updated_at,
    )  # fmt: skip


def _summary(found: StudyListed) -> schemas.StudySummary:
    """A study as the API lists it."""
    r, jobs = found.row, found.jobs
    return schemas.StudySummary(
        study_key=r.study_key, state=r.state, calling_ae_title=r.calling_ae_title, instances=r.instance_count,
        generation=r.generation, first_received_at=r.first_received_at, last_received_at=r.last_received_at,
        updated_at=r.updated_at, reason=r.reason, jobs=dict(Counter(j[0] for j in jobs)),
        routes=sorted({j[1] for j in jobs}), algorithms=sorted({j[2] for j in jobs}),
    )  # fmt: skip


class ConsoleService:
    """The console's reads and actions over a :class:`ConsoleContext`."""

    def __init__(self, ctx: ConsoleContext) -> None:
        self.ctx = ctx
        self.index = ctx.data.index
        self.store = ctx.data.store
        self.reports = Reports(ctx.data.index)
        self._rotation = schemas.Rotation(state="idle")
        self._rotation_lock = threading.Lock()

    def _audit(self, user: CurrentUser, address: str, event: AuditEvent) -> None:
        who = Participant(user.name, requestor=True, address=address)
        self.ctx.data.audit.record(dataclasses.replace(event, participants=[who, *event.participants]))

    # -- reads -----------------------------------------------------------------------------------

    def dashboard(self) -> schemas.Dashboard:
        """Associations and instances (last hour and day), studies and jobs by state, the queue,
        failures, disk against the watermark, algorithms and models, GPUs."""
        now = time.time()
        a_hour, _rejected_hour, i_hour, _bytes_hour = self.reports.traffic(now - 3600)
        a_day, rejected, i_day, bytes_day = self.reports.traffic(now - 86400)
        counts = self.reports.counts(now)
        pending = self.reports.jobs_in([JobState.PENDING])
        running = self.reports.jobs_in([JobState.RUNNING])
        failed = self.reports.dead_letters()
        settings = self.ctx.settings()
        device, gpus = self.ctx.devices()
        usage = shutil.disk_usage(self.store.root)
        watermark = settings.node.min_free_disk_mb * 2**20
        models = self._loaded_models()
        return schemas.Dashboard(
            associations_last_hour=a_hour, associations_last_day=a_day, rejected_last_day=rejected,
            instances_last_hour=i_hour, instances_last_day=i_day, bytes_last_day=int(bytes_day),
            studies=counts.studies, jobs=counts.jobs,
            pending_by_priority=dict(Counter(_priority(j) for j in pending)),
            running_by_worker=dict(Counter(j.worker or "unclaimed" for j in running)),
            dead_letters=counts.dead_letters, recent_failures=[job_summary(j) for j in failed[:5]],
            disk=schemas.Disk(free_bytes=usage.free, total_bytes=usage.total, watermark_bytes=watermark,
                              above_watermark=usage.free >= watermark,
                              reclaimable_bytes=segments.space(self.store.segments_root).reclaimable),
            algorithms=[
                schemas.AlgorithmInfo(name=spec.name, version=spec.version, outputs=list(spec.outputs),
                                      kind="model" if self.ctx.registry.declaration(spec.name) else "plugin")
                for spec in self.ctx.registry.specs()
            ],
            models_loaded=models,
            gpus=[
                schemas.Gpu(name=g.name, total_bytes=g.total_bytes, free_bytes=g.free_bytes,
                            models_bytes=sum(m.memory_bytes for m in models if m.device == g.name))
                for g in gpus
            ],
            device=device,
        )  # fmt: skip

    def _loaded_models(self) -> list[schemas.LoadedModel]:
        """What each model worker holds (its status file)."""
        return [
            schemas.LoadedModel(
                name=name,
                device=str(model.get("device", held.get("device", "?"))),
                memory_bytes=int(model.get("memory_bytes", 0)),
                load_s=float(model.get("load_s", 0.0)),
                loads=int(model.get("loads", 0)),
            )
            for held in read_status(self.ctx.settings().node.data_dir / "run")
            for name, model in held.get("models", {}).items()
        ]

    def studies(self, listing: Listing) -> list[schemas.StudySummary]:
        """Studies, most recently received first, as ``listing`` filters them."""
        return [_summary(found) for found in self.reports.studies(listing)]

    def study(self, study_key: str) -> schemas.StudyDetail:
        """A study with its series and jobs (:class:`~node.errors.NotFoundError` if unknown)."""
        found = self.reports.study(study_key)
        if found is None:
            raise NotFoundError(f"no study {study_key}")
        jobs = [job_summary(j) for j in self.index.jobs(study_key)]
        return schemas.StudyDetail(**_summary(found).model_dump(), series=self.series(study_key), job_list=jobs)

    def series(self, study_key: str | None = None, limit: int = 200) -> list[schemas.SeriesSummary]:
        """Stored series (of one study, or the most recent ``limit`` of all), for the rule tester."""
        return [
            schemas.SeriesSummary(
                study_key=st,
                series_key=se,
                sop_class=SOP_CLASS_NAMES.get(sop, sop),
                instances=n,
                first_received_at=first,
            )
            for st, se, sop, n, first in self.reports.series(study_key, limit)
        ]

    def jobs(self, listing: Listing) -> list[schemas.JobSummary]:
        """Jobs, newest first, as ``listing`` filters them."""
        return [job_summary(j) for j in self.reports.jobs(listing)]

    def job(self, job_id: int) -> schemas.JobDetail:
        """A job with its stages and timings, its claims and what its route snapshot planned
        (:class:`~node.errors.NotFoundError` if unknown)."""
        job = self.index.job(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id}")
        timings = json.loads(job.timings or "{}")
        snapshot = json.loads(job.route_snapshot or "{}")
        claims = [schemas.Claim.model_validate(c, from_attributes=True) for c in self.index.claims(job_id)]
        return schemas.JobDetail(
            **job_summary(job).model_dump(), next_attempt_at=job.next_attempt_at,
            lease_expires_at=job.lease_expires_at, config_digest=job.config_digest,
            stages=[schemas.StageTime(stage=stage, seconds=float(timings[key]))
                    for stage, key in STAGES.items() if isinstance(timings.get(key), int | float)],
            timings={k: v for k, v in timings.items() if isinstance(v, int | float | str)}, claims=claims,
            destinations=[d[0] for d in snapshot.get("destinations", [])],
            parameters=dict(snapshot.get("parameters", {})), results=len(job.result_ids),
        )  # fmt: skip

    def sources(self) -> list[str]:
        """The names of the configured sources (``ainode retrieve``, fetch and analyse)."""
        return sorted(self.ctx.settings().sources)

    def routing(self) -> schemas.Routing:
        """The routes in force, each condition as YAML."""
        settings = self.ctx.settings()
        routes = [
            schemas.RouteInfo(
                name=r.name,
                level=r.level,
                priority=r.priority,
                deidentification=r.deidentification,
                match=yaml.safe_dump(to_spec(r.match), sort_keys=False, allow_unicode=True).strip(),
                algorithms=[a.name for a in r.algorithms],
                destinations=list(r.destinations),
                quiet_period_s=r.completion.quiet_period_s,
                max_wait_s=r.completion.max_wait_s,
            )
            for r in settings.routes
        ]
        path = self.ctx.config_path
        return schemas.Routing(mode=settings.routing.mode, routes=routes, config_path=str(path) if path else None,
                               config_sha256=settings.digest)  # fmt: skip

    def test_rules_on_series(self, series_key: str) -> schemas.Explanation:
        """The router's decision for the study holding a stored series, explained (no values).

        Raises
        ------
        NotFoundError
            No such series.
        """
        held = self.reports.study_of_series(series_key)
        if held is None:
            raise NotFoundError(f"no stored series {series_key}")
        study, samples = held
        found = [(decode(self.store.get(object_id), stop_before_pixels=True), n) for object_id, n in samples]
        text = explain(self.ctx.settings(), found, study.calling_ae_title)
        return schemas.Explanation(explanation=f"study {study.study_key}, as stored:\n{text}")

    def test_rules_on_upload(self, datasets: list[Dataset], calling_ae_title: str) -> schemas.Explanation:
        """The router's decision for uploaded data sets (held in memory only), explained (no values)."""
        series: dict[str, tuple[Dataset, int]] = {}
        for ds in datasets:
            uid = str(ds.get("SeriesInstanceUID", id(ds)))
            header, n = series.get(uid, (ds, 0))
            series[uid] = (header, n + 1)
        return schemas.Explanation(explanation=explain(self.ctx.settings(), list(series.values()), calling_ae_title))

    def audit(
        self, user: CurrentUser, query: str = "", event: str = "", page: int = 1, per_page: int = 50
    ) -> schemas.AuditPage:
        """The audit trail, newest first, searched (``query``: any shown text, case-insensitive;
        ``event``: the event's name) and paged; Study Instance UIDs shown as study keys unless the
        user may re-identify."""
        records = self._audit_records(user)
        needle = query.strip().lower()
        if needle or event:
            records = [
                r for r in records
                if (not event or r.event == event) and (not needle or needle in r.model_dump_json().lower())
            ]  # fmt: skip
        pages = max(1, math.ceil(len(records) / per_page))
        page = min(max(1, page), pages)
        return schemas.AuditPage(records=records[(page - 1) * per_page : page * per_page], total=len(records),
                                 page=page, pages=pages)  # fmt: skip

    def _audit_records(self, user: CurrentUser) -> list[schemas.AuditRecord]:
        reidentify = user.can("reidentify")
        key = self.ctx.data.secrets.index_key
        out = []
        for number, xml in enumerate(self.ctx.data.audit.read(), start=1):
            record = parse(xml)
            objects = [
                schemas.AuditObject(
                    id=o["id"] if reidentify or o["type_code"] != STUDY_UID_TYPE else f"study {key(o['id'])}",
                    type=o["type"] if reidentify or o["type_code"] != STUDY_UID_TYPE else "ainode study key",
                    detail=o["detail"],
                )
                for o in record.pop("objects")
            ]
            participants = [schemas.AuditParticipant(**p) for p in record.pop("participants")]
            out.append(schemas.AuditRecord(number=number, objects=objects, participants=participants, **record))
        out.reverse()
        return out

    def audit_export(self, user: CurrentUser, address: str, fmt: str) -> tuple[bytes, str]:
        """The whole audit trail as JSON or as the DICOM audit messages (XML, in an
        ``<AuditMessages>`` element); returns the bytes and the media type. Audited (Export)."""
        self._audit(user, address, AuditEvent(EXPORT, "R", description=f"audit trail exported ({fmt})"))
        if fmt == "xml" and user.can("reidentify"):
            body = "".join(self.ctx.data.audit.read())
            return f"<AuditMessages>{body}</AuditMessages>".encode(), "application/xml"
        records = [r.model_dump() for r in self._audit_records(user)]
        if fmt == "xml":  # redacted: rebuilt from the fields this role is shown
            root = ET.Element("AuditMessages", redacted="true")
            for r in records:
                message = ET.SubElement(root, "AuditMessage", {k: str(r[k] or "") for k in AUDIT_XML_FIELDS})
                for p in r["participants"]:
                    ET.SubElement(
                        message, "ActiveParticipant", UserID=p["user_id"], NetworkAccessPointID=p["address"] or ""
                    )
                for o in r["objects"]:
                    ET.SubElement(message, "ParticipantObject", ID=o["id"], Type=o["type"] or "")
            return ET.tostring(root, encoding="utf-8"), "application/xml"
        return json.dumps(records, indent=1).encode(), "application/json"

    def keys(self) -> schemas.Keys:
        """The keyring, objects per key, which key each live process seals with, the last rotation."""
        store = self.store
        counts = store.objects_per_key()
        current = store.keys.current().key_id
        keys = [schemas.KeyInfo(key_id=k, current=k == current, objects=counts.get(k, 0)) for k in store.keys.key_ids()]
        processes = [
            schemas.ProcessKey(pid=pid, role=role, key_id=key_id)
            for pid, (role, key_id) in sorted(self.ctx.data.key_use.live().items())
        ]
        provider = "file" if isinstance(self.ctx.settings().keys, FileKeySource) else "env"
        quarantined = sum(1 for _ in (store.root / "quarantine").iterdir())
        return schemas.Keys(provider=provider, keys=keys, processes=processes, quarantined=quarantined,
                            rotation=self._rotation)  # fmt: skip

    # -- actions ---------------------------------------------------------------------------------

    def retry_job(self, user: CurrentUser, address: str, job_id: int) -> schemas.Message:
        """Queue a dead-lettered job again (operator, admin)."""
        user.require("retry")
        job = admin.retry_job(self.index, job_id)
        text = f"console: job {job_id} ({job.algorithm}) queued again"
        self._audit(user, address, AuditEvent(APPLICATION_ACTIVITY, "U", description=text))
        return schemas.Message(message=f"job {job_id} queued again")

    def rerun_study(self, user: CurrentUser, address: str, study_key: str) -> schemas.Message:
        """Analyse a study again; its new results supersede the old ones (operator, admin)."""
        user.require("rerun")
        generation = admin.rerun_study(self.index, study_key)
        text = f"console: study {study_key} re-run (generation {generation})"
        self._audit(
            user,
            address,
            AuditEvent(APPLICATION_ACTIVITY, "U", description=text, objects=[study_key_object(study_key)]),
        )
        return schemas.Message(message=f"study {study_key} will be analysed again (generation {generation})")

    def purge_study(self, user: CurrentUser, address: str, study_key: str) -> schemas.Message:
        """Delete everything held for a study now (admin); audited as Study Deleted with the user."""
        user.require("purge")
        if self.index.study(study_key) is None:
            raise NotFoundError(f"no study {study_key}")
        who = [Participant(user.name, requestor=True, address=address)]
        n = purge_study(self.index, self.store, study_key, self.ctx.data.audit, f"purged by {user.name} (console)",
                        who)  # fmt: skip
        return schemas.Message(message=f"study {study_key} purged: {n} object(s) deleted")

    def reload(self, user: CurrentUser, address: str) -> schemas.Message:
        """Validate and reload the configuration file (admin).

        Raises
        ------
        ConflictError
            The file is invalid (the message names the file, line and key); the old
            configuration stays.
        """
        user.require("reload")
        problem = self.ctx.reload()
        outcome = f"refused: {problem}" if problem else "done"
        event = security_alert(SOFTWARE_CONFIGURATION, f"console: configuration reload {outcome}")
        self._audit(user, address, event)
        if problem:
            raise ConflictError(f"configuration not reloaded: {problem}")
        return schemas.Message(message=f"configuration reloaded (sha256 {self.ctx.settings().digest[:12]}…)")

    def rotate_keys(self, user: CurrentUser, address: str) -> schemas.Message:
        """Start a master key rotation in the background (admin): a new key, every process takes
        it, every object and audit record re-wrapped, unused keys retired.

        Raises
        ------
        ConflictError
            A rotation is running, or the keys come from an environment variable.
        """
        user.require("rotate_keys")
        if not isinstance(self.ctx.settings().keys, FileKeySource):
            raise ConflictError("keys come from an environment variable: put the new key first there and restart")
        with self._rotation_lock:
            if self._rotation.state == "running":
                raise ConflictError(f"a rotation started by {self._rotation.started_by} is running")
            self._rotation = schemas.Rotation(state="running", started_by=user.name, started_at=time.time())
        self._audit(user, address, security_alert(SECURITY_CONFIGURATION, "console: master key rotation started"))
        threading.Thread(target=self._rotate, args=(user, address), name="ainode-console-rotate", daemon=True).start()
        return schemas.Message(message="key rotation started")

    def _rotate(self, user: CurrentUser, address: str) -> None:
        try:
            done = rotate_keys(self.ctx.data, add_key=True)
            summary = (
                f"current key {done.current}: {done.rewrapped} object(s) re-wrapped, {len(done.tampered)} "
                f"quarantined, {len(done.retired)} key(s) retired"
            )
            state = "done"
        except AinodeError as exc:
            summary, state = f"rotation failed: {exc}", "failed"
            logger.error("key rotation from the console failed: %s", exc)
        with self._rotation_lock:
            self._rotation = self._rotation.model_copy(update={"state": state, "summary": summary})
        self._audit(user, address, security_alert(SECURITY_CONFIGURATION, f"console: master key rotation {summary}"))

    def lookup(self, user: CurrentUser, address: str, attribute: str, value: str) -> list[schemas.LookupMatch]:
        """Studies whose Patient ID or Accession Number (``attribute``) is ``value``, found by
        keyed digest (operator, admin). Roles allowed to re-identify also see the study's patient
        and study attributes, decrypted from a stored header; the lookup (Query) and every such
        view (DICOM Instances Accessed) are audited."""
        user.require("lookup")
        key = self.ctx.data.secrets.lookup_key(attribute, value)
        found = self.reports.studies_by_lookup_key(attribute, key) if key else []
        summaries = [_summary(f) for f in found]
        rows = found
        self._audit(user, address, AuditEvent(QUERY, "E", description=f"console lookup by {attribute}: "
                                                                      f"{len(rows)} study(ies)"))  # fmt: skip
        matches = []
        for summary in summaries:
            phi = None
            if user.can("reidentify"):
                phi = self._phi(summary.study_key)
                event = AuditEvent(
                    INSTANCES_ACCESSED,
                    "R",
                    description="console: study attributes viewed",
                    objects=[ParticipantObject(phi.get("StudyInstanceUID", summary.study_key))],
                )
                self._audit(user, address, event)  # fmt: skip
            matches.append(schemas.LookupMatch(study=summary, phi=phi))
        return matches

    def _phi(self, study_key: str) -> dict[str, str]:
        instances = self.index.instances(study_key)
        if not instances:
            return {}
        header = decode(self.store.get(instances[0].object_id), stop_before_pixels=True)
        return {k: str(header.get(k, "")) for k in PHI_ATTRIBUTES}
