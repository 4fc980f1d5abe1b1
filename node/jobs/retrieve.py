"""Fetching studies the PACS never forwarded: query a configured source (``sources:``) and
retrieve what matches, so that it is stored, routed and analysed exactly like a pushed study
(the source recorded as the calling peer).

- A DIMSE source: C-FIND (Study Root, study level), then C-MOVE to this node's AE title (the
  running node's Storage SCP receives the study) or C-GET (this process receives it on the same
  association and stores it through :class:`~node.storage.ingest.Ingest`).
- A DICOMweb source: QIDO-RS, then WADO-RS (instance by instance, into the same ingest).

A study the node already holds is not fetched again. :func:`fetch_all` spaces the studies
(``per_minute``) and runs at most ``concurrent`` retrievals at once.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from pydicom import Dataset
from pydicom.multival import MultiValue

from node.audit import DESTINATION_ROLE, INSTANCES_TRANSFERRED, SOURCE_ROLE, AuditLog, Participant, study_event
from node.datadir import DataDir
from node.dicomio import decode, encode
from node.errors import AinodeError, ConfigError, RetrieveError
from node.instances import STORAGE_SOP_CLASSES, ReceivedInstance
from node.network.association import Peer
from node.network.dicomweb import http_session, web_client
from node.network.query import find_studies, get_study, move_study
from node.network.tls import client_context
from node.settings.config import DicomwebSource, DimseSource, Settings
from node.storage.index import Index
from node.storage.ingest import Ingest
from node.storage.secrets import NodeSecrets
from node.storage.store import ObjectStore

logger = logging.getLogger(__name__)

_FIELDS = ("StudyInstanceUID", "PatientID", "AccessionNumber", "StudyDate", "ModalitiesInStudy",
           "StudyDescription", "NumberOfStudyRelatedInstances")  # fmt: skip


@dataclass(frozen=True)
class StudyQuery:
    """What to fetch: one study, one accession number, or a patient's studies (of a modality,
    in a date range)."""

    study_instance_uid: str | None = None
    accession_number: str | None = None
    patient_id: str | None = None
    modality: str | None = None
    since: datetime.date | None = None
    until: datetime.date | None = None

    def matching_keys(self) -> dict[str, str]:
        """The query's matching keys (PS3.4 C.2.2.2), DICOM keyword -> value."""
        keys = {"StudyInstanceUID": self.study_instance_uid, "AccessionNumber": self.accession_number,
                "PatientID": self.patient_id, "ModalitiesInStudy": self.modality}  # fmt: skip
        out = {k: v for k, v in keys.items() if v}
        if self.since or self.until:
            since = self.since.strftime("%Y%m%d") if self.since else ""
            until = self.until.strftime("%Y%m%d") if self.until else ""
            out["StudyDate"] = f"{since}-{until}"
        if not out:
            raise ConfigError("a retrieval needs a study, an accession number or a query (e.g. --patient-id)")
        return out


@dataclass(frozen=True)
class StudyMatch:
    """A study a source holds (PHI: shown only to the administrator who asked)."""

    study_instance_uid: str
    patient_id: str
    accession_number: str
    study_date: str
    modalities: str
    description: str
    instances: int | None
    held: bool


class Holdings(Protocol):
    """What a retrieval works with: the node's configuration, store, index, secrets and audit
    trail (a :class:`~node.datadir.DataDir`, or a job's services)."""

    @property
    def settings(self) -> Settings: ...

    store: ObjectStore
    index: Index
    secrets: NodeSecrets
    audit: AuditLog | None


class Retriever:
    """Queries and retrieves from the source ``name`` into the node's data directory ``data``."""

    def __init__(self, data: Holdings | DataDir, name: str) -> None:
        settings = data.settings
        if name not in settings.sources:
            raise ConfigError(f"no source named {name!r} (configured: {', '.join(settings.sources) or 'none'})")
        self.data, self.name, self.source = data, name, settings.sources[name]
        self._ingest: Ingest | None = None
        self._lock = threading.Lock()

    # -- query -----------------------------------------------------------------------------------

    def find(self, query: StudyQuery) -> list[StudyMatch]:
        """The studies the source holds that match ``query``, oldest first.

        Raises
        ------
        RetrieveError
            The source cannot be queried.
        """
        keys = query.matching_keys()
        found = self._find_dimse(keys) if isinstance(self.source, DimseSource) else self._find_dicomweb(keys)
        matches = [self._match(ds) for ds in found if ds.get("StudyInstanceUID")]
        return sorted(matches, key=lambda m: (m.study_date, m.study_instance_uid))

    def _peer(self) -> Peer:
        if not isinstance(self.source, DimseSource):
            raise ConfigError(f"source {self.name} is no DIMSE peer")
        settings = self.data.settings
        peer = settings.peer(self.source.peer)
        tls = None
        if peer.tls:
            if settings.node.tls is None:
                raise ConfigError(f"peer {peer.ae_title} needs TLS but node.tls is not configured")
            tls = client_context(settings.node.tls)
        return Peer(peer.ae_title, peer.host, peer.port, tls)

    def _find_dimse(self, keys: dict[str, str]) -> list[Dataset]:
        query = Dataset()
        for keyword in _FIELDS:
            setattr(query, keyword, keys.get(keyword, ""))
        return find_studies(self._peer(), self.data.settings.node.ae_title, query)

    def _client(self) -> Any:
        if not isinstance(self.source, DicomwebSource):
            raise ConfigError(f"source {self.name} is no DICOMweb service")
        session = http_session(self.source.auth, self.source.ca_certificates)
        return web_client(self.source.url, session, self.source.timeout_s)

    def _find_dicomweb(self, keys: dict[str, str]) -> list[Dataset]:
        import requests

        try:
            found = self._client().search_for_studies(search_filters=keys, fields=list(_FIELDS))
        except requests.RequestException as exc:
            raise RetrieveError(f"QIDO-RS at source {self.name} failed: {type(exc).__name__}") from None
        return [Dataset.from_json(item) for item in found]

    def _match(self, ds: Dataset) -> StudyMatch:
        uid = str(ds.StudyInstanceUID)
        modalities = ds.get("ModalitiesInStudy", "")
        count = ds.get("NumberOfStudyRelatedInstances")
        return StudyMatch(
            study_instance_uid=uid, patient_id=str(ds.get("PatientID", "")),
            accession_number=str(ds.get("AccessionNumber", "")), study_date=str(ds.get("StudyDate", "")),
            modalities="\\".join(map(str, modalities)) if isinstance(modalities, MultiValue | list)
            else str(modalities),
            description=str(ds.get("StudyDescription", "")),
            instances=int(count) if count not in (None, "") else None, held=self.held(uid),
        )  # fmt: skip

    def held(self, study_instance_uid: str) -> bool:
        """Whether the node already holds the study."""
        return self.data.index.study(self.data.secrets.index_key(study_instance_uid)) is not None

    # -- retrieve --------------------------------------------------------------------------------

    def _store(self, instance: ReceivedInstance) -> None:
        with self._lock:
            if self._ingest is None:
                self._ingest = Ingest(self.data.store, self.data.index, self.data.secrets)
        self._ingest(instance)

    def fetch(self, study: StudyMatch) -> int:
        """Retrieve one study into the node; returns how many instances came.

        Raises
        ------
        RetrieveError
            The source did not send the study (or not all of it).
        """
        uid = study.study_instance_uid
        if isinstance(self.source, DimseSource):
            me = self.data.settings.node.ae_title
            if self.source.retrieve == "move":
                done = move_study(self._peer(), me, me, uid)
            else:
                done = get_study(self._peer(), me, uid, list(STORAGE_SOP_CLASSES.values()), self._store)
            if done.failed:
                raise RetrieveError(f"{done.failed} instance(s) of the study were not sent ({done.completed} were)")
            count = done.completed
        else:
            count = self._fetch_dicomweb(uid)
        self._audit(uid, count)
        return count

    def _fetch_dicomweb(self, uid: str) -> int:
        import requests

        count = 0
        try:
            for ds in self._instances(uid):
                encoded = encode(ds)
                syntax = str(ds.file_meta.TransferSyntaxUID)
                self._store(ReceivedInstance.from_header(ds, encoded, sop_class_uid=str(ds.SOPClassUID),
                                                         transfer_syntax_uid=syntax,
                                                         calling_ae_title=self._calling()))  # fmt: skip
                count += 1
        except requests.RequestException as exc:
            raise RetrieveError(f"WADO-RS at source {self.name} failed after {count} instance(s): "
                                f"{type(exc).__name__}") from None  # fmt: skip
        return count

    def _instances(self, uid: str) -> Iterator[Dataset]:
        yield from self._client().iter_study(uid)

    def datasets(self, study: StudyMatch) -> list[Dataset]:
        """The study's instances in memory, not stored (a prior for a job): by C-GET or WADO-RS.

        Raises
        ------
        RetrieveError
            The source did not send the study.
        ConfigError
            A DIMSE source that retrieves by C-MOVE (it would send the study to the Storage SCP).
        """
        import requests

        uid = study.study_instance_uid
        if isinstance(self.source, DimseSource):
            if self.source.retrieve != "get":
                raise ConfigError(f"source {self.name} retrieves by C-MOVE; a prior needs C-GET (retrieve: get)")
            got: list[Dataset] = []
            me = self.data.settings.node.ae_title
            get_study(
                self._peer(), me, uid, list(STORAGE_SOP_CLASSES.values()), lambda i: got.append(decode(i.encoded))
            )
            self._audit(uid, len(got), "prior retrieved from source")
            return got
        try:
            found = list(self._instances(uid))
        except requests.RequestException as exc:
            raise RetrieveError(f"WADO-RS at source {self.name} failed: {type(exc).__name__}") from None
        self._audit(uid, len(found), "prior retrieved from source")
        return found

    def _calling(self) -> str:
        """How a study fetched over DICOMweb records where it came from (an AE title's length)."""
        return self.name.upper()[:16]

    def _audit(self, study_uid: str, count: int, what: str = "retrieved from source") -> None:
        if self.data.audit is None:
            return
        who = [Participant(self.name, SOURCE_ROLE), Participant(self.data.settings.node.ae_title, DESTINATION_ROLE,
                                                                requestor=True)]  # fmt: skip
        self.data.audit.record(study_event(INSTANCES_TRANSFERRED, "C", study_uid, f"{what} {self.name}",
                                           who, {"NumberOfInstances": str(count)}))  # fmt: skip

    def close(self) -> None:
        """Write the index rows of what this process stored (C-GET, WADO-RS)."""
        if self._ingest is not None:
            self._ingest.close()


def fetch_all(
    retriever: Retriever,
    studies: list[StudyMatch],
    per_minute: float,
    concurrent: int,
    progress: Callable[[int, StudyMatch, int | None, str | None], None],
) -> tuple[int, int]:
    """Fetch ``studies`` (those not held), at most ``per_minute`` started a minute and
    ``concurrent`` at once; ``progress(done, study, instances, error)`` after each. Returns
    (studies fetched, studies failed)."""
    pending = [s for s in studies if not s.held]
    interval = 60.0 / per_minute if per_minute > 0 else 0.0
    done = failed = 0
    lock = threading.Lock()

    def one(study: StudyMatch) -> None:
        nonlocal done, failed
        try:
            count, error = retriever.fetch(study), None
        except AinodeError as exc:
            count, error = None, str(exc)
        with lock:
            done += 1
            failed += error is not None
            progress(done, study, count, error)

    with ThreadPoolExecutor(max_workers=max(1, concurrent)) as pool:
        for number, study in enumerate(pending):
            if number and interval:
                time.sleep(interval)
            pool.submit(one, study)
    return done - failed, failed
