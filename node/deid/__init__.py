"""De-identification before analysis (PS3.15 Annex E) and re-identification of results."""

from __future__ import annotations

import dataclasses

from pydicom import Dataset
from pydicom.datadict import dictionary_description
from pydicom.tag import Tag

from node.deid.engine import Deidentifier, Outcome
from node.deid.pixels import blank_regions, matching_rule, pixel_phi_risk
from node.deid.profile import ProfileOptions, SafePrivateTag
from node.deid.pseudonyms import Pseudonymizer
from node.errors import DeidentificationError, QuarantinedError
from node.settings.config import Deidentification

__all__ = ["InstanceDeidentifier", "Outcome", "options_from"]


def options_from(profile: Deidentification) -> ProfileOptions:
    """The engine's options for a configured de-identification profile."""
    safe = tuple(
        SafePrivateTag(int(s.group, 16), s.creator, int(element, 16))
        for s in profile.safe_private
        for element in s.elements
    )
    options = {f.name: getattr(profile, f.name) for f in dataclasses.fields(ProfileOptions) if f.name != "safe_private"}
    return ProfileOptions(**options, safe_private=safe)  # the E.3 options are named alike in both


REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
"""The UIDs without which a de-identified instance cannot be stored, placed in its study and series,
or mapped back (SOP Common module C.12.1, General Study C.7.2.1, General Series C.7.3.1: Type 1)."""


def check_identity(ds: Dataset) -> None:
    """Raise :class:`~node.errors.DeidentificationError` naming the first of :data:`REQUIRED_UIDS`
    that ``ds`` lacks or has empty."""
    for keyword in REQUIRED_UIDS:
        tag = Tag(keyword)
        name = f"{dictionary_description(tag)} {tag}"
        if keyword not in ds:
            raise DeidentificationError(f"{name} is missing (Type 1)")
        if not str(ds[keyword].value or "").strip():
            raise DeidentificationError(f"{name} is empty (Type 1)")


class InstanceDeidentifier:
    """De-identifies one instance under a profile: the pixel PHI policy, then Table E.1-1.

    Raises :class:`~node.errors.QuarantinedError` for an image whose pixels may hold identifying
    text and that no pixel rule of the profile cleans.
    """

    def __init__(self, pseudonyms: Pseudonymizer, profile: Deidentification) -> None:
        self.profile = profile
        self.engine = Deidentifier(pseudonyms, options_from(profile))

    def __call__(self, ds: Dataset) -> Outcome:
        """De-identify ``ds`` in place; returns the UID map made.

        Raises
        ------
        DeidentificationError
            An identifying UID the result needs (SOP Class, SOP Instance, Study or Series Instance
            UID) is missing or empty; the message names it.
        QuarantinedError
            The pixels may hold burned-in text and no pixel rule cleans them.
        """
        check_identity(ds)
        reason = pixel_phi_risk(ds)
        cleaned = False
        if reason is not None:
            rule = matching_rule(ds, self.profile.pixel_rules)
            if rule is None:
                raise QuarantinedError(f"quarantined: {reason}")
            blank_regions(ds, rule.regions)
            cleaned = True
        return self.engine.deidentify(ds, pixels_cleaned=cleaned)
