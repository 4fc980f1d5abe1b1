"""The one rule for UIDs received from outside (PS3.5 §9.1), used by every way in.

A UID is 1 to 64 characters of digits and full stops; its components (between the stops) are
non-empty and, per §9.1, a component other than ``0`` does not start with ``0``. Some scanners
emit components with a leading zero: such UIDs are accepted (a study must not be lost over it)
with a log line that names the attribute, never the value. Anything else — letters, slashes,
backslashes, ``..``, an absolute path, over 64 characters, empty — is refused with
:class:`~node.errors.InvalidInstanceError`, which the network edge answers with DIMSE 0xC000.

Because a checked UID holds only digits and stops (and is never ``.`` or ``..``), it is safe as
one path component; writers still go through :func:`node.paths.path_under`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from node.errors import InvalidInstanceError

logger = logging.getLogger(__name__)

MAX_UID_LENGTH = 64
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_LEADING_ZERO = re.compile(r"(?:^|\.)0[0-9]")


def check_uid(value: object, name: str) -> str:
    """``value`` as a UID, checked against PS3.5 §9.1.

    Parameters
    ----------
    value
        The received value (a ``str``, pydicom ``UID``, or ``None``); trailing NUL and space
        padding (PS3.5 §6.2, VR UI) is removed.
    name
        The attribute's name for messages, e.g. ``"Study Instance UID"`` (the value itself is never
        put into a message or log line: it may identify a patient's study).

    Returns
    -------
    str
        The UID without padding.

    Raises
    ------
    InvalidInstanceError
        Missing, longer than 64 characters, or not digits and full stops in non-empty components.
    """
    if isinstance(value, Sequence) and not isinstance(value, str):  # a backslash in a UI value: several values
        raise InvalidInstanceError(f"{name} is not a valid UID: it holds {len(value)} values (VM 1, PS3.5 9.1)")
    text = str(value if value is not None else "").rstrip("\0 ").lstrip(" ")
    if not text:
        raise InvalidInstanceError(f"{name} is {'missing' if value is None else 'empty'}")
    if len(text) > MAX_UID_LENGTH:
        raise InvalidInstanceError(f"{name} is longer than {MAX_UID_LENGTH} characters (PS3.5 9.1)")
    if _UID.fullmatch(text) is None:
        raise InvalidInstanceError(f"{name} is not a valid UID: only digits in components separated by '.' (PS3.5 9.1)")
    if _LEADING_ZERO.search(text) is not None:
        logger.warning("%s has a component with a leading zero (not PS3.5 9.1 conformant); accepted", name)
    return text


def check_instance_uids(ds: object) -> tuple[str, str, str]:
    """The Study Instance, Series Instance and SOP Instance UIDs of a data set, each checked by
    :func:`check_uid`.

    Parameters
    ----------
    ds
        A pydicom ``Dataset`` (or anything with a ``get(keyword)`` method).

    Returns
    -------
    tuple of str
        ``(study_instance_uid, series_instance_uid, sop_instance_uid)``.

    Raises
    ------
    InvalidInstanceError
        One of them is missing or not a valid UID (the message names which).
    """
    get = ds.get  # type: ignore[attr-defined]
    return (
        check_uid(get("StudyInstanceUID"), "Study Instance UID (0020,000D)"),
        check_uid(get("SeriesInstanceUID"), "Series Instance UID (0020,000E)"),
        check_uid(get("SOPInstanceUID"), "SOP Instance UID (0008,0018)"),
    )
