"""highdicom's look-ups in the standard's IOD tables, memoised.

highdicom asks ``is_attribute_in_iod(attribute, sop_class_uid)`` (PS3.3 Part A: is the
attribute in any module of the IOD) through ``is_multiframe_image`` once per source image of a
SEG (its plane positions, derivation and references each ask again): a scan of the IOD's modules
and their attribute lists each time, about 0.5 ms. For a 500-slice CT that is 0.27 s of a 0.6 s
SEG build, for the same answer: highdicom's tables are constants loaded from its JSON, so the
answer depends on the arguments alone. :func:`memoise_iod_lookups` keeps the answers (bounded:
a SOP Class UID comes from a received data set); an unknown SOP class still raises highdicom's
``KeyError`` every time (exceptions are not kept). Installed when :mod:`node.results` is
imported; the answers are the same as without (``tests/test_result_tables.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Protocol

import highdicom._standard_utils as standard_utils

_MEMO_ENTRIES = 4096
"""Answers kept: (attribute, SOP class, exclusions) triples; a node meets a few dozen."""


class Lookup(Protocol):
    """highdicom's ``is_attribute_in_iod``."""

    def __call__(self, attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None) -> bool:
        """Whether ``attribute`` (a keyword) is in a module of the IOD of ``sop_class_uid``."""
        ...


def _memoised(lookup: Lookup) -> Lookup:
    @lru_cache(maxsize=_MEMO_ENTRIES)
    def answer(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
        return lookup(attribute, sop_class_uid, list(exclude) if exclude is not None else None)

    def is_attribute_in_iod(
        attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None
    ) -> bool:
        exclude = tuple(exclude_path_elements) if exclude_path_elements is not None else None
        return answer(str(attribute), str(sop_class_uid), exclude)

    is_attribute_in_iod.__wrapped__ = lookup  # type: ignore[attr-defined]
    is_attribute_in_iod.cache_info = answer.cache_info  # type: ignore[attr-defined]
    return is_attribute_in_iod


def memoise_iod_lookups() -> None:
    """Replace highdicom's ``is_attribute_in_iod`` (pinned 0.28.2, looked up at call time by
    ``is_multiframe_image`` and ``does_iod_have_pixel_data``) with a memoised one; once per
    process (later calls do nothing)."""
    current = standard_utils.is_attribute_in_iod
    if getattr(current, "__wrapped__", None) is None:
        standard_utils.is_attribute_in_iod = _memoised(current)
