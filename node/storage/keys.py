"""Key-encryption keys (KEK) and the keys derived from them.

A *master key* (32 random bytes, base64 in a key file or an environment variable) is never used
directly: HKDF-SHA256 (RFC 5869) derives separate keys for wrapping data keys, for keyed hashes of
UIDs in the index, and for pseudonyms. Every derived key is tagged with the master key's id
(the first 16 hex digits of SHA-256 of the key), so stored objects name the key they need.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from node.errors import KeyProviderError
from node.settings.models import EnvKeySource, FileKeySource

KEY_BYTES = 32


def key_id_of(master_key: bytes) -> str:
    """Public identifier of a master key: 16 hex digits of its SHA-256."""
    return hashlib.sha256(b"ainode-key-id" + master_key).hexdigest()[:16]


@dataclass(frozen=True)
class MasterKey:
    """A master key and its id; derive purpose-specific keys with :meth:`derive`."""

    key_id: str
    secret: bytes

    def derive(self, purpose: str) -> bytes:
        """32-byte key for ``purpose`` (e.g. ``"kek"``, ``"index"``, ``"pseudonym"``), HKDF-SHA256."""
        hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=f"ainode/{purpose}/v1".encode())
        return hkdf.derive(self.secret)

    def keyed_digest(self, purpose: str, value: str) -> str:
        """Hex HMAC-SHA256 of ``value`` under the key derived for ``purpose`` (32 hex digits)."""
        return hmac.new(self.derive(purpose), value.encode(), hashlib.sha256).hexdigest()[:32]


class KeyProvider(Protocol):
    """Where master keys come from; a KMS or Vault provider implements the same two methods."""

    def current(self) -> MasterKey:
        """The key new objects are sealed with."""
        ...

    def get(self, key_id: str) -> MasterKey:
        """The key with ``key_id``; raises :class:`KeyProviderError` when unknown."""
        ...


class StaticKeyProvider:
    """A provider holding one master key (from a file or the environment)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) != KEY_BYTES:
            raise KeyProviderError(f"a master key must be {KEY_BYTES} bytes, got {len(secret)}")
        self._key = MasterKey(key_id_of(secret), secret)

    def current(self) -> MasterKey:
        """The one master key."""
        return self._key

    def get(self, key_id: str) -> MasterKey:
        """The master key if ``key_id`` is its id."""
        if key_id != self._key.key_id:
            raise KeyProviderError(f"key {key_id} is not available from this key provider")
        return self._key


def _decode(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyProviderError(f"{where}: not base64 of a {KEY_BYTES}-byte key") from None


def load_key_provider(source: FileKeySource | EnvKeySource) -> StaticKeyProvider:
    """Build the key provider a configuration names.

    Raises
    ------
    KeyProviderError
        The file is missing, readable by group or others, or does not hold a 32-byte base64 key;
        or the environment variable is unset.
    """
    if isinstance(source, EnvKeySource):
        value = os.environ.get(source.variable)
        if not value:
            raise KeyProviderError(f"environment variable {source.variable} is not set")
        return StaticKeyProvider(_decode(value, f"environment variable {source.variable}"))
    path = source.path
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise KeyProviderError(f"key file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyProviderError(f"key file {path}: readable by others (mode {oct(mode & 0o777)}); chmod 600")
    return StaticKeyProvider(_decode(text, f"key file {path}"))


def generate_key_file(path: Path) -> str:
    """Write a new random master key to ``path`` (mode 0600, refusing to overwrite); return its id."""
    secret = secrets.token_bytes(KEY_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyProviderError(f"key file {path} already exists; not overwritten") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(base64.b64encode(secret).decode() + "\n")
    return key_id_of(secret)
