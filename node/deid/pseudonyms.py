"""Keyed, consistent pseudonyms for UIDs, identifiers and dates (PS3.15 E.3.10, E.3.6).

Every pseudonym is a function of the original value and a secret (HMAC-SHA256), so the same
patient or study maps to the same pseudonym across instances and sessions, and nobody without the
secret can link a pseudonym to its original. The secret is versioned by the master key's id.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import uuid

UID_ROOT = "2.25."


def uid_from_digest(digest: bytes) -> str:
    """A UID of the form ``2.25.<integer of a UUID>`` (PS3.5 B.2) from at least 16 bytes."""
    value = uuid.UUID(bytes=digest[:16], version=4)
    return f"{UID_ROOT}{value.int}"


def derive_uid(*parts: str) -> str:
    """A deterministic UID from ``parts`` (e.g. source Study Instance UID, algorithm, version).

    The same parts always give the same UID, so a re-sent result replaces its earlier copy in the
    PACS rather than duplicating it (PS3.5 B.2, at most 64 characters).
    """
    return uid_from_digest(hashlib.sha256("\x1f".join(parts).encode()).digest())


class Pseudonymizer:
    """Keyed pseudonyms under one secret.

    Parameters
    ----------
    secret
        32-byte key derived for pseudonyms (never logged, never in the config file).
    key_id
        Identifier of the master key the secret was derived from (recorded with every map).
    """

    def __init__(self, secret: bytes, key_id: str) -> None:
        self._secret = secret
        self.key_id = key_id

    def _mac(self, kind: str, value: str) -> bytes:
        return hmac.new(self._secret, f"{kind}\x1f{value}".encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """Pseudonymous UID for ``original``: ``2.25.`` + a UUID from HMAC-SHA256 (<= 64 chars)."""
        return uid_from_digest(self._mac("uid", original))

    def identifier(self, kind: str, original: str, length: int = 16) -> str:
        """Short pseudonym (upper-case hex, ``length`` characters) for a Patient ID, Accession
        Number or Study ID; fits SH (16) and LO (64)."""
        return self._mac(kind, original).hex()[:length].upper()

    def date_offset_days(self, patient_id: str) -> int:
        """Whole-day shift for one patient, in [-3650, -1]: dates move into the past consistently."""
        value = int.from_bytes(self._mac("date-offset", patient_id)[:4], "big")
        return -(1 + value % 3650)


def shift_da(value: str, days: int) -> str:
    """Shift a DA value (``YYYYMMDD``) by ``days``; an unparsable value becomes empty."""
    try:
        date = dt.datetime.strptime(value.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return ""
    return (date + dt.timedelta(days=days)).strftime("%Y%m%d")


def shift_dt(value: str, days: int) -> str:
    """Shift the date part of a DT value, keeping time and offset; unparsable becomes empty."""
    text = value.strip()
    if len(text) < 8:
        return ""
    shifted = shift_da(text[:8], days)
    return shifted + text[8:] if shifted else ""
