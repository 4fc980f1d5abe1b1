"""De-identification (PS3.15 Annex E table) and re-identification of results."""

from __future__ import annotations

import copy
import secrets

import pydicom
import pytest

from node.deid.engine import Deidentifier
from node.deid.profile import ProfileOptions
from node.deid.pseudonyms import Pseudonymizer, derive_uid, shift_da
from node.deid.reid import PseudonymMap, reidentify
from node.errors import DeidentificationError

from .peers import CT_SERIES, MR_SERIES, series_files


@pytest.fixture
def pseudonyms() -> Pseudonymizer:
    return Pseudonymizer(secrets.token_bytes(32), "testkey")


@pytest.fixture(scope="module")
def ct() -> pydicom.Dataset:
    return pydicom.dcmread(series_files(CT_SERIES)[0])


@pytest.fixture(scope="module")
def mr() -> pydicom.Dataset:
    return pydicom.dcmread(next(p for p in sorted(MR_SERIES.iterdir()) if p.is_file()))


def _all_values(ds: pydicom.Dataset) -> str:
    return "\n".join(str(e.value) for e in ds.iterall() if e.tag != 0x7FE00010)


def test_no_name_id_or_original_uid_survives(ct, mr, pseudonyms):
    for original in (ct, mr):
        ds = copy.deepcopy(original)
        outcome = Deidentifier(pseudonyms, ProfileOptions()).deidentify(ds)
        text = _all_values(ds)
        assert not ds.get("PatientName")
        for keyword in ("PatientName", "PatientID"):
            value = str(original.get(keyword, ""))
            # short names (the MR's is "HFS", also its Patient Position) are checked element-wise above
            assert len(value) < 4 or value not in text, keyword
        original_uids = {
            str(e.value) for e in original.iterall() if e.VR == "UI" and not str(e.value).startswith("1.2.840.10008.")
        }
        remaining = {str(e.value) for e in ds.iterall() if e.VR == "UI"}
        assert not (original_uids & remaining)
        assert set(outcome.uid_map.values()) <= original_uids
        assert all(len(uid) <= 64 and uid.startswith("2.25.") for uid in outcome.uid_map)
        assert not any(e.tag.is_private for e in ds.iterall())
        assert ds.PatientIdentityRemoved == "YES"
        assert "113100" in [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
        assert ds.SOPClassUID == original.SOPClassUID
        assert (ds.pixel_array == original.pixel_array).all()


def test_pseudonyms_are_consistent_and_keyed(ct, pseudonyms):
    a, b = copy.deepcopy(ct), copy.deepcopy(ct)
    engine = Deidentifier(pseudonyms, ProfileOptions())
    engine.deidentify(a)
    engine.deidentify(b)
    assert a.StudyInstanceUID == b.StudyInstanceUID and a.PatientID == b.PatientID
    other = copy.deepcopy(ct)
    Deidentifier(Pseudonymizer(secrets.token_bytes(32), "k2"), ProfileOptions()).deidentify(other)
    assert other.StudyInstanceUID != a.StudyInstanceUID


def test_dates_shift_by_whole_days_consistently(ct, pseudonyms):
    ds = copy.deepcopy(ct)
    Deidentifier(pseudonyms, ProfileOptions()).deidentify(ds)
    offset = pseudonyms.date_offset_days(str(ct.PatientID))
    assert -3650 <= offset <= -1
    assert ds.StudyDate == shift_da(ct.StudyDate, offset) != ct.StudyDate
    assert ds.ContentDate == shift_da(ct.ContentDate, offset)


def test_patient_characteristics_kept_by_default_and_removed_without_option(ct, pseudonyms):
    kept = copy.deepcopy(ct)
    Deidentifier(pseudonyms, ProfileOptions()).deidentify(kept)
    assert kept.PatientSex == "M" and kept.PatientAge == "058Y"
    basic = copy.deepcopy(ct)
    Deidentifier(pseudonyms, ProfileOptions(retain_patient_characteristics=False)).deidentify(basic)
    assert "PatientAge" not in basic and not basic.PatientSex


def test_reidentify_restores_uids_and_patient_study_modules(ct, pseudonyms):
    ds = copy.deepcopy(ct)
    mapping = PseudonymMap.capture("testkey", ct)
    mapping.add(Deidentifier(pseudonyms, ProfileOptions()).deidentify(ds).uid_map)
    restored = PseudonymMap.from_bytes(mapping.to_bytes())
    # a "result" that references the de-identified image
    result = pydicom.Dataset()
    result.StudyInstanceUID = ds.StudyInstanceUID
    result.PatientID = ds.PatientID
    result.PatientName = ""
    result.PatientIdentityRemoved = "YES"
    item = pydicom.Dataset()
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    series = pydicom.Dataset()
    series.SeriesInstanceUID = ds.SeriesInstanceUID
    series.ReferencedInstanceSequence = [item]
    result.ReferencedSeriesSequence = [series]
    result.SOPInstanceUID = derive_uid("new-object")
    before = copy.deepcopy(result)
    built, result = result, reidentify(result, restored, {ds.StudyInstanceUID})
    assert built == before, "re-identification changed the object it was given"
    assert result.StudyInstanceUID == ct.StudyInstanceUID
    assert result.PatientID == ct.PatientID and str(result.PatientName) == str(ct.PatientName)
    assert result.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.SeriesInstanceUID
    assert (
        result.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == ct.SOPInstanceUID
    )
    assert result.SOPInstanceUID == derive_uid("new-object")
    assert result.PatientIdentityRemoved == "NO"


def test_result_from_unknown_study_is_refused(ct):
    result = pydicom.Dataset()
    result.StudyInstanceUID = "2.25.1"
    with pytest.raises(DeidentificationError):
        reidentify(result, PseudonymMap.capture("k", ct), {"2.25.2"})


def test_derived_uids_are_deterministic_and_valid():
    uid = derive_uid("1.2.3", "lung-ct-density", "1.0.0", "seg")
    assert uid == derive_uid("1.2.3", "lung-ct-density", "1.0.0", "seg")
    assert uid != derive_uid("1.2.3", "lung-ct-density", "1.0.1", "seg")
    assert len(uid) <= 64 and pydicom.uid.UID(uid).is_valid


def test_kept_and_swept_elements_are_settled_without_reading_their_values(pseudonyms):
    """Kept elements (K, or C of a VR cleaning keeps) stay as received, unconverted; swept
    text that is not vocabulary is emptied without being read; the result is what the walk with
    every value converted gives (the same encoding)."""
    from pydicom.dataelem import RawDataElement

    from node.deid.engine import SAFE_TEXT_KEYWORDS, TEXT_VRS
    from node.dicomio import encode

    instance = pydicom.dcmread(series_files(CT_SERIES)[0])
    instance.ContrastBolusRoute = "IV line placed by Dr Smith"  # LO without an action: swept
    raw = encode(instance)
    deidentifier = Deidentifier(pseudonyms, ProfileOptions())
    received = pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw))
    kept = [e.tag for e in received if deidentifier.table.action_for(e.tag) == "K" and e.VR != "SQ"]
    swept = [
        e.tag for e in received
        if not e.tag.is_private and deidentifier.table.action_for(e.tag) is None and e.VR in TEXT_VRS
        and e.keyword not in SAFE_TEXT_KEYWORDS and e.value
    ]  # fmt: skip
    assert kept and swept
    lazy = pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw))
    as_read = {tag: lazy.get_item(tag) for tag in kept}
    assert any(isinstance(element, RawDataElement) for element in as_read.values())
    deidentifier.deidentify(lazy)
    for tag in kept:
        assert lazy.get_item(tag) is as_read[tag], tag  # neither converted nor replaced
    for tag in swept:
        assert not lazy[tag].value, tag
    eager = pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw))
    for element in eager.iterall():  # every value converted before the walk
        _ = element.value
    deidentifier.deidentify(eager)
    assert encode(lazy) == encode(eager)
