"""What the console's JSON API returns (pydantic models; FastAPI documents them in its OpenAPI).

Every model here is free of PHI except :class:`LookupMatch.phi`, which is filled only for roles
allowed to re-identify. Times are seconds since the epoch (UTC); studies and series are named by
their keys (keyed digests of their UIDs), never by UIDs.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class Message(BaseModel):
    """The outcome of an action, in words."""

    message: str


class Confirm(BaseModel):
    """The body of a destructive or state-changing action: it must be confirmed explicitly."""

    confirm: bool = Field(description="must be true: the action is taken only when confirmed")


class Me(BaseModel):
    """The signed-in user."""

    name: str
    role: str
    permissions: list[str]
    csrf_token: str = Field(description="send it back in the X-CSRF-Token header of every POST")


class Login(BaseModel):
    """A password login."""

    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class JobSummary(BaseModel):
    """One job: an algorithm of a route on one series of a study."""

    id: int
    study_key: str
    generation: int
    route: str
    algorithm: str
    priority: str
    state: str
    stage: str
    attempts: int
    reason: str | None
    worker: str | None
    created_at: float
    updated_at: float


class Claim(BaseModel):
    """One claim of a job by a worker (the ledger's record)."""

    worker: str
    stage: str
    claimed_at: float
    lease_expires_at: float
    released_at: float | None
    outcome: str | None


class StageTime(BaseModel):
    """How long one stage of a delivered job took."""

    stage: str
    seconds: float


class JobDetail(JobSummary):
    """A job with its stages, timings, claims and what its route snapshot planned."""

    next_attempt_at: float | None
    lease_expires_at: float | None
    config_digest: str | None
    stages: list[StageTime]
    timings: dict[str, float | int | str]
    claims: list[Claim]
    destinations: list[str]
    parameters: dict[str, object]
    results: int = Field(description="result objects built (SEG, SR, GSPS, SC)")


class SeriesSummary(BaseModel):
    """One stored series of a study."""

    study_key: str
    series_key: str
    sop_class: str
    instances: int
    first_received_at: float


class StudySummary(BaseModel):
    """One study in the node."""

    study_key: str
    state: str
    calling_ae_title: str
    instances: int
    generation: int
    first_received_at: float
    last_received_at: float
    updated_at: float
    reason: str | None
    jobs: dict[str, int] = Field(description="job state -> number of jobs")
    routes: list[str]
    algorithms: list[str]


class StudyDetail(StudySummary):
    """A study with its series and jobs."""

    series: list[SeriesSummary]
    job_list: list[JobSummary]


class Disk(BaseModel):
    """The store's file system against the refusal watermark."""

    free_bytes: int
    total_bytes: int
    watermark_bytes: int
    above_watermark: bool
    reclaimable_bytes: int = 0
    """Deleted records' bytes the file system still holds (given back when their segment is removed)."""


class AlgorithmInfo(BaseModel):
    """A registered plugin or declared model."""

    name: str
    version: str
    kind: str
    outputs: list[str]


class LoadedModel(BaseModel):
    """A model a model worker holds loaded."""

    name: str
    device: str
    memory_bytes: int
    load_s: float
    loads: int


class Gpu(BaseModel):
    """A GPU of this node (as probed at start) and what its model worker holds."""

    name: str
    total_bytes: int
    free_bytes: int
    models_bytes: int


class Dashboard(BaseModel):
    """The node at a glance."""

    associations_last_hour: int
    associations_last_day: int
    rejected_last_day: int
    instances_last_hour: int
    instances_last_day: int
    bytes_last_day: int
    studies: dict[str, int]
    jobs: dict[str, int]
    pending_by_priority: dict[str, int]
    running_by_worker: dict[str, int]
    dead_letters: int
    recent_failures: list[JobSummary]
    disk: Disk
    algorithms: list[AlgorithmInfo]
    models_loaded: list[LoadedModel]
    gpus: list[Gpu]
    device: str


class RouteInfo(BaseModel):
    """One route as configured."""

    name: str
    level: str
    priority: str
    match: str = Field(description="the condition, as YAML")
    algorithms: list[str]
    destinations: list[str]
    deidentification: str
    quiet_period_s: float
    max_wait_s: float | None


class Routing(BaseModel):
    """The routing rules in force."""

    mode: str
    routes: list[RouteInfo]
    config_path: str | None
    config_sha256: str


class RuleTest(BaseModel):
    """A rule test on a stored series."""

    series_key: str = Field(min_length=1, max_length=64)


class Explanation(BaseModel):
    """What the router decides for the series tested, and why (as ``ainode route test``; no values)."""

    explanation: str


class AuditParticipant(BaseModel):
    """An ActiveParticipant of an audit message."""

    user_id: str
    requestor: bool
    address: str | None
    role: str | None


class AuditObject(BaseModel):
    """A ParticipantObject; a Study Instance UID is shown as its study key to roles that may not
    re-identify."""

    id: str
    type: str | None
    detail: dict[str, str]


class AuditRecord(BaseModel):
    """One DICOM audit message (PS3.15 A.5)."""

    number: int
    time: str
    event: str
    event_code: str
    type: str | None
    action: str
    outcome: int
    description: str | None
    participants: list[AuditParticipant]
    objects: list[AuditObject]


class AuditPage(BaseModel):
    """A page of the audit trail, newest first."""

    records: list[AuditRecord]
    total: int
    page: int
    pages: int


class KeyInfo(BaseModel):
    """A master key in the keyring."""

    key_id: str
    current: bool
    objects: int


class ProcessKey(BaseModel):
    """The master key a live process of the node seals with."""

    pid: int
    role: str
    key_id: str


class Rotation(BaseModel):
    """The last key rotation started from the console."""

    state: str = Field(description="idle, running, done or failed")
    started_by: str | None = None
    started_at: float | None = None
    summary: str | None = None


class Keys(BaseModel):
    """The keyring, what each key wraps, and which key each process seals with."""

    provider: str
    keys: list[KeyInfo]
    processes: list[ProcessKey]
    quarantined: int
    rotation: Rotation


class LookupQuery(BaseModel):
    """Find studies by an identifier (the console compares keyed digests; nothing is searched in clear)."""

    attribute: str = Field(pattern="^(AccessionNumber|PatientID)$")
    value: str = Field(min_length=1, max_length=64)


class LookupMatch(BaseModel):
    """A study found by a lookup; ``phi`` (the study's patient and study attributes) only for
    roles allowed to re-identify, and every such view is audited."""

    study: StudySummary
    phi: dict[str, str] | None
