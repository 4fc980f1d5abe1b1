"""The index's tables (SQLAlchemy declarative models) and the life cycles they record.

Study states (PS3 has no such thing; this is ainode's own life cycle)::

    receiving -> complete -> processing -> done
                                      \\-> no_match | failed
    (a late instance moves any state back to receiving and bumps ``generation``)

Job states (the ledger, :mod:`node.storage.ledger`)::

    pending -> running -> delivered | refused | quarantined | failed
                  \\-> pending (retry after backoff; lease expired)   failed = dead letter

The console's users and sessions (:mod:`node.storage.accounts`) and the log of associations (one
row per association, for the dashboard and the metrics) live here too.

The tables hold no PHI: UIDs appear only as keyed digests, everything identifying stays inside
encrypted objects. Their schema is versioned by the Alembic migrations in ``migrations/``.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from sqlalchemy import BigInteger, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class StudyState(enum.StrEnum):
    """Life cycle of a study inside the node."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    PROCESSING = "processing"
    DONE = "done"
    NO_MATCH = "no_match"
    FAILED = "failed"


class JobState(enum.StrEnum):
    """Life cycle of one (route, algorithm, series) job."""

    PENDING = "pending"
    RUNNING = "running"
    DELIVERED = "delivered"
    REFUSED = "refused"
    QUARANTINED = "quarantined"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class Stage(enum.StrEnum):
    """The stages of a job, in order; each one's outputs are stored before the next begins."""

    DEIDENTIFY = "deidentify"
    ANALYSE = "analyse"
    BUILD = "build"
    DELIVER = "deliver"
    DONE = "done"


class Base(DeclarativeBase):
    """Declarative base of the index tables."""


class StudyRow(Base):
    """One study, keyed by the keyed digest of its Study Instance UID."""

    __tablename__ = "studies"
    study_key: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True, default=StudyState.RECEIVING)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    first_received_at: Mapped[float] = mapped_column(Float)
    last_received_at: Mapped[float] = mapped_column(Float, index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    map_object_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)
    patient_key: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    """Keyed digest of the Patient ID (:meth:`NodeSecrets.lookup_key`), for the console's lookup."""
    accession_key: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    """Keyed digest of the Accession Number (:meth:`NodeSecrets.lookup_key`), for the console's lookup."""


class InstanceRow(Base):
    """One received SOP instance; its encoded bytes are the encrypted object ``object_id``."""

    __tablename__ = "instances"
    object_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    sop_key: Mapped[str] = mapped_column(String(32), unique=True)
    study_key: Mapped[str] = mapped_column(ForeignKey("studies.study_key"), index=True)
    series_key: Mapped[str] = mapped_column(String(32), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[float] = mapped_column(Float)


class JobRow(Base):
    """One unit of analysis: an algorithm of a route on one series (or study) of a study."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_key: Mapped[str] = mapped_column(ForeignKey("studies.study_key"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    route: Mapped[str] = mapped_column(String(64))
    algorithm: Mapped[str] = mapped_column(String(64))
    series_key: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True, default=JobState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    result_object_ids: Mapped[str] = mapped_column(Text, default="[]")
    timings: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    route_snapshot: Mapped[str | None] = mapped_column(Text, nullable=True)
    config_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    stage: Mapped[str] = mapped_column(String(16), default=Stage.DEIDENTIFY, server_default=Stage.DEIDENTIFY.value)
    stage_object_ids: Mapped[str] = mapped_column(Text, default="{}", server_default="{}")

    @property
    def result_ids(self) -> list[str]:
        """Object ids of the encrypted result objects (SEG, SR, GSPS, SC) built for this job."""
        ids: list[str] = json.loads(self.result_object_ids)
        return ids

    @property
    def stage_outputs(self) -> dict[str, list[str]]:
        """Object ids of the stored outputs of each finished stage, by stage name."""
        outputs: dict[str, list[str]] = json.loads(self.stage_object_ids)
        return outputs


class ClaimRow(Base):
    """One claim of a job by a worker: when, for which stage, until when, and how it ended
    (``None`` while held; ``released``, ``expired``, ``lost``)."""

    __tablename__ = "job_claims"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    worker: Mapped[str] = mapped_column(String(128))
    stage: Mapped[str] = mapped_column(String(16))
    claimed_at: Mapped[float] = mapped_column(Float)
    lease_expires_at: Mapped[float] = mapped_column(Float)
    released_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Role(enum.StrEnum):
    """What a console user may do (:data:`node.console.auth.PERMISSIONS`)."""

    ADMIN = "admin"
    OPERATOR = "operator"
    VIEWER = "viewer"


class UserRow(Base):
    """A console user: a local one with an argon2 password hash, or one signed in through OIDC
    (no password; the role comes from the identity provider at each login)."""

    __tablename__ = "console_users"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str | None] = mapped_column(String(256), nullable=True)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    last_login_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class SessionRow(Base):
    """A console session; the cookie holds the token, the index only its SHA-256."""

    __tablename__ = "console_sessions"
    token_digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    user: Mapped[str] = mapped_column(ForeignKey("console_users.name", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    last_seen_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class AssociationRow(Base):
    """One association with the Storage SCP, written when it ends: who called (a configured AE
    title, else ``(unknown)``), how it ended (``released``, ``aborted``, ``rejected``) and what it
    carried. No UID, name or address."""

    __tablename__ = "associations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16), index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float] = mapped_column(Float, index=True)
    instances_stored: Mapped[int] = mapped_column(Integer, default=0)
    instances_refused: Mapped[int] = mapped_column(Integer, default=0)
    refused_statuses: Mapped[str] = mapped_column(Text, default="{}")
    """JSON: DIMSE status name -> instances refused with it."""
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)


class ModelRecordRow(Base):
    """What one job's model saw and said (post-market monitoring, :mod:`node.monitoring`), kept
    after the study is purged: the model (name, version) and how the route used it (role), the
    outcome, the input's descriptors and the outputs' summaries (JSON, no PHI), and for a shadow
    its comparison with the reference algorithm's results."""

    __tablename__ = "model_records"
    job_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    route: Mapped[str] = mapped_column(String(64))
    algorithm: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    against: Mapped[str | None] = mapped_column(String(64), nullable=True)
    recorded_at: Mapped[float] = mapped_column(Float, index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    """``analysed`` (then ``delivered``), ``refused``, ``failed``, ``timeout``, ``quarantined``."""
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    inference_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    inputs: Mapped[str] = mapped_column(Text, default="{}")
    outputs: Mapped[str] = mapped_column(Text, default="{}")
    comparison: Mapped[str | None] = mapped_column(Text, nullable=True)


class ResultKeyRow(Base):
    """Which job built a result object, by the keyed digest of its SOP Instance UID (the
    re-identified UID a PACS's rejection note references; the UID itself is not kept)."""

    __tablename__ = "result_keys"
    sop_key: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[int] = mapped_column(Integer, index=True)


class RejectionRow(Base):
    """A reader's rejection of a job's results: an IHE IOCM rejection note (KOS) that referenced
    them, with its title (CID 7011). One per job and note (a note sent twice counts once)."""

    __tablename__ = "model_rejections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, index=True)
    note_key: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[str] = mapped_column(String(64))
    route: Mapped[str] = mapped_column(String(64))
    reason_code: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(64))
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[float] = mapped_column(Float)
    __table_args__ = (UniqueConstraint("job_id", "note_key", name="uq_model_rejections_job_note"),)


class BaselineRow(Base):
    """The reference window of a model version's drift, set by ``ainode models baseline``."""

    __tablename__ = "model_baselines"
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    start: Mapped[float] = mapped_column(Float)
    end: Mapped[float] = mapped_column(Float)
    set_at: Mapped[float] = mapped_column(Float)


class CommitmentRow(Base):
    """A storage commitment a delivery asked a destination for (PS3.4 Annex J, this node the
    SCU): how many instances, and the peer's report when it came (counts and failure reasons)."""

    __tablename__ = "commitments"
    transaction_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    peer: Mapped[str] = mapped_column(String(16))
    requested: Mapped[int] = mapped_column(Integer)
    requested_at: Mapped[float] = mapped_column(Float)
    reported_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    committed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    failures: Mapped[str | None] = mapped_column(Text, nullable=True)
    """JSON: the Failure Reason of each instance the peer did not commit."""


STAGE_PREFIX = "s"
"""Object ids of stage outputs start with this (random object ids are hex): a crash sweep can tell
them from received instances."""


def stage_object_id(job: JobRow, name: str, number: int) -> str:
    """The object id of output ``number`` of stage ``name`` of ``job``: the same on every run of
    the stage, unique per job row (its id and creation time), free of PHI."""
    return f"{STAGE_PREFIX}{job.id}-{round(job.created_at * 1e6):x}-{name}{number}"


def job_of_stage_object(object_id: str) -> int | None:
    """The job id a stage output belongs to, or ``None`` when ``object_id`` is no stage output."""
    head = object_id[len(STAGE_PREFIX) :].split("-", 1)[0] if object_id.startswith(STAGE_PREFIX) else ""
    return int(head) if head.isdigit() else None


@dataclass(frozen=True)
class PlannedJob:
    """A job to create when a study is planned: (route, algorithm, series), with the snapshot of
    what the route needs (JSON) and the digest of the configuration it was planned with."""

    route: str
    algorithm: str
    series_key: str
    route_snapshot: str | None = None
    config_digest: str | None = None
