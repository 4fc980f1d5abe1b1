"""The UID checks of association negotiation, memoised.

pynetdicom checks every UID it decodes or sets: each abstract syntax and transfer syntax of an
A-ASSOCIATE-RQ's presentation contexts (DCMTK's ``storescu`` proposes 128 contexts with 192
transfer syntaxes, the same on every association), again when it turns the PDU into a
primitive, when it negotiates the accepted contexts (PS3.8 9.3.2.2) and when it builds the
A-ASSOCIATE-AC. Each check converts the text to a :class:`pydicom.uid.UID` and runs pynetdicom's
``UI`` validator (:data:`pynetdicom._config.VALIDATORS`) and pydicom's
:attr:`~pydicom.uid.UID.is_valid` (a regular expression, for pynetdicom's "non-conformant"
warning). Both answers depend on the UID's text alone (the validator also on
``ENFORCE_UID_CONFORMANCE``), so they are kept for the texts seen: of the 8.7 ms pynetdicom
spent from decoding the A-ASSOCIATE-RQ to encoding the A-ASSOCIATE-AC, 4.4 ms remain
(``BENCHMARKS.md``, issue 26).

Only texts of at most 64 characters (the longest valid UID, PS3.5 9.1) are kept, at most
:data:`CACHE_SIZE` of them, least recently used first out: a peer sending long or ever-new
strings costs the node at most ``CACHE_SIZE`` short entries.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

from pydicom.uid import UID
from pynetdicom import _config as pynetdicom_config

CACHE_SIZE = 4096
"""UIDs kept (per check): a site's SOP classes and transfer syntaxes fit many times over."""

MAX_UID_CHARS = 64
"""Texts longer than this are not valid UIDs (PS3.5 9.1) and are checked without being kept."""

_lock = threading.Lock()
_installed = False


def memoise_uid_checks() -> None:
    """Memoise pynetdicom's ``UI`` validator and pydicom's ``UID.is_valid`` in this process (once;
    later calls do nothing). The answers are the same as without (``tests/test_uid_checks.py``)."""
    global _installed
    with _lock:
        if _installed:
            return
        validate = pynetdicom_config.VALIDATORS["UI"]
        pynetdicom_config.VALIDATORS["UI"] = _memoised_validator(validate)
        is_valid = UID.is_valid
        if isinstance(is_valid, property) and is_valid.fget is not None:
            UID.is_valid = property(_memoised_is_valid(is_valid.fget), doc=is_valid.__doc__)
        _installed = True


def _memoised_validator(validate: Callable[[Any], tuple[bool, str]]) -> Callable[[Any], tuple[bool, str]]:
    @functools.lru_cache(maxsize=CACHE_SIZE)
    def known(value: str, enforce: bool) -> tuple[bool, str]:  # keyed by the text (a UID is a str)
        return validate(value)

    def check(value: Any) -> tuple[bool, str]:
        if isinstance(value, str) and len(value) <= MAX_UID_CHARS:
            return known(value, bool(pynetdicom_config.ENFORCE_UID_CONFORMANCE))
        return validate(value)

    return check


def _memoised_is_valid(is_valid: Callable[[UID], bool]) -> Callable[[UID], bool]:
    @functools.lru_cache(maxsize=CACHE_SIZE)
    def known(uid: UID) -> bool:  # keyed by the text (a UID is a str)
        return is_valid(uid)

    def check(uid: UID) -> bool:
        return known(uid) if len(uid) <= MAX_UID_CHARS else is_valid(uid)

    return check
