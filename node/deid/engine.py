"""Table-driven de-identification of a data set (DICOM PS3.15 Annex E), with pydicom.

Actions of Table E.1-1 (see :mod:`node.deid.profile` for how options and conditional codes
resolve) are applied to every attribute at every sequence depth:

====  ===================================================================================
X     remove
Z     zero length (Patient ID, Accession Number, Study ID: a keyed pseudonym instead)
D     a dummy value valid for the VR (pseudonyms for IDs, keyed pseudonym UIDs for UI)
K     keep (sequences are still processed inside)
C     clean: dates shifted by the patient's whole-day offset (Modified Dates), times kept;
      text kept only if it holds none of the instance's identifying values; PN emptied
U     replace UIDs by keyed pseudonym UIDs (consistent across instances and studies)
====  ===================================================================================

Private attributes are removed unless listed by the Retain Safe Private Option. Then a sweep over
the attributes the table does not list: every PN emptied, every DA/DT shifted, every UI remapped
(except SOP Class UIDs, Transfer Syntax and well-known ``1.2.840.10008.`` values), free text (LO,
LT, SH, ST, UT, UC) emptied unless known safe, and UN (unknown content) removed. Finally the marks
of E.1.1 are set: Patient Identity Removed, De-identification Method and its CID 7050 codes, and
Longitudinal Temporal Information Modified.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset, FileMetaDataset
from pydicom.datadict import dictionary_has_tag, dictionary_keyword, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag

from node.deid.profile import Action, ActionTable, ProfileOptions
from node.deid.pseudonyms import Pseudonymizer, shift_da, shift_dt

WELL_KNOWN_UID_ROOT = "1.2.840.10008."
PSEUDONYM_KEYWORDS = frozenset({"PatientID", "AccessionNumber", "StudyID"})
KEEP_UI_KEYWORDS = frozenset(
    {"SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID", "SOPClassesInStudy"}
)
TYPE_2_SEQUENCES = frozenset({"AcquisitionContextSequence"})
"""Sequences the table lets be X or Z that are Type 2 in common IODs: emptied, never removed."""
TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UT", "UC"})
SAFE_TEXT_KEYWORDS = frozenset(
    {
        # coded concepts (PS3.3 8.8): vocabulary, never patient data
        "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning", "LongCodeValue",
        "ContextIdentifier", "MappingResource", "CodingSchemeName", "CodingSchemeResponsibleOrganization",
        # equipment and acquisition technique
        "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "ConvolutionKernel", "FilterType",
        "SequenceName", "PulseSequenceName", "ReceiveCoilName", "TransmitCoilName", "ImagedNucleus",
        "CoilString", "AcquisitionContrast", "ReconstructionAlgorithm", "RescaleType",
        "WindowCenterWidthExplanation", "PositionReferenceIndicator", "LossyImageCompressionMethod",
        "SegmentLabel", "DeidentificationMethod", "FrameOfReferenceUIDOrigin", "DimensionDescriptionLabel",
        "ContentLabel", "PixelPresentation", "VolumetricProperties", "VolumeBasedCalculationTechnique",
        "ComplexImageComponent", "ChemicalShiftReference", "ApplicableSafetyStandardAgency",
        # Type 1 technical attributes of enhanced multi-frame objects
        "StackID", "MultiCoilElementName", "MultiCoilConfiguration", "DimensionIndexPrivateCreator",
        "FunctionalGroupPrivateCreator", "MetaboliteMapDescription", "LUTLabel", "LUTExplanation",
        "DimensionOrganizationType", "SpecificCharacterSet",
    }
)  # fmt: skip
DUMMY: dict[str, Any] = {
    "AE": "ANONYMOUS", "AS": "000Y", "CS": "ANONYMIZED", "DA": "19000101", "DS": "0", "DT": "19000101000000",
    "IS": "0", "LO": "ANONYMIZED", "LT": "ANONYMIZED", "PN": "ANONYMIZED", "SH": "ANONYMIZED", "ST": "ANONYMIZED",
    "TM": "000000", "UC": "ANONYMIZED", "UT": "ANONYMIZED", "UR": "urn:anonymized", "FL": 0.0, "FD": 0.0,
    "SL": 0, "SS": 0, "UL": 0, "US": 0, "SV": 0, "UV": 0,
}  # fmt: skip
IDENTIFYING_KEYWORDS = (
    "PatientID", "OtherPatientIDs", "AccessionNumber", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "StationName", "PatientAddress", "PatientTelephoneNumbers",
    "MedicalRecordLocator", "IssuerOfPatientID", "RequestingService", "PatientBirthName",
)  # fmt: skip
_MIN_NEEDLE = 3
SWEPT_VRS = frozenset({"SQ", "PN", "DA", "DT", "UI", "UN", *TEXT_VRS})
HARVESTED_TAGS = frozenset(tag_for_keyword(k) for k in IDENTIFYING_KEYWORDS)


CLEANED_VRS = frozenset({"DA", "DT", "PN", "UI", *TEXT_VRS})
"""VRs whose value the Clean action (C) changes; the others it keeps as received."""


@functools.lru_cache(maxsize=4096)
def _keyword(tag: int) -> str:
    """The keyword of a tag as ``DataElement.keyword`` gives it (``""`` for one outside the
    dictionary), looked up once."""
    return str(dictionary_keyword(tag)) if dictionary_has_tag(tag) else ""


def _vocabulary(tag: int) -> bool:
    """Whether a text element is vocabulary (a code, a manufacturer's name), kept when swept."""
    return _keyword(tag) in SAFE_TEXT_KEYWORDS


def _raw_vr(ds: Dataset, tag: BaseTag) -> str:
    """The VR of an element without converting its value (implicit VR: from the dictionary)."""
    raw = ds.get_item(tag)
    vr = getattr(raw, "VR", None)
    if vr:
        return str(vr)
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        return "UN"


@dataclass
class Outcome:
    """What de-identification of one data set produced: every UID mapping it made."""

    uid_map: dict[str, str] = field(default_factory=dict)  # pseudonym -> original


@dataclass
class _Context:
    outcome: Outcome
    days: int
    patient_id: str
    needles: set[str] = field(default_factory=set)
    pending_clean: list[DataElement] = field(default_factory=list)


def _harvest(elem: DataElement, needles: set[str]) -> None:
    """Collect identifying values of one original element (names and their parts, IDs,
    institution, dates in common spellings), case-folded; text holding any of them is not clean."""
    vr = elem.VR
    if vr not in ("PN", "DA") and _keyword(elem.tag) not in IDENTIFYING_KEYWORDS:
        return
    value = elem.value
    if value in (None, "", b""):
        return
    found: list[str] = []
    for v in value if elem.VM > 1 else [value]:
        text = str(v)
        if vr == "DA":
            if len(text) == 8:
                y, m, d = text[:4], text[4:6], text[6:]
                found += [text, f"{y}-{m}-{d}", f"{d}.{m}.{y}", f"{m}/{d}/{y}"]
        else:
            found.append(text)
            found += text.replace("=", "^").replace(",", "^").split("^")
    needles.update(f.strip().casefold() for f in found if len(f.strip()) >= _MIN_NEEDLE)


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
        self.table = ActionTable(options)
        self._safe_private = {(t.group, t.creator.strip(), t.element) for t in options.safe_private}

    def deidentify(self, ds: Dataset, *, pixels_cleaned: bool = False) -> Outcome:
        """De-identify ``ds`` in place and return the UID map it made.
        The date shift is keyed on the Patient ID (or, without one, the Study or SOP Instance UID).
        """
        patient_id = str(ds.get("PatientID", "") or "")
        anchor = patient_id or str(ds.get("StudyInstanceUID", "") or ds.get("SOPInstanceUID", "") or "unknown")
        ctx = _Context(Outcome(), self.pseudonyms.date_offset_days(anchor), patient_id)
        self._walk(ds, ctx)
        for elem in ctx.pending_clean:  # after the walk: every identifying value is known
            elem.value = self._clean_text(elem, ctx)
        self._mark(ds, pixels_cleaned)
        self._rebuild_file_meta(ds)
        return ctx.outcome

    @staticmethod
    def _rebuild_file_meta(ds: Dataset) -> None:
        """Keep only what describes the object (PS3.10 7.1); the writer's own fields (source AE
        title, implementation UID and name, private information) are the sender's, not ours."""
        meta = getattr(ds, "file_meta", None)
        if meta is None:
            return
        fresh = FileMetaDataset()
        if "TransferSyntaxUID" in meta:
            fresh.TransferSyntaxUID = meta.TransferSyntaxUID
        if "SOPClassUID" in ds:
            fresh.MediaStorageSOPClassUID = ds.SOPClassUID
        if "SOPInstanceUID" in ds:
            fresh.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta = fresh

    # -- values ----------------------------------------------------------------------------------

    def _pseudo_uid(self, value: str, ctx: _Context) -> str:
        if value.startswith(WELL_KNOWN_UID_ROOT) or self.options.retain_uids:
            return value
        pseudo = self.pseudonyms.uid(value)
        ctx.outcome.uid_map[pseudo] = value
        return pseudo

    def _map_uids(self, value: Any, ctx: _Context) -> Any:
        if not value:
            return value
        if isinstance(value, str):
            return self._pseudo_uid(value, ctx)
        return [self._pseudo_uid(str(v), ctx) for v in value]

    def _shift(self, elem: DataElement, ctx: _Context) -> Any:
        if self.options.dates == "full":
            return elem.value
        if self.options.dates == "remove" or not elem.value:
            return None
        shift = shift_da if elem.VR == "DA" else shift_dt
        if elem.VM > 1:
            return [shift(str(v), ctx.days) for v in elem.value]
        return shift(str(elem.value), ctx.days)

    def _clean_text(self, elem: DataElement, ctx: _Context) -> Any:
        text = str(elem.value or "").casefold()
        return None if any(needle in text for needle in ctx.needles) else elem.value

    def _dummy(self, elem: DataElement, ctx: _Context) -> Any:
        if elem.VR == "UI":
            return self._map_uids(elem.value, ctx)
        if elem.VR in DUMMY:
            return DUMMY[elem.VR]
        return b"\x00\x00"  # OB, OW, UN and the other binary VRs: even length, all zero

    def _pseudonym(self, elem: DataElement, ctx: _Context) -> Any:
        if not elem.value:
            return elem.value
        kind = _keyword(elem.tag)
        original = ctx.patient_id if kind == "PatientID" else str(elem.value)
        return self.pseudonyms.identifier(kind, original or "unknown", 16)

    # -- traversal -------------------------------------------------------------------------------

    def _keep_private(self, ds: Dataset, tag: BaseTag) -> bool:
        if not self._safe_private:
            return False
        if tag.element < 0x0100:  # a Private Creator: keep if one of its elements is safe
            creator = str(ds[tag].value or "").strip()
            return any(g == tag.group and c == creator for g, c, _e in self._safe_private)
        creator_tag = Tag(tag.group, tag.element >> 8)
        creator = str(ds[creator_tag].value).strip() if creator_tag in ds else ""
        return (tag.group, creator, tag.element & 0xFF) in self._safe_private

    def _walk(self, ds: Dataset, ctx: _Context) -> None:
        for tag in list(ds.keys()):
            if tag.is_private:
                if not self._keep_private(ds, tag):
                    del ds[tag]
                continue
            if tag.element == 0x0000:  # group lengths are recomputed on write
                del ds[tag]
                continue
            action = self.table.action_for(tag)
            harvested = tag in HARVESTED_TAGS
            if action == "X" and not harvested:
                del ds[tag]
                continue
            vr = _raw_vr(ds, tag)
            if not harvested and vr not in ("PN", "DA", "SQ", "UN"):  # its value says nothing identifying
                if action is None and vr not in SWEPT_VRS:
                    continue  # nothing to do: leave the value unconverted (pixel data, numbers, codes)
                if self._decided_unread(ds, tag, vr, action):
                    continue
            if action == "X":
                _harvest(ds[tag], ctx.needles)
                del ds[tag]
                continue
            elem = ds[tag]
            _harvest(elem, ctx.needles)
            if action is None:
                self._sweep(ds, elem, ctx)
            else:
                self._apply(ds, elem, action, ctx)

    @staticmethod
    def _decided_unread(ds: Dataset, tag: BaseTag, vr: str, action: Action | None) -> bool:
        """Settle an element that gives no identifying value whose outcome needs no value either —
        kept (K, or C of a VR that cleaning keeps) or swept text emptied — without converting its
        value (:meth:`_apply` and :meth:`_sweep` do the same with it converted); ``False`` when
        its value is needed."""
        if action == "K" or (action == "C" and vr not in CLEANED_VRS):
            return True  # kept as received
        if action is None and vr in TEXT_VRS:
            if not _vocabulary(tag):
                ds[tag] = DataElement(tag, vr, None)
            return True
        return False

    def _apply(self, ds: Dataset, elem: DataElement, action: Action, ctx: _Context) -> None:
        if action == "X":
            del ds[elem.tag]
        elif elem.VR == "SQ":
            if action == "Z":
                if elem.tag in self.table.removable and _keyword(elem.tag) not in TYPE_2_SEQUENCES:
                    del ds[elem.tag]  # an empty Type 3 sequence is invalid; removal is the safer choice
                else:
                    elem.value = DicomSequence()
                return
            for item in elem.value:  # D, K, C, U: the sequence stays and its content is processed
                self._walk(item, ctx)
        elif _keyword(elem.tag) in PSEUDONYM_KEYWORDS and action in ("Z", "D"):
            elem.value = self._pseudonym(elem, ctx)
        elif action == "Z":
            elem.value = None
        elif action == "D":
            elem.value = self._dummy(elem, ctx)
        elif action == "U":
            elem.value = self._map_uids(elem.value, ctx)
        elif action == "C":
            self._clean(elem, ctx)
        # K: keep

    def _clean(self, elem: DataElement, ctx: _Context) -> None:
        if elem.VR not in CLEANED_VRS:
            return  # TM and everything else: kept (whole-day shifts leave times unchanged)
        if elem.VR in ("DA", "DT"):
            elem.value = self._shift(elem, ctx)
        elif elem.VR == "PN":
            elem.value = None
        elif elem.VR in TEXT_VRS:
            ctx.pending_clean.append(elem)
        elif elem.VR == "UI":
            elem.value = self._map_uids(elem.value, ctx)

    def _sweep(self, ds: Dataset, elem: DataElement, ctx: _Context) -> None:
        vr = elem.VR
        if vr == "SQ":
            for item in elem.value:
                self._walk(item, ctx)
        elif vr == "PN":
            elem.value = None
        elif vr in ("DA", "DT"):
            elem.value = self._shift(elem, ctx)
        elif vr == "UI":
            if _keyword(elem.tag) not in KEEP_UI_KEYWORDS:
                elem.value = self._map_uids(elem.value, ctx)
        elif vr in TEXT_VRS:
            if not _vocabulary(elem.tag):
                elem.value = None
        elif vr == "UN":
            del ds[elem.tag]

    def _mark(self, ds: Dataset, pixels_cleaned: bool) -> None:
        """Patient Identity Removed, method and CID 7050 codes (PS3.15 E.1.1, PS3.3 C.7.1.1)."""
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "ainode PS3.15 Annex E"
        items = []
        codes = self.options.method_codes()
        if pixels_cleaned:
            codes.insert(1, ("113101", "DCM", "Clean Pixel Data Option"))
        for value, scheme, meaning in codes:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = DicomSequence(items)
        ds.LongitudinalTemporalInformationModified = {
            "modified": "MODIFIED",
            "full": "UNMODIFIED",
            "remove": "REMOVED",
        }[self.options.dates]
        if "OriginalAttributesSequence" in ds:
            del ds.OriginalAttributesSequence
