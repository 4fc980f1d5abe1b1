"""Configuration models (pydantic v2, ``extra="forbid"``, frozen) for ``ainode.yaml``.

Secrets never live here: the key-encryption key comes from a key file or an environment variable
named by :class:`FileKeySource` / :class:`EnvKeySource`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    PrivateAttr,
    WithJsonSchema,
    model_validator,
)

from ainode_sdk.declared.spec import ModelDeclaration
from node.conditions import CONDITION_JSON_SCHEMA, Condition
from node.settings.console import ConsoleSettings
from node.settings.routes import Route, Routing, condition_of
from node.settings.types import AETitle, Port


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSSettings(_Model):
    """DICOM TLS (PS3.15 B.12, BCP 195) for the SCP and for the SCU that sends results."""

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = True


class NodeSettings(_Model):
    """Identity and listening socket of the Storage SCP, and where the node keeps its data."""

    ae_title: AETitle = "AINODE"
    host: str = "127.0.0.1"
    port: Port = 11112
    data_dir: Path = Path("var/ainode")
    max_associations: Annotated[int, Field(ge=1, le=256)] = 16
    receivers: int = Field(
        default=2,
        ge=1,
        le=64,
        description="receiving processes sharing the port (the main process hands each connection to the "
        "least busy); more than one lets concurrent associations use several cores. max_associations applies to each",
    )
    max_connections_per_address: int = Field(
        default=12,
        ge=1,
        le=256,
        description="connections admitted at once from one source address (a PACS forwarding on many "
        "associations needs several); keep it below max_associations so that one misbehaving host cannot take "
        "every association slot",
    )
    max_pdu_bytes: Annotated[int, Field(ge=0)] = 262144
    max_dataset_bytes: Annotated[int, Field(ge=2**20)] = Field(
        default=2 * 2**30, description="larger data sets are refused (0xC000) without being kept; past 16 MiB a data "
        "set is spooled encrypted to disk, so a receiver's memory does not grow with it"
    )  # fmt: skip
    network_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    dimse_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    min_free_disk_mb: Annotated[int, Field(ge=0)] = 1024
    algorithm_timeout_s: Annotated[float, Field(gt=0)] = 900.0
    max_queued_jobs: Annotated[int, Field(ge=1)] = 1000
    tls: TLSSettings | None = None
    executor: Literal["inprocess", "celery"] = Field(
        default="inprocess",
        description="where jobs run: threads of this node (the embedded default) or `ainode worker` processes "
        "fed by Celery (see the `celery` section); both use the same ledger and stages",
    )
    lease_s: float = Field(
        default=60.0,
        ge=1,
        le=3600,
        description="a running job's lease; its worker renews it every third of this (heartbeat); a job whose lease "
        "expired (its worker died) is offered again",
    )


class FileKeySource(_Model):
    """Key-encryption key read from a file (base64 of 32 random bytes), mode 0600 or stricter."""

    provider: Literal["file"]
    path: Path


class EnvKeySource(_Model):
    """Key-encryption key read from an environment variable (base64 of 32 random bytes)."""

    provider: Literal["env"]
    variable: str = "AINODE_KEY"


KeySource = Annotated[FileKeySource | EnvKeySource, Field(discriminator="provider")]


class Peer(_Model):
    """A known DICOM application entity: only peers may associate, and results go to peers."""

    ae_title: AETitle
    host: str = "127.0.0.1"
    port: Port = 104
    tls: bool = False
    source_addresses: list[IPvAnyNetwork] = []
    certificate_subject: str | None = None


ResultObject = Literal["SEG", "SR", "GSPS", "SC"]
ResultKind = Literal["SEG", "SR", "SR-segment", "GSPS", "SC"]
"""A kind of result object: SEG, planar SR, segment-referencing SR, presentation state, key images."""
_SR_KINDS: dict[str, set[ResultKind]] = {"planar": {"SR"}, "segment": {"SR-segment"}, "both": {"SR", "SR-segment"}}


class _ResultObjects(_Model):
    """Which result objects a destination receives, to match what its viewers show."""

    objects: list[ResultObject] = Field(
        default=["SEG", "SR"],
        min_length=1,
        description="SEG: segmentation (OHIF, Slicer, SEG-capable PACS); SR: TID 1500 measurement report; "
        "GSPS: presentation state outlining the results on the original images (classic PACS viewers); "
        "SC: key images with the outlines and values burned in (any viewer)",
    )
    sr: Literal["planar", "segment", "both"] = Field(
        default="planar",
        description="planar: each group outlined on its representative slice (OHIF displays it); segment: groups "
        "referencing the SEG's segments (3D Slicer QuantitativeReporting, dcmqi; OHIF 3.13 cannot open it); both",
    )
    research: bool = Field(
        False,
        description="a research destination: it receives the results of shadow (silent) trials and nothing else; "
        "the others (clinical) never receive a shadow's results",
    )

    @model_validator(mode="after")
    def _check_objects(self) -> _ResultObjects:
        if len(set(self.objects)) != len(self.objects):
            raise ValueError(f"objects: {self.objects} names an object twice")
        if self.sr != "planar" and "SR" in self.objects and "SEG" not in self.objects:
            raise ValueError(f"sr: {self.sr} references the SEG's segments, so objects must include SEG")
        return self

    def result_kinds(self) -> set[ResultKind]:
        """The kinds of result object this destination receives."""
        kinds: set[ResultKind] = {o for o in self.objects if o != "SR"}
        return kinds | _SR_KINDS[self.sr] if "SR" in self.objects else kinds


class DicomDestination(_ResultObjects):
    """Send results by C-STORE to a configured peer."""

    type: Literal["dicom"]
    peer: AETitle
    reject_superseded: bool = Field(
        True,
        description="after a re-analysis, send an IHE IOCM Rejection Note (KOS, 113001 'Rejected for Quality "
        "Reasons') for the results it replaced",
    )
    commitment: bool = Field(
        False,
        description="ask the peer for storage commitment (PS3.4 Annex J): a delivery counts as done only when its "
        "N-EVENT-REPORT confirms every result object (else it is retried, then dead-lettered)",
    )
    commitment_timeout_s: Annotated[float, Field(gt=0)] = 60.0


class FolderDestination(_ResultObjects):
    """Write results as DICOM files (PS3.10) into a folder, one subfolder per study."""

    type: Literal["folder"]
    path: Path


class HttpAuth(_Model):
    """How ainode authenticates to an HTTP (DICOMweb) peer. Secrets are never in the file: they
    are read from the named environment variables when a request is made.

    ``none``; ``basic`` (``username``, password from ``password_env``); ``bearer`` (a token from
    ``token_env``); ``oauth2`` (OAuth 2.0 client credentials: ``token_url``, ``client_id``, the
    secret from ``client_secret_env``, optional ``scope``; tokens are cached and renewed)."""

    type: Literal["none", "basic", "bearer", "oauth2"] = "none"
    username: str | None = None
    password_env: str | None = None
    token_env: str | None = None
    token_url: Annotated[str, Field(pattern=r"^https?://")] | None = None
    client_id: str | None = None
    client_secret_env: str | None = None
    scope: str | None = None

    @model_validator(mode="after")
    def _needs(self) -> HttpAuth:
        needed = {"basic": ("username", "password_env"), "bearer": ("token_env",),
                  "oauth2": ("token_url", "client_id", "client_secret_env")}.get(self.type, ())  # fmt: skip
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"auth type {self.type} needs {', '.join(missing)}")
        return self


class DicomwebDestination(_ResultObjects):
    """Send results by STOW-RS (PS3.18 10.5) to a DICOMweb service: ``url`` is its base (the one
    whose ``/studies`` takes the POST, e.g. ``https://pacs.example.org/dicom-web``)."""

    type: Literal["dicomweb"]
    url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")]
    auth: HttpAuth = HttpAuth()
    ca_certificates: Path | None = Field(default=None, description="CA bundle (PEM) to verify an https url with")
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    reject_superseded: bool = Field(
        True, description="after a re-analysis, send an IHE IOCM Rejection Note for what it replaced (by STOW-RS)"
    )


Destination = Annotated[DicomDestination | FolderDestination | DicomwebDestination, Field(discriminator="type")]


class SafePrivate(_Model):
    """Private attributes known to be safe: a block (group, Private Creator) and element offsets."""

    group: Annotated[str, Field(pattern=r"^[0-9A-Fa-f]{3}[13579BDFbdf]$")]
    creator: Annotated[str, Field(min_length=1, max_length=64)]
    elements: list[Annotated[str, Field(pattern=r"^[0-9A-Fa-f]{2}$")]]


class PixelRule(_Model):
    """Blank regions of images with burned-in text: for images matching ``match``, each region
    ``[column_start, row_start, column_stop, row_stop]`` (pixels, stop exclusive) is set to 0."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    match: Annotated[Condition, BeforeValidator(condition_of), WithJsonSchema(CONDITION_JSON_SCHEMA)]
    regions: list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=4, max_length=4)]]


class Deidentification(_Model):
    """One de-identification profile: PS3.15 Annex E Basic Profile plus the E.3 options.

    The default is Basic + Modified Dates + Patient Characteristics + Clean Descriptors.
    """

    retain_patient_characteristics: bool = True
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_uids: bool = False
    dates: Literal["modified", "full", "remove"] = "modified"
    clean_descriptors: bool = True
    clean_structured_content: bool = False
    clean_graphics: bool = False
    safe_private: list[SafePrivate] = []
    pixel_rules: list[PixelRule] = []


class DeliverySettings(_Model):
    """Retries of a job whose destination is down or refuses: exponential backoff with jitter,
    then the dead-letter state (``failed``) where ``ainode jobs retry`` picks it up again."""

    max_attempts: Annotated[int, Field(ge=1, le=100)] = 8
    backoff_s: Annotated[float, Field(gt=0)] = 30.0
    max_backoff_s: Annotated[float, Field(gt=0)] = 3600.0


class SyslogSettings(_Model):
    """The site's ATNA audit repository: syslog over TLS (RFC 5425), the collector's certificate
    checked against ``ca_certificates``; the node presents ``certificate`` when given."""

    host: str
    port: Port = 6514
    transport: Literal["tls", "udp"] = "tls"
    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    allow_plaintext_udp: bool = Field(
        False,
        description="audit messages name studies by their UID: plain UDP sends them in clear; only with this set",
    )

    @model_validator(mode="after")
    def _transport(self) -> SyslogSettings:
        if self.transport == "tls" and self.ca_certificates is None:
            raise ValueError("ca_certificates: needed to check the collector's certificate (transport tls)")
        if self.transport == "udp" and not self.allow_plaintext_udp:
            raise ValueError(
                "transport: 'udp' sends the audit trail (with Study Instance UIDs) in clear; use 'tls', "
                "or set allow_plaintext_udp: true to accept that"
            )
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key: give both or neither")
        return self


class AuditSettings(_Model):
    """Where audit records go besides the node's encrypted local log."""

    syslog: SyslogSettings | None = None


class StorageSettings(_Model):
    """Retention (originals, maps and results are deleted this long after delivery) and the index
    database."""

    retention_days: Annotated[float, Field(gt=0)] = 7.0
    database_busy_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="how long an index statement waits for another process's lock before it is retried later",
    )
    database_url: str | None = Field(
        default=None,
        pattern=r"^(sqlite|postgresql(\+psycopg)?)://",
        description="SQLAlchemy URL of the index (default: SQLite in the data directory); a shared index: "
        "postgresql+psycopg://USER@HOST/DB (the password from PGPASSWORD or ~/.pgpass, never here)",
    )

    @model_validator(mode="after")
    def _no_password(self) -> StorageSettings:
        url = self.database_url or ""
        if "@" in url and ":" in url.split("://", 1)[1].split("@", 1)[0]:
            raise ValueError("database_url: holds a password; give it in PGPASSWORD or ~/.pgpass")
        return self


class CelerySettings(_Model):
    """The broker that carries job ids to ``ainode worker`` processes (``node.executor: celery``).

    The URLs may come from the environment instead (``AINODE_BROKER_URL``, ``AINODE_RESULT_BACKEND``),
    which is where a broker password belongs."""

    broker_url: str | None = Field(
        default=None,
        pattern=r"^(amqps?|redis|rediss)://",
        description="amqp://USER@HOST:5672/VHOST (RabbitMQ) or redis://HOST:6379/0; default AINODE_BROKER_URL",
    )
    result_backend: str | None = Field(
        default=None, description="Celery result backend (optional: the ledger holds every outcome)"
    )
    queue: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = Field(
        default="ainode", description="queue of the de-identify, build and deliver stages"
    )
    analyse_queues: dict[str, Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]] = Field(
        default={},
        description="algorithm or model name -> queue of its analyse stage (a GPU class); others use `queue`",
    )

    @model_validator(mode="after")
    def _no_password(self) -> CelerySettings:
        for key in ("broker_url", "result_backend"):
            url = getattr(self, key) or ""
            if "@" in url and ":" in url.split("://", 1)[1].split("@", 1)[0]:
                raise ValueError(f"{key}: holds a password; give the URL in the environment instead")
        return self

    def analyse_queue(self, algorithm: str) -> str:
        """The queue of ``algorithm``'s analyse stage."""
        return self.analyse_queues.get(algorithm, self.queue)

    def queues(self) -> list[str]:
        """Every queue a stage may be sent to."""
        return sorted({self.queue, *self.analyse_queues.values()})


class DimseSource(_Model):
    """A peer to query (C-FIND, Study Root) and retrieve from: by C-MOVE to this node's AE title
    (the peer must know it as a destination) or by C-GET on the same association."""

    type: Literal["dimse"]
    peer: AETitle
    retrieve: Literal["move", "get"] = "move"


class DicomwebSource(_Model):
    """A DICOMweb service to query (QIDO-RS) and retrieve from (WADO-RS), with the same
    authentication options as a DICOMweb destination."""

    type: Literal["dicomweb"]
    url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")]
    auth: HttpAuth = HttpAuth()
    ca_certificates: Path | None = None
    timeout_s: Annotated[float, Field(gt=0)] = 120.0


Source = Annotated[DimseSource | DicomwebSource, Field(discriminator="type")]


class StowClient(_Model):
    """A peer that may store into ainode by STOW-RS: its name (the calling AE title routes and the
    audit see) and the SHA-256 of its bearer token (``printf %s "$TOKEN" | sha256sum``: the
    token itself is never in the file)."""

    name: AETitle
    token_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class DicomwebServer(_Model):
    """STOW-RS ingest at ``/dicomweb/studies`` on the console's port (served when a client is
    configured and the console has a port)."""

    clients: list[StowClient] = []
    max_request_bytes: Annotated[int, Field(ge=2**20)] = Field(default=8 * 2**30, description="per request")
    max_instance_bytes: Annotated[int, Field(ge=2**20)] = Field(default=2 * 2**30, description="per instance")


class Monitoring(_Model):
    """What the node watches of each model and version (post-market monitoring).

    Drift compares a reference window — the first ``reference_studies`` jobs of a model version,
    or the dates set with ``ainode models baseline`` — with the most recent ``recent_studies``:
    the population stability index (PSI) of each input descriptor and output value."""

    reference_studies: Annotated[int, Field(ge=1)] = 50
    recent_studies: Annotated[int, Field(ge=1)] = 50
    bins: Annotated[int, Field(ge=2, le=50)] = 10


class Settings(_Model):
    """The whole configuration file."""

    node: NodeSettings = NodeSettings()
    keys: KeySource
    peers: list[Peer] = []
    destinations: dict[str, Destination] = {}
    routing: Routing = Routing()
    routes: list[Route] = []
    models: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], ModelDeclaration] = Field(
        default={}, description="the site's own trained models (MONAI bundles, TorchScript, ONNX), routed to by name"
    )
    deidentification: dict[str, Deidentification] = {"default": Deidentification()}
    audit: AuditSettings = AuditSettings()
    delivery: DeliverySettings = DeliverySettings()
    storage: StorageSettings = StorageSettings()
    celery: CelerySettings = CelerySettings()
    console: ConsoleSettings = ConsoleSettings()
    monitoring: Monitoring = Monitoring()
    dicomweb: DicomwebServer = DicomwebServer()
    sources: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], Source] = Field(
        default={}, description="archives studies and priors are fetched from (ainode retrieve, routes' priors)"
    )
    _digest: str = PrivateAttr(default="")

    def set_digest(self, digest: str) -> None:
        """Record the SHA-256 of the file these settings were loaded from (see :attr:`digest`)."""
        self._digest = digest

    @property
    def digest(self) -> str:
        """SHA-256 of the configuration file (hex), recorded with every job planned under it; of the
        settings' representation when they were built in code."""
        return self._digest or hashlib.sha256(repr(self).encode()).hexdigest()

    @model_validator(mode="after")
    def _references(self) -> Settings:
        if self.node.max_connections_per_address > self.node.max_associations:
            raise ValueError(
                "node.max_connections_per_address: above node.max_associations; one host could take every slot"
            )
        titles = [p.ae_title for p in self.peers]
        duplicates = {t for t in titles if titles.count(t) > 1}
        if duplicates:
            raise ValueError(f"peers: AE title {sorted(duplicates)[0]!r} is listed more than once")
        for name, dest in self.destinations.items():
            if isinstance(dest, DicomDestination) and dest.peer not in titles:
                raise ValueError(f"destinations.{name}.peer: {dest.peer!r} is not in peers")
        for name, source in self.sources.items():
            if isinstance(source, DimseSource) and source.peer not in titles:
                raise ValueError(f"sources.{name}.peer: {source.peer!r} is not in peers")
        for i, route in enumerate(self.routes):
            if route.priors is None:
                continue
            prior_source = self.sources.get(route.priors.source)
            if prior_source is None:
                raise ValueError(f"routes[{i}].priors.source: {route.priors.source!r} is not in sources")
            if isinstance(prior_source, DimseSource) and prior_source.retrieve != "get":
                raise ValueError(
                    f"routes[{i}].priors.source: {route.priors.source!r} retrieves by C-MOVE; priors "
                    "come into the job by C-GET (retrieve: get) or from a DICOMweb source"
                )
        if "default" not in self.deidentification:
            raise ValueError("deidentification: a profile named 'default' is required")
        names = [r.name for r in self.routes]
        for i, route in enumerate(self.routes):
            if names.count(route.name) > 1:
                raise ValueError(f"routes[{i}].name: {route.name!r} is used by more than one route")
            if route.deidentification not in self.deidentification:
                raise ValueError(
                    f"routes[{i}].deidentification: {route.deidentification!r} is not a de-identification profile"
                )
            for dest_name in route.destinations:
                if dest_name not in self.destinations:
                    raise ValueError(f"routes[{i}].destinations: {dest_name!r} is not a configured destination")
        for algorithm in self.celery.analyse_queues:
            if algorithm not in self.models and not any(a.name == algorithm for r in self.routes for a in r.algorithms):
                raise ValueError(f"celery.analyse_queues: {algorithm!r} is no model or routed algorithm")
        return self

    def peer(self, ae_title: str) -> Peer:
        """The peer with ``ae_title``; raises ``KeyError`` when there is none."""
        for peer in self.peers:
            if peer.ae_title == ae_title:
                return peer
        raise KeyError(ae_title)
