"""Readers' feedback through the PACS: an IHE IOCM rejection note (a Key Object Selection
Document, PS3.3 A.35.4, titled from CID 7011) that references ainode's result objects is counted
against the jobs, models and versions that made them — never stored or analysed as a study.

A note's references are re-identified SOP Instance UIDs; they are matched through the keyed
digests of the result objects' UIDs that each job recorded (:class:`~node.storage.tables.
ResultKeyRow`), so no UID is kept. A note that references nothing of ainode's is logged and
dropped; a Key Object Selection that is no rejection note is not ainode's to act on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pydicom import Dataset

from node.audit import DESTINATION_ROLE, INSTANCES_TRANSFERRED, SOURCE_ROLE, AuditLog, Participant, study_event
from node.dicomio import decode
from node.errors import InvalidInstanceError
from node.instances import ReceivedInstance
from node.storage.index import Index
from node.storage.secrets import NodeSecrets
from node.storage.tables import RejectionRow
from node.uids import check_uid

logger = logging.getLogger(__name__)

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
"""Key Object Selection Document Storage."""
REJECTION_TITLES = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
}
"""CID 7011 Rejected for Quality Reasons / ... : the Document Titles of IOCM rejection notes."""
MAX_NOTE_BYTES = 4 * 2**20
MAX_REFERENCES = 100_000


@dataclass(frozen=True)
class RejectionNote:
    """What a rejection note says: its title (code, meaning), the SOP Instance UIDs it rejects,
    its own SOP Instance UID and the Study Instance UID of what it rejects (PHI: memory only)."""

    code: str
    reason: str
    references: list[str]
    sop_instance_uid: str
    study_instance_uid: str


def read_rejection_note(ds: Dataset) -> RejectionNote | None:
    """The rejection note ``ds`` is, or ``None`` when it is a Key Object Selection of another title.

    Raises
    ------
    InvalidInstanceError
        A title or a reference is missing or malformed (the reason names the attribute).
    """
    try:
        title = ds.ConceptNameCodeSequence[0]
        code, scheme = str(title.CodeValue), str(title.CodingSchemeDesignator)
    except (AttributeError, IndexError) as exc:
        raise InvalidInstanceError("Key Object Selection without a Concept Name Code Sequence (its title)") from exc
    if scheme != "DCM" or code not in REJECTION_TITLES:
        return None
    references: list[str] = []
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for item in series.get("ReferencedSOPSequence", []):
                references.append(check_uid(str(item.get("ReferencedSOPInstanceUID", "")), "ReferencedSOPInstanceUID"))
                if len(references) > MAX_REFERENCES:
                    raise InvalidInstanceError(f"rejection note references more than {MAX_REFERENCES} instances")
    return RejectionNote(
        code, REJECTION_TITLES[code], references, str(ds.SOPInstanceUID), str(ds.get("StudyInstanceUID", ""))
    )


class ReaderFeedback:
    """Takes the Key Object Selection Documents the Storage SCP receives (see the module)."""

    def __init__(self, index: Index, secrets: NodeSecrets, audit: AuditLog | None, ae_title: str) -> None:
        self.index = index
        self.secrets = secrets
        self.audit = audit
        self.ae_title = ae_title

    def __call__(self, instance: ReceivedInstance) -> int:
        """Record the rejections a received note makes; returns how many jobs it rejected.

        Raises
        ------
        InvalidInstanceError
            The note is too large or malformed (refused: 0xC000).
        """
        if instance.parts is not None or instance.size > MAX_NOTE_BYTES:
            raise InvalidInstanceError(f"Key Object Selection over {MAX_NOTE_BYTES // 2**20} MiB")
        try:
            ds = decode(instance.encoded)
        except (ValueError, TypeError, AttributeError, EOFError) as exc:
            raise InvalidInstanceError(f"Key Object Selection cannot be read: {type(exc).__name__}") from None
        note = read_rejection_note(ds)
        extra = {"calling_ae": instance.calling_ae_title}
        if note is None:
            logger.info("key object selection that is no rejection note dropped", extra=extra)
            return 0
        keys = {self.secrets.index_key(uid): uid for uid in note.references}
        jobs = sorted(set(self.index.jobs_of_results(list(keys)).values()))
        if not jobs:
            logger.info("rejection note references no result of ainode's: dropped", extra={**extra,
                        "references": len(note.references)})  # fmt: skip
            return 0
        note_key = self.secrets.index_key(note.sop_instance_uid)
        counted = 0
        for job_id in jobs:
            record = self.index.model_record(job_id)
            job = self.index.job(job_id)
            model, version = (record.model, record.version) if record else (job.algorithm if job else "?", "?")
            row = RejectionRow(
                job_id=job_id, note_key=note_key, model=model, version=version, route=job.route if job else "?",
                reason_code=note.code, reason=note.reason, calling_ae_title=instance.calling_ae_title,
                received_at=time.time(),
            )  # fmt: skip
            if not self.index.add_rejection(row):
                continue  # the same note again
            counted += 1
            logger.warning(
                "results rejected by a reader: %s", note.reason,
                extra={**extra, "job_id": job_id, "model": model, "version": version},
            )  # fmt: skip
            if self.audit is not None:
                who = [Participant(instance.calling_ae_title, SOURCE_ROLE, requestor=True),
                       Participant(self.ae_title, DESTINATION_ROLE)]  # fmt: skip
                text = f"results of job {job_id} ({model} {version}) rejected: {note.code} {note.reason}"
                self.audit.record(study_event(INSTANCES_TRANSFERRED, "C", note.study_instance_uid, text, who))
        return counted
