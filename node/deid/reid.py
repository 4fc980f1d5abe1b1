"""The pseudonym map of a study and re-identification of results built on de-identified inputs.

The map holds, for one study, every pseudonym UID -> original UID, and the original Patient and
General Study module attributes (as DICOM JSON, PS3.18 F.2, so VRs and character sets survive).
It is kept only as an encrypted object. Re-identification puts a result back into the original
study: every UID in the map (at any depth) returns to its original, the Patient and Study modules
are restored, and the de-identification marks are removed (PS3.15 E.1.1).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom import Dataset

from node.errors import DeidentificationError

PATIENT_STUDY_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDescription",
)
"""Attributes restored from the originals (Patient module C.7.1.1, General Study module C.7.2.1)."""

MARK_KEYWORDS = (
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
)


@dataclass
class PseudonymMap:
    """Pseudonym UIDs of one study and its original patient/study attributes."""

    key_id: str
    uids: dict[str, str] = field(default_factory=dict)  # pseudonym -> original
    originals: dict[str, dict[str, object]] = field(default_factory=dict)  # DICOM JSON

    @classmethod
    def capture(cls, key_id: str, original: Dataset) -> PseudonymMap:
        """Start a map from an original (not yet de-identified) instance of the study."""
        kept = Dataset()
        for keyword in PATIENT_STUDY_KEYWORDS:
            if keyword in original:
                kept[keyword] = original[keyword]
        return cls(key_id=key_id, originals=kept.to_json_dict())

    def add(self, uids: dict[str, str]) -> None:
        """Record pseudonym -> original UID pairs."""
        self.uids.update(uids)

    def to_bytes(self) -> bytes:
        """Serialise (the caller encrypts)."""
        return json.dumps({"key_id": self.key_id, "uids": self.uids, "originals": self.originals}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> PseudonymMap:
        """Parse what :meth:`to_bytes` wrote."""
        obj = json.loads(data)
        return cls(key_id=obj["key_id"], uids=obj["uids"], originals=obj["originals"])

    @property
    def original_study_instance_uid(self) -> str:
        """The Study Instance UID before de-identification."""
        return str(Dataset.from_json(self.originals).StudyInstanceUID)


def _restore_uids(ds: Dataset, uids: dict[str, str]) -> None:
    for elem in ds.iterall():
        if elem.VR != "UI" or not elem.value:
            continue
        if isinstance(elem.value, str):
            elem.value = uids.get(elem.value, elem.value)
        else:
            elem.value = [uids.get(str(v), str(v)) for v in elem.value]


def reidentify(result: Dataset, mapping: PseudonymMap, pseudonym_study_uids: Iterable[str]) -> None:
    """Put ``result`` (a SEG or SR built on de-identified inputs) back into the original study.

    Parameters
    ----------
    result
        The object to re-identify, changed in place.
    mapping
        The study's pseudonym map.
    pseudonym_study_uids
        The Study Instance UIDs the map knows as pseudonyms.

    Raises
    ------
    DeidentificationError
        The result's Study Instance UID is not a known pseudonym (the caller quarantines it).
    """
    if str(result.get("StudyInstanceUID", "")) not in set(pseudonym_study_uids):
        raise DeidentificationError("result's Study Instance UID is not a known pseudonym")
    _restore_uids(result, mapping.uids)
    originals = Dataset.from_json(mapping.originals)
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in originals:
            result[keyword] = originals[keyword]
        elif keyword in result and keyword != "SpecificCharacterSet":
            result[keyword].value = None
    for keyword in MARK_KEYWORDS:
        if keyword in result:
            del result[keyword]
    result.PatientIdentityRemoved = "NO"
    if "SOPInstanceUID" in result and getattr(result, "file_meta", None) is not None:
        result.file_meta.MediaStorageSOPInstanceUID = result.SOPInstanceUID
