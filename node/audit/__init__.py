"""The audit trail: DICOM audit messages (PS3.15 A.5, the IHE ATNA schema), append-only and encrypted.

Each record is an ``<AuditMessage>`` XML document (EventIdentification, ActiveParticipant,
AuditSourceIdentification, ParticipantObjectIdentification). Records may name studies by their
Study Instance UID where the schema requires it, so the local log is sealed record by record with
the store's envelope encryption (one line per record: ``audit-<writer>-<n> <base64>``, the record
id being the encryption's associated data, unique per writing process) and fsync'd;
``ainode audit show`` decrypts it for an administrator. Every process of a node (main, receivers,
workers, CLI) appends to the same file, under a shared ``flock``; re-wrapping takes it exclusively, so
no record appended meanwhile is lost. Optionally each record is also sent to the site's ATNA
repository (:mod:`node.audit.syslog`: RFC 5425 syslog over TLS).
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import logging
import os
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from node.storage.store import ObjectStore

logger = logging.getLogger(__name__)

# Event IDs (DCM, PS3.16 CID 400) and event type codes (CID 401)
APPLICATION_ACTIVITY = ("110100", "Application Activity")
INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
STUDY_DELETED = ("110105", "DICOM Study Deleted")
SECURITY_ALERT = ("110113", "Security Alert")
APPLICATION_START = ("110120", "Application Start")
APPLICATION_STOP = ("110121", "Application Stop")
NODE_AUTHENTICATION = ("110126", "Node Authentication")
SECURITY_CONFIGURATION = ("110129", "Security Configuration")
SOFTWARE_CONFIGURATION = ("110131", "Software Configuration")
OBJECT_SECURITY_ATTRIBUTES_CHANGED = ("110135", "Object Security Attributes Changed")
SOURCE_ROLE = ("110153", "Source Role ID")
DESTINATION_ROLE = ("110152", "Destination Role ID")
APPLICATION_ROLE = ("110150", "Application")
USER_AUTHENTICATION = ("110114", "User Authentication")
LOGIN = ("110122", "Login")
LOGOUT = ("110123", "Logout")
QUERY = ("110112", "Query")
EXPORT = ("110106", "Export")


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: an AE title or user and its network address."""

    user_id: str
    role: tuple[str, str] | None = None
    requestor: bool = False
    address: str | None = None


@dataclass(frozen=True)
class ParticipantObject:
    """A ParticipantObjectIdentification: a study (by Study Instance UID), a key, a file..."""

    object_id: str
    type_code: str = "2"  # 2 = system object
    role_code: str = "3"  # 3 = report
    id_type: tuple[str, str, str] = ("110180", "DCM", "Study Instance UID")
    detail: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditEvent:
    """One auditable event (PS3.15 A.5.1)."""

    event_id: tuple[str, str]
    action: str  # C, R, U, D, E
    outcome: int = 0  # 0 success, 4 minor failure, 8 serious failure, 12 major failure
    event_type: tuple[str, str] | None = None
    participants: Sequence[Participant] = ()
    objects: Sequence[ParticipantObject] = ()
    description: str | None = None


def _code(parent: ET.Element, tag: str, code: tuple[str, str], scheme: str = "DCM") -> None:
    ET.SubElement(parent, tag, csd_code=code[0], codeSystemName=scheme, originalText=code[1])


def to_xml(event: AuditEvent, source_id: str, when: dt.datetime) -> str:
    """The ``<AuditMessage>`` document of ``event`` (DICOM audit message schema, PS3.15 A.5.1)."""
    message = ET.Element("AuditMessage")
    ident = ET.SubElement(
        message,
        "EventIdentification",
        EventActionCode=event.action,
        EventDateTime=when.isoformat(timespec="milliseconds"),
        EventOutcomeIndicator=str(event.outcome),
    )
    _code(ident, "EventID", event.event_id)
    if event.event_type is not None:
        _code(ident, "EventTypeCode", event.event_type)
    if event.description:
        ET.SubElement(ident, "EventOutcomeDescription").text = event.description
    for p in event.participants:
        attrs = {"UserID": p.user_id, "UserIsRequestor": "true" if p.requestor else "false"}
        if p.address:
            attrs |= {"NetworkAccessPointID": p.address, "NetworkAccessPointTypeCode": "2"}
        participant = ET.SubElement(message, "ActiveParticipant", attrs)
        if p.role is not None:
            _code(participant, "RoleIDCode", p.role)
    source = ET.SubElement(message, "AuditSourceIdentification", AuditSourceID=source_id)
    ET.SubElement(source, "AuditSourceTypeCode", csd_code="4", codeSystemName="DCM", originalText="Application Server")
    for obj in event.objects:
        element = ET.SubElement(
            message,
            "ParticipantObjectIdentification",
            ParticipantObjectID=obj.object_id,
            ParticipantObjectTypeCode=obj.type_code,
            ParticipantObjectTypeCodeRole=obj.role_code,
        )
        ET.SubElement(
            element, "ParticipantObjectIDTypeCode", csd_code=obj.id_type[0], codeSystemName=obj.id_type[1],
            originalText=obj.id_type[2],
        )  # fmt: skip
        for key, value in obj.detail.items():
            ET.SubElement(element, "ParticipantObjectDetail", type=key, value=base64.b64encode(value.encode()).decode())
    return ET.tostring(message, encoding="unicode")


class AuditMirror(Protocol):
    """Where a copy of every record goes (:class:`node.audit.syslog.SyslogSender`)."""

    def send(self, xml: str, outcome: int) -> None:
        """Queue one record."""
        ...


class AuditLog:
    """Append-only, encrypted local audit log, optionally mirrored to the ATNA repository.

    Parameters
    ----------
    path
        The log file (created with mode 0600); ``PATH.lock`` beside it is the writers' lock.
    store
        The object store whose envelope encryption seals each record.
    source_id
        AuditSourceID: the node's AE title.
    mirror
        Sends a copy of each record (syslog over TLS), or ``None``.
    """

    def __init__(self, path: Path, store: ObjectStore, source_id: str, mirror: AuditMirror | None = None) -> None:
        self.path = path
        self.store = store
        self.source_id = source_id
        self.mirror = mirror
        self.writer_id = uuid.uuid4().hex[:12]  # this process's records: audit-<writer>-<n>
        self._next = 0
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)

    @classmethod
    def for_data_dir(
        cls, data_dir: Path, store: ObjectStore, source_id: str, mirror: AuditMirror | None = None
    ) -> AuditLog:
        """The node's audit log, ``DATA_DIR/audit/audit.log``."""
        return cls(data_dir / "audit" / "audit.log", store, source_id, mirror)

    @contextmanager
    def _file_lock(self, exclusive: bool) -> Iterator[None]:
        """The lock every writing process honours: shared to append, exclusive to rewrite."""
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _lines(self) -> Iterator[str]:
        if self.path.exists():
            with open(self.path, encoding="ascii") as fh:
                yield from (line.rstrip("\n") for line in fh if line.strip())

    def record(self, event: AuditEvent) -> None:
        """Seal and append ``event`` (fsync'd), then hand it to the mirror if configured."""
        xml = to_xml(event, self.source_id, dt.datetime.now(dt.UTC))
        with self._lock, self._file_lock(exclusive=False), self.store.keys.sealing():
            record_id = f"audit-{self.writer_id}-{self._next}"
            line = f"{record_id} {base64.b64encode(self.store.seal(record_id, xml.encode())).decode()}\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode("ascii"))  # one write of a whole line: appends never interleave
                os.fsync(fd)
            finally:
                os.close(fd)
            self._next += 1
        if self.mirror is not None:
            self.mirror.send(xml, event.outcome)

    def read(self) -> list[str]:
        """Every record, decrypted (for ``ainode audit show``)."""
        out = []
        for line in self._lines():
            record_id, _, payload = line.partition(" ")
            out.append(self.store.unseal(record_id, base64.b64decode(payload)).decode())
        return out

    def record_ids(self) -> list[str]:
        """The id of every record, in file order."""
        return [line.partition(" ")[0] for line in self._lines()]

    def rewrap(self) -> int:
        """Re-wrap every record's data key under the current master key; returns how many changed.
        Appends by other processes wait meanwhile (exclusive file lock), so none is lost."""
        with self._lock, self._file_lock(exclusive=True), self.store.keys.sealing():
            lines, changed = [], 0
            for line in self._lines():
                record_id, _, payload = line.partition(" ")
                blob, was_changed = self.store.rewrap_blob(record_id, base64.b64decode(payload))
                changed += was_changed
                lines.append(f"{record_id} {base64.b64encode(blob).decode()}\n")
            tmp = self.path.with_name(self.path.name + ".new")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.writelines(lines)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            return changed

    def key_ids(self) -> set[str]:
        """Ids of the master keys the records are wrapped with."""
        return {
            self.store.key_id_of_blob(rid, base64.b64decode(p))
            for rid, _, p in (ln.partition(" ") for ln in self._lines())
        }


def study_key_object(study_key: str) -> ParticipantObject:
    """A study named by its ainode study key (a keyed digest: no PHI) rather than its UID."""
    return ParticipantObject(study_key, id_type=("STUDYKEY", "99AINODE", "ainode study key"))


STUDY_UID_TYPE = "110180"
"""ParticipantObjectIDTypeCode of a Study Instance UID (PS3.15 A.5.2): the objects that may be PHI."""


def parse(xml: str) -> dict[str, Any]:
    """One audit message (as :func:`to_xml` writes it) as a plain dict: ``time``, ``event``,
    ``event_code``, ``type``, ``action``, ``outcome``, ``description``, ``participants`` (user id,
    requestor, address, role) and ``objects`` (id, type, type code, details decoded)."""
    root = ET.fromstring(xml)
    ident = root.find("EventIdentification")
    assert ident is not None
    event, kind = ident.find("EventID"), ident.find("EventTypeCode")
    participants = [
        {
            "user_id": p.get("UserID", ""),
            "requestor": p.get("UserIsRequestor") == "true",
            "address": p.get("NetworkAccessPointID"),
            "role": (p.find("RoleIDCode").get("originalText") if p.find("RoleIDCode") is not None else None),  # type: ignore[union-attr]
        }
        for p in root.findall("ActiveParticipant")
    ]
    objects = []
    for o in root.findall("ParticipantObjectIdentification"):
        type_code = o.find("ParticipantObjectIDTypeCode")
        objects.append({
            "id": o.get("ParticipantObjectID", ""),
            "type": type_code.get("originalText") if type_code is not None else None,
            "type_code": type_code.get("csd_code") if type_code is not None else None,
            "detail": {d.get("type", ""): base64.b64decode(d.get("value", "")).decode(errors="replace")
                       for d in o.findall("ParticipantObjectDetail")},
        })  # fmt: skip
    return {
        "time": ident.get("EventDateTime", ""),
        "event": event.get("originalText") if event is not None else "",
        "event_code": event.get("csd_code") if event is not None else "",
        "type": kind.get("originalText") if kind is not None else None,
        "action": ident.get("EventActionCode", ""),
        "outcome": int(ident.get("EventOutcomeIndicator", "0")),
        "description": ident.findtext("EventOutcomeDescription"),
        "participants": participants,
        "objects": objects,
    }


def study_event(
    event_id: tuple[str, str],
    action: str,
    study_instance_uid: str,
    description: str,
    participants: Sequence[Participant] = (),
    detail: dict[str, str] | None = None,
    outcome: int = 0,
) -> AuditEvent:
    """An event about one study (instances received, de-identified, analysed, sent)."""
    return AuditEvent(
        event_id=event_id,
        action=action,
        outcome=outcome,
        participants=participants,
        objects=[ParticipantObject(study_instance_uid, detail=detail or {})],
        description=description,
    )


def security_alert(
    event_type: tuple[str, str], description: str, participants: Sequence[Participant] = ()
) -> AuditEvent:
    """A Security Alert (110113): refused association, TLS failure, tampering, key or config change."""
    return AuditEvent(
        event_id=SECURITY_ALERT, action="E", outcome=4, event_type=event_type, participants=participants,
        description=description,
    )  # fmt: skip
