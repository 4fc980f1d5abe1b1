"""Issue 3: de-identification leaks nothing, keeps the files valid, and keeps links consistent."""

from __future__ import annotations

import base64
import os
import re
import secrets
import subprocess
from pathlib import Path

import pydicom
import pytest
import yaml

from node.deid.pseudonyms import Pseudonymizer
from node.settings.config import EnvKeySource
from node.storage.keys import load_key_provider
from node.storage.secrets import PSEUDONYM_SECRET, NodeSecrets
from node.storage.store import ObjectStore

from .peers import AINODE, DATA, dciodvfy

LEAK_FOLDERS = [DATA / "deid_fake_phi", DATA / "mr_brain_siemens_t1sag_HFS", DATA / "mr_enhanced_multiframe"]
IDENTIFYING = (
    "PatientID", "OtherPatientIDs", "AccessionNumber", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "StationName", "PatientAddress", "IssuerOfPatientID", "MedicalRecordLocator",
    "PatientTelephoneNumbers", "RequestingPhysician", "OperatorsName", "PerformingPhysicianName",
)  # fmt: skip
MIN_NEEDLE = (
    4  # shorter values (e.g. an MR whose Patient's Name is "HFS", also its Patient Position) are checked per element
)


def dicom_files(folder: Path) -> list[Path]:
    out = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            try:
                pydicom.dcmread(path, stop_before_pixels=True)
            except pydicom.errors.InvalidDicomError:
                continue
            out.append(path)
    return out


def needles_of(ds: pydicom.Dataset) -> set[str]:
    """Identifying values of an original: names and their parts, IDs, institution, dates, UIDs."""
    found: set[str] = set()
    for elem in ds.iterall():
        if elem.VR == "SQ" or elem.value in (None, "", b""):
            continue
        values = [str(v) for v in elem.value] if elem.VM > 1 else [str(elem.value)]
        if elem.VR == "PN":
            for v in values:
                found.add(v)
                found.update(re.split(r"[\^=]", v))
        elif elem.keyword in IDENTIFYING or elem.VR == "DA":
            found.update(values)
        elif elem.VR == "UI" and elem.keyword not in ("SOPClassUID", "ReferencedSOPClassUID", "TransferSyntaxUID"):
            found.update(v for v in values if not v.startswith("1.2.840.10008."))
    return {n.strip() for n in found if len(n.strip()) >= MIN_NEEDLE}


def _errors(path: Path) -> set[str]:
    """dciodvfy errors with values and counts masked, so before/after can be compared."""
    errors, _ = dciodvfy(path)
    return {re.sub(r"\[\d+\]|= <[^>]*>|\d+", "#", line) for line in errors}


@pytest.fixture(scope="module")
def leak_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture(scope="module")
def deidentified(tmp_path_factory, leak_key) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """Every file of the leak folders through ``ainode deidentify``, with a profile whose pixel rule
    blanks the top of secondary captures (so their headers are de-identified and checked too)."""
    work = tmp_path_factory.mktemp("deid")
    config = {
        "node": {"data_dir": str(work / "data")},
        "keys": {"provider": "env", "variable": "AINODE_LEAK_KEY"},
        "deidentification": {
            "default": {},
            "sc-cleaned": {
                "pixel_rules": [{"match": {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "regions": [[0, 0, 4096, 64]]}]
            },
        },
    }
    (work / "ainode.yaml").write_text(yaml.safe_dump(config))
    os.environ["AINODE_LEAK_KEY"] = leak_key
    env = dict(os.environ)
    cmd = [
        AINODE,
        "deidentify",
        *map(str, LEAK_FOLDERS),
        "--out",
        str(work / "out"),
        "--config",
        str(work / "ainode.yaml"),
    ]
    proc = subprocess.run([*cmd, "--profile", "sc-cleaned"], capture_output=True, text=True, env=env, check=False)
    return work, proc


def test_no_identifying_value_survives_anywhere(deidentified):
    work, proc = deidentified
    out = work / "out"
    originals = [pydicom.dcmread(p) for folder in LEAK_FOLDERS for p in dicom_files(folder)]
    outputs = {p: p.read_bytes() for p in sorted(out.glob("*.dcm"))}
    assert len(outputs) == len(originals), proc.stdout + proc.stderr
    leaks = []
    for original in originals:
        for needle in needles_of(original):
            leaks += [(needle, p.name) for p, data in outputs.items() if needle.encode() in data]
    assert leaks == []
    for path in outputs:
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert not ds.get("PatientName")  # short names are checked here, element-wise
        assert not any(e.tag.is_private for e in ds.iterall())
        assert ds.pixel_array.size > 0  # still decodes


def test_output_passes_dciodvfy_without_new_errors(deidentified):
    work, _ = deidentified
    out = work / "out"
    keys = load_key_provider(EnvKeySource(provider="env", variable="AINODE_LEAK_KEY"))
    secret = NodeSecrets(ObjectStore(work / "data" / "store", keys)).get(PSEUDONYM_SECRET)
    pseudonyms = Pseudonymizer(secret, PSEUDONYM_SECRET)
    checked: set[Path] = set()
    for folder in LEAK_FOLDERS:
        for path in dicom_files(folder):
            uid = pseudonyms.uid(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
            for produced in out.glob(f"{uid}*.dcm"):
                new = _errors(produced) - _errors(path)
                assert new == set(), f"{path.name}: {new}"
                checked.add(produced)
    assert checked == set(out.glob("*.dcm"))


def test_secondary_captures_are_quarantined_without_a_pixel_rule(tmp_path):
    env = {**os.environ, "AINODE_KEY": base64.b64encode(secrets.token_bytes(32)).decode()}
    sc = dicom_files(DATA / "deid_fake_phi")
    proc = subprocess.run(
        [AINODE, "deidentify", *map(str, sc), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0
    assert f"de-identified 0, quarantined {len(sc)}, failed 0" in proc.stdout, proc.stdout
    assert proc.stderr.count("quarantined: Secondary Capture") == len(sc)
    assert not list((tmp_path / "out").glob("*"))


def test_pixel_rule_blanks_region_and_records_clean_pixel_option(deidentified):
    out = deidentified[0] / "out"
    cleaned = [pydicom.dcmread(p) for p in out.glob("*.dcm")]
    sc = [ds for ds in cleaned if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"]
    assert sc
    for ds in sc:
        assert ds.BurnedInAnnotation == "NO"
        assert "113101" in [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
        pixels = ds.pixel_array
        assert not pixels[:64].any() and pixels[64:].any()


def test_japanese_names_are_removed():
    from pydicom.data import get_charset_files

    from node.deid.engine import Deidentifier
    from node.deid.profile import ProfileOptions
    from node.deid.pseudonyms import Pseudonymizer

    engine = Deidentifier(Pseudonymizer(secrets.token_bytes(32), "k"), ProfileOptions())
    for name in ("chrH31.dcm", "chrH32.dcm", "chrX1.dcm", "chrSQEncoding.dcm"):
        (path,) = get_charset_files(name)
        ds = pydicom.dcmread(path)
        original_names = [str(e.value) for e in ds.iterall() if e.VR == "PN" and e.value]
        assert original_names
        engine.deidentify(ds)
        remaining = [str(e.value) for e in ds.iterall() if e.VR == "PN" and e.value]
        assert remaining == [], name
        data = ds.to_json()
        assert not any(part in data for n in original_names for part in re.split(r"[\^=]", n) if len(part) >= 2)
