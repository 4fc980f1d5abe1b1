"""The pseudonym map of a study and re-identification of results built on de-identified inputs.

The map holds, for one study, every pseudonym UID -> original UID, and the original Patient and
General Study module attributes (as DICOM JSON, PS3.18 F.2, so VRs and character sets survive).
It is kept only as an encrypted object. Re-identification puts a result back into the original
study: every UID in the map (at any depth) returns to its original, the Patient and Study modules
are restored, and the de-identification marks are removed (PS3.15 E.1.1).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom import DataElement, Dataset
from pydicom.tag import BaseTag, Tag

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

_PATIENT_IDENTITY_REMOVED = Tag("PatientIdentityRemoved")

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


def _restored(ds: Dataset, uids: dict[str, str]) -> Dataset | None:
    """``ds`` with every UID that ``uids`` maps (at any depth) restored, as a new data set that
    shares every element and item left as it was; ``None`` when nothing under ``ds`` changes.
    ``ds`` itself is never changed."""
    changed: dict[BaseTag, DataElement] = {}
    for elem in ds:
        if elem.VR == "UI" and elem.value:
            if isinstance(elem.value, str):
                if (original := uids.get(elem.value)) is not None:
                    changed[elem.tag] = DataElement(elem.tag, "UI", original)
            elif any(str(v) in uids for v in elem.value):
                changed[elem.tag] = DataElement(elem.tag, "UI", [uids.get(str(v), str(v)) for v in elem.value])
        elif elem.VR == "SQ" and elem.value:
            items = [_restored(item, uids) for item in elem.value]
            if any(item is not None for item in items):
                kept = [new if new is not None else item for new, item in zip(items, elem.value, strict=True)]
                changed[elem.tag] = DataElement(elem.tag, "SQ", kept)
    return _replaced(ds, changed) if changed else None


def _replaced(ds: Dataset, elements: dict[BaseTag, DataElement]) -> Dataset:
    """A new data set of ``ds``'s elements with ``elements`` put in their place (the others and
    the file meta information shared with ``ds``)."""
    out = Dataset({**dict(ds.items()), **elements})
    if (meta := getattr(ds, "file_meta", None)) is not None:
        out.file_meta = meta
    if (preamble := getattr(ds, "preamble", None)) is not None:
        out.preamble = preamble
    return out


def reidentify(result: Dataset, mapping: PseudonymMap, pseudonym_study_uids: Iterable[str]) -> Dataset:
    """``result`` (a SEG or SR built on de-identified inputs) put back into the original study.

    ``result`` is left as it is: the re-identified object is a new data set that shares the
    elements and sequence items re-identification does not change (highdicom shares data elements
    between the objects it builds and with their source images, so changing any in place would
    change those too), which costs far less than a deep copy of a SEG's per-frame items.

    Parameters
    ----------
    result
        The object to re-identify.
    mapping
        The study's pseudonym map.
    pseudonym_study_uids
        The Study Instance UIDs the map knows as pseudonyms.

    Returns
    -------
    Dataset
        The re-identified object, with its own file meta information.

    Raises
    ------
    DeidentificationError
        The result's Study Instance UID is not a known pseudonym (the caller quarantines it).
    """
    if str(result.get("StudyInstanceUID", "")) not in set(pseudonym_study_uids):
        raise DeidentificationError("result's Study Instance UID is not a known pseudonym")
    out = _restored(result, mapping.uids) or _replaced(result, {})
    originals = Dataset.from_json(mapping.originals)
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in originals:
            out[keyword] = originals[keyword]
        elif keyword in out and keyword != "SpecificCharacterSet":
            empty = out[keyword]
            out[empty.tag] = DataElement(empty.tag, empty.VR, None)
    for keyword in MARK_KEYWORDS:
        if keyword in out:
            del out[keyword]
    out.add_new(_PATIENT_IDENTITY_REMOVED, "CS", "NO")
    if (meta := getattr(result, "file_meta", None)) is not None:
        out.file_meta = copy.deepcopy(meta)
        if "SOPInstanceUID" in out:
            out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out
