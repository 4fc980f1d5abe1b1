"""Issue 3: one generated test per row of PS3.15 Table E.1-1.

Each row's attribute is put at top level and inside a sequence item, then de-identified with the
Basic Profile alone, with the default profile, and with each option that changes the row. An
independent oracle (below) says what the action must be; the outcome is checked on the data set.
"""

from __future__ import annotations

import json
import secrets
from functools import cache
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.datadict import dictionary_keyword, dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence as DicomSequence

from node.deid.engine import PSEUDONYM_KEYWORDS, TYPE_2_SEQUENCES, Deidentifier
from node.deid.profile import ProfileOptions
from node.deid.pseudonyms import Pseudonymizer

TABLE = json.loads(
    (Path(__file__).parents[1] / "node" / "deid" / "data" / "confidentiality_profile_attributes.json").read_text()
)
ROWS = [row for row in TABLE if not row["id"].startswith("gggg")]
CONTAINER = "CTExposureSequence"  # (0018,9321): not in the table, so only its content is acted on
PSEUDONYMS = Pseudonymizer(secrets.token_bytes(32), "table-test")

BASIC = ProfileOptions(retain_patient_characteristics=False, dates="remove", clean_descriptors=False)
OPTION_VARIANTS: dict[str, dict[str, Any]] = {
    "rtnPatCharsOpt": {"retain_patient_characteristics": True},
    "rtnDevIdOpt": {"retain_device_identity": True},
    "rtnInstIdOpt": {"retain_institution_identity": True},
    "rtnUIDsOpt": {"retain_uids": True},
    "rtnLongFullDatesOpt": {"dates": "full"},
    "rtnLongModifDatesOpt": {"dates": "modified"},
    "cleanDescOpt": {"clean_descriptors": True},
    "cleanStructContOpt": {"clean_structured_content": True},
    "cleanGraphOpt": {"clean_graphics": True},
}
COLUMNS_OF_DEFAULT = ("rtnPatCharsOpt", "rtnLongModifDatesOpt", "cleanDescOpt")
TEXT_VRS = {"LO", "LT", "SH", "ST", "UT", "UC"}
SAMPLE: dict[str, Any] = {
    "PN": "Doe^John", "DA": "20200115", "DT": "20200115101010", "TM": "101010", "UI": "1.2.3.4.5.6.7.8.9",
    "LO": "John Doe secret", "SH": "Doe secret", "LT": "John Doe secret", "ST": "John Doe secret",
    "UT": "John Doe secret", "UC": "John Doe secret", "CS": "SECRETCODE", "AE": "SECRETAE", "AS": "045Y",
    "DS": "12.5", "IS": "42", "US": 7, "SS": 7, "UL": 7, "SL": 7, "UV": 7, "SV": 7, "FL": 1.5, "FD": 1.5,
    "AT": 0x00100010, "UR": "http://example.org/secret",
}  # fmt: skip


def tag_of(row: dict[str, str]) -> int:
    """The row's tag; repeating groups (50xx, 60xx) as their first group, (50xx,xxxx) as Curve Data."""
    if row["id"].lower() == "50xxxxxx":
        return 0x50003000
    return int(row["id"].replace("x", "0"), 16)


def expected_action(row: dict[str, str], columns: tuple[str, ...]) -> str:
    """The oracle: retaining beats cleaning beats the Basic Profile; conditional codes resolve
    conservatively (Z/D, X/D, X/Z/D -> D; X/Z -> Z; X/Z/U* -> U)."""
    actions = [row[c] for c in columns if c in row]
    code = "K" if "K" in actions else "C" if "C" in actions else row["basicProfile"]
    return {"Z/D": "D", "X/D": "D", "X/Z/D": "D", "X/Z": "Z", "X/Z/U*": "U", "X/Z/U": "U"}.get(code, code)


def element_for(tag: int) -> DataElement:
    vr = dictionary_VR(tag).split(" or ")[0]
    if vr == "SQ":
        item = pydicom.Dataset()
        item.PatientName = "Doe^John"
        return DataElement(tag, vr, DicomSequence([item]))
    return DataElement(tag, vr, SAMPLE.get(vr, b"\x01\x02"))


@cache
def engine(options: ProfileOptions) -> Deidentifier:
    return Deidentifier(PSEUDONYMS, options)


def run(row: dict[str, str], options: ProfileOptions, nested: bool) -> tuple[pydicom.Dataset, DataElement]:
    ds = pydicom.Dataset()
    ds.PatientName = "Doe^John"
    ds.PatientID = "PID12345"
    ds.StudyInstanceUID = "1.2.3.99"
    original = element_for(tag_of(row))
    host = pydicom.Dataset()
    if nested:
        setattr(ds, CONTAINER, DicomSequence([host]))
    else:
        host = ds
    host.add(DataElement(original.tag, original.VR, original.value))
    engine(options).deidentify(ds)
    return (ds[CONTAINER].value[0] if nested else ds), original


def check(row: dict[str, str], action: str, host: pydicom.Dataset, original: DataElement) -> None:
    tag, vr = original.tag, original.VR
    keyword = dictionary_keyword(tag)
    present = tag in host
    value = host[tag].value if present else None
    where = f"{row['tag']} {row['name']} action {action}"
    if action == "X":
        assert not present, where
        return
    if vr == "SQ":
        removable = row["basicProfile"].startswith("X/") and keyword not in TYPE_2_SEQUENCES
        if action == "Z":
            assert (not present and removable) or (present and len(value) == 0), where
            return
        assert present, where
        assert all(not item.get("PatientName") for item in value), f"{where}: PN inside survived"
        return
    assert present, where
    if keyword in PSEUDONYM_KEYWORDS and action in ("Z", "D"):
        assert value and str(value) != str(original.value), where
    elif action == "Z":
        assert value in (None, "", b"", []), where
    elif action == "K":
        assert value == original.value, where
    elif action in ("U", "D") and vr == "UI":
        assert str(value).startswith("2.25.") and value != original.value, where
    elif action == "D":
        numeric = vr in ("US", "SS", "UL", "SL", "FL", "FD")
        assert numeric or (value not in (None, "", b"") and value != original.value), where
        if vr in ("US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "DS", "IS"):
            assert float(value) == 0, where
    elif action == "C":
        if vr in ("DA", "DT"):
            assert value and value != original.value and len(str(value)) == len(original.value), where
        elif vr == "PN" or vr in TEXT_VRS:
            assert not value, where  # the sample text holds the patient's name: not clean
        elif vr == "UI":
            assert str(value).startswith("2.25."), where
        else:
            assert value == original.value, where
    elif action == "U":
        assert value == original.value, where  # U on a non-UI VR: nothing to replace


def variants(row: dict[str, str]) -> list[tuple[str, ProfileOptions, tuple[str, ...]]]:
    out = [("basic", BASIC, ()), ("default", ProfileOptions(), COLUMNS_OF_DEFAULT)]
    for column, change in OPTION_VARIANTS.items():
        if column in row:
            options = ProfileOptions(**{**BASIC.__dict__, **change})
            out.append((column, options, options.columns()))
    return out


def test_container_is_not_in_the_table():
    assert all(row["name"] != "CT Exposure Sequence" for row in TABLE)
    assert len(ROWS) == 620


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['tag']}-{r['name'][:40]}" for r in ROWS])
def test_row(row):
    for name, options, columns in variants(row):
        action = expected_action(row, columns)
        for nested in (False, True):
            host, original = run(row, options, nested)
            try:
                check(row, action, host, original)
            except AssertionError as exc:
                raise AssertionError(f"[{name}, {'nested' if nested else 'top level'}] {exc}") from None


def test_private_attributes_removed_unless_safe():
    from node.deid.profile import SafePrivateTag

    def with_private() -> pydicom.Dataset:
        ds = pydicom.Dataset()
        ds.PatientID = "PID1"
        block = ds.private_block(0x0019, "ACME 1.0", create=True)
        block.add_new(0x10, "LO", "safe technical value")
        block.add_new(0x11, "LO", "Doe^John")
        return ds

    removed = with_private()
    engine(ProfileOptions()).deidentify(removed)
    assert not any(e.tag.is_private for e in removed)
    kept = with_private()
    Deidentifier(PSEUDONYMS, ProfileOptions(safe_private=(SafePrivateTag(0x0019, "ACME 1.0", 0x10),))).deidentify(kept)
    assert kept[0x00191010].value == "safe technical value"
    assert 0x00191011 not in kept
    assert "113111" in [c.CodeValue for c in kept.DeidentificationMethodCodeSequence]
