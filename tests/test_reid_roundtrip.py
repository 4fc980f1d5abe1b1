"""Issue 3: UID consistency, and the de-identify -> SEG/SR -> re-identify round trip on the real CT."""

from __future__ import annotations

import copy
import secrets

import numpy as np
import pydicom
import pytest

from ainode_sdk.base import AlgorithmResult, Measurement, Segment
from lung_ct_density import LungCtDensity
from node.deid import InstanceDeidentifier
from node.deid.pseudonyms import Pseudonymizer, derive_uid
from node.deid.reid import PATIENT_STUDY_KEYWORDS, PseudonymMap, reidentify
from node.jobs.volume import load_volume
from node.results import build_measurement_report, build_segmentation
from node.results.identity import ObjectIdentity
from node.settings.config import Deidentification

from .peers import CT_SERIES, CT_SOFT_SERIES, series_files


@pytest.fixture(scope="module")
def originals() -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in series_files(CT_SERIES)]


def _deidentify(datasets, secret: bytes) -> tuple[list[pydicom.Dataset], dict[str, str]]:
    deid = InstanceDeidentifier(Pseudonymizer(secret, "k"), Deidentification())
    out, uid_map = [], {}
    for ds in datasets:
        copy_ = copy.deepcopy(ds)
        uid_map.update(deid(copy_).uid_map)
        out.append(copy_)
    return out, uid_map


def test_uids_consistent_across_series_and_instances_and_keyed(originals):
    secret = secrets.token_bytes(32)
    soft = [pydicom.dcmread(f, stop_before_pixels=True) for f in series_files(CT_SOFT_SERIES)[:5]]
    lung_deid, lung_map = _deidentify(originals[:5], secret)
    soft_deid, soft_map = _deidentify(soft, secret)
    # one original UID -> one pseudonym, everywhere (a function, and injective)
    inverse: dict[str, str] = {}
    for pseudo, original in [*lung_map.items(), *soft_map.items()]:
        assert inverse.setdefault(original, pseudo) == pseudo
    assert len(set(inverse.values())) == len(inverse)
    # the two series of one study stay one study of one patient, with one frame of reference
    assert {ds.StudyInstanceUID for ds in lung_deid + soft_deid} == {lung_deid[0].StudyInstanceUID}
    assert {ds.PatientID for ds in lung_deid + soft_deid} == {lung_deid[0].PatientID}
    assert lung_deid[0].StudyDate == soft_deid[0].StudyDate
    same_for = originals[0].FrameOfReferenceUID == soft[0].FrameOfReferenceUID
    assert (lung_deid[0].FrameOfReferenceUID == soft_deid[0].FrameOfReferenceUID) is same_for
    # references inside the series resolve to the de-identified instances
    by_original = {str(o.SOPInstanceUID): d.SOPInstanceUID for o, d in zip(originals[:5], lung_deid, strict=True)}
    for o, d in zip(originals[:5], lung_deid, strict=True):
        for item_o, item_d in zip(o.ReferencedImageSequence, d.ReferencedImageSequence, strict=True):
            if str(item_o.ReferencedSOPInstanceUID) in by_original:
                assert item_d.ReferencedSOPInstanceUID == by_original[str(item_o.ReferencedSOPInstanceUID)]
            assert item_d.ReferencedSOPInstanceUID == inverse[str(item_o.ReferencedSOPInstanceUID)]
    # another secret gives other pseudonyms
    other, _ = _deidentify(originals[:1], secrets.token_bytes(32))
    assert other[0].StudyInstanceUID != lung_deid[0].StudyInstanceUID


def _cheap_result(volume) -> AlgorithmResult:
    """Left/right halves of the air inside the body: enough to build real SEG/SR objects quickly."""
    air = volume.voxels < -400
    half = volume.voxels.shape[2] // 2
    left, right = air.copy(), air.copy()
    left[:, :, :half] = False
    right[:, :, half:] = False
    spec_codes = {"Left lung": ("44029006", "SCT", "Left lung"), "Right lung": ("3341006", "SCT", "Right lung")}
    segments = [
        Segment(label, mask, ("123037004", "SCT", "Anatomical Structure"), spec_codes[label])
        for label, mask in (("Left lung", left), ("Right lung", right))
    ]
    volume_code, ml = ("118565006", "SCT", "Volume"), ("ml", "UCUM", "milliliter")
    measurements = [Measurement(s.label, volume_code, float(s.mask.sum()), ml) for s in segments]
    return AlgorithmResult(segments=segments, measurements=measurements)


def test_round_trip_restores_every_reference_and_leaves_no_pseudonym(originals):
    secret = secrets.token_bytes(32)
    deidentified, uid_map = _deidentify(originals, secret)
    mapping = PseudonymMap.capture("k", originals[0])
    mapping.add(uid_map)
    mapping = PseudonymMap.from_bytes(mapping.to_bytes())
    volume, slices = load_volume(deidentified)
    result = _cheap_result(volume)
    spec = LungCtDensity.spec
    seg = build_segmentation(
        slices, result, spec, identity=ObjectIdentity(derive_uid("s1"), derive_uid("i1"), 9901, "T"),
    )  # fmt: skip
    sr = build_measurement_report(
        seg, slices, result, spec, design="segment", series_instance_uid=derive_uid("s2"),
        sop_instance_uid=derive_uid("i2"), series_number=9902, device_uid=derive_uid("dev"),
    )  # fmt: skip
    original = originals[0]
    original_uids = {
        str(e.value) for ds in originals for e in ds.iterall() if e.VR == "UI" and isinstance(e.value, str)
    }
    pseudonyms = set(uid_map)
    for built in (seg, sr):
        obj = reidentify(built, mapping, {str(slices[0].StudyInstanceUID)})
        values = [str(v) for e in obj.iterall() if e.VR == "UI" for v in (e.value if e.VM > 1 else [e.value])]
        assert not pseudonyms & set(values), "a pseudonym survived re-identification"
        referenced = {
            str(e.value) for e in obj.iterall() if e.keyword in ("ReferencedSOPInstanceUID", "SeriesInstanceUID")
        } - {str(obj.SeriesInstanceUID)}
        assert referenced and referenced <= original_uids | {str(seg.SOPInstanceUID), str(seg.SeriesInstanceUID)}
        for keyword in PATIENT_STUDY_KEYWORDS:
            if keyword in original and keyword != "SpecificCharacterSet":
                assert obj[keyword].value == original[keyword].value, keyword
        assert obj.FrameOfReferenceUID == original.FrameOfReferenceUID if "FrameOfReferenceUID" in obj else True
        assert obj.PatientIdentityRemoved == "NO"
        assert "DeidentificationMethodCodeSequence" not in obj
        assert not any(str(e.value).startswith("ANONYMIZED") for e in obj.iterall() if e.VR in ("LO", "SH", "PN"))
    # the objects re-identified, and the de-identified sources they share elements with, are left
    # as they were: pseudonyms only
    restored = set(uid_map.values())
    for ds in (seg, sr, *slices):
        values = {str(v) for e in ds.iterall() if e.VR == "UI" for v in (e.value if e.VM > 1 else [e.value])}
        assert not restored & values and ds.PatientIdentityRemoved == "YES"
    assert np.array_equal(volume.voxels[0], load_volume(originals)[0].voxels[0])  # pixels untouched by de-id
