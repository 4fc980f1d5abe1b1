"""IHE IOCM Rejection Note: a Key Object Selection document that withdraws superseded results.

When a late instance re-opens a study, the re-analysis produces new SEG and SR series (new
deterministic UIDs). The results they replace are then withdrawn the standard way: a Key Object
Selection document (PS3.3 A.35.4) whose Document Title is a rejection reason from CID 7011
("Rejected for Quality Reasons", 113001 DCM) and whose evidence lists the withdrawn instances
(IHE RAD TF-2 Imaging Object Change Management). An archive that implements IOCM hides or deletes
the referenced instances; ``deploy/orthanc/iocm-rejection.lua`` makes Orthanc do so.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from node.errors import ResultBuildError
from node.results.identity import ObjectIdentity

KOS_SERIES_NUMBER = 9903
REJECTED_FOR_QUALITY_REASONS = codes.DCM.RejectedForQualityReasons  # (113001, DCM), CID 7011


def build_rejection_note(
    withdrawn: Sequence[Dataset],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    device_name: str,
    device_uid: str,
    description: str,
    title: hd.sr.CodedConcept | None = None,
) -> Dataset:
    """Build the IOCM Rejection Note that withdraws ``withdrawn`` (results of an earlier analysis).

    Parameters
    ----------
    withdrawn
        The superseded result objects (SEG, SR) as they were sent, i.e. re-identified into the
        original study; all must belong to one study. Only their headers are referenced.
    series_instance_uid, sop_instance_uid
        Deterministic UIDs of the note, so that re-sending it after a crash replaces it.
    device_name, device_uid
        Name and UID of the observer device (the node), PS3.16 TID 1004.
    description
        Key Object Description, e.g. which analysis superseded the withdrawn objects.
    title
        The Document Title from CID 7011 (default (113001, DCM, "Rejected for Quality Reasons")).

    Returns
    -------
    pydicom.Dataset
        A Key Object Selection Document (SOP Class 1.2.840.10008.5.1.4.1.1.88.59) in the
        original study, Document Title (113001, DCM, "Rejected for Quality Reasons").

    Raises
    ------
    ResultBuildError
        Nothing to withdraw, objects from several studies, or highdicom refuses the content.
    """
    if not withdrawn:
        raise ResultBuildError("a rejection note needs at least one withdrawn object")
    if len({str(ds.StudyInstanceUID) for ds in withdrawn}) != 1:
        raise ResultBuildError("withdrawn objects belong to more than one study")
    try:
        content = hd.ko.KeyObjectSelection(
            document_title=title or REJECTED_FOR_QUALITY_REASONS,
            referenced_objects=list(withdrawn),
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=device_uid, name=device_name
                ),
            ),
            description=description,
        )
        note = hd.ko.KeyObjectSelectionDocument(
            evidence=list(withdrawn),
            content=content,
            **ObjectIdentity(series_instance_uid, sop_instance_uid, KOS_SERIES_NUMBER).kwargs(),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultBuildError(f"rejection note: {type(exc).__name__}") from exc
    if "StudyID" in withdrawn[0]:
        note.StudyID = withdrawn[0].StudyID
    return note
