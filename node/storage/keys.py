"""Master keys and the key-encryption keys (KEK) derived from them.

A *master key* (32 random bytes, base64 in a key file or an environment variable) is never used
directly: HKDF-SHA256 (RFC 5869) derives the KEK that wraps each object's data key. Keys live in a
keyring, current first; stored objects name the key id (16 hex digits of a SHA-256 of the key)
that wraps them, so a rotated key keeps opening old objects until they are re-wrapped. The node's
long-lived secrets (for index digests and pseudonyms) are random and stored encrypted, so they
survive key rotation (see :mod:`node.storage.secrets`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from node.errors import KeyProviderError
from node.settings.config import EnvKeySource, FileKeySource

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


class KeyProvider(Protocol):
    """Where master keys come from; a KMS or Vault provider implements the same two methods."""

    def current(self) -> MasterKey:
        """The key new objects are sealed with."""
        ...

    def get(self, key_id: str) -> MasterKey:
        """The key with ``key_id``; raises :class:`KeyProviderError` when unknown."""
        ...

    def key_ids(self) -> list[str]:
        """Ids of every key the provider holds, current first."""
        ...

    def sealing(self) -> contextlib.AbstractContextManager[None]:
        """Held while an object is sealed and written, so a key change waits for it."""
        ...


class _SealingGate:
    """Many sealers at once, or one key change, which waits for the sealers in flight (so that no
    object sealed under a key is still being written once the process has moved to another)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._changing = False

    @contextmanager
    def sealing(self) -> Iterator[None]:
        with self._cond:
            while self._changing:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextmanager
    def changing(self) -> Iterator[None]:
        with self._cond:
            while self._changing:
                self._cond.wait()
            self._changing = True
            while self._active:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._changing = False
                self._cond.notify_all()


class KeyringProvider:
    """Master keys from a keyring: the first key is current, the others still open old objects.

    Parameters
    ----------
    secrets_
        32-byte master keys, current first.
    source
        Where they came from; a key file is read again by :meth:`reload` when it changes (how
        ``ainode keys rotate`` reaches running processes).
    """

    def __init__(self, secrets_: list[bytes], source: FileKeySource | EnvKeySource | None = None) -> None:
        self.keys = _master_keys(secrets_)
        self.source = source
        self._gate = _SealingGate()
        self._stamp = _file_stamp(source)

    def sealing(self) -> contextlib.AbstractContextManager[None]:
        """Hold while sealing and writing an object with :meth:`current`."""
        return self._gate.sealing()

    def reload(self) -> bool:
        """Read the key file again if it changed since it was read; returns whether the keys changed.
        Waits for the objects being sealed meanwhile, so none is sealed with a retired key after this
        returns.

        Raises
        ------
        KeyProviderError
            The changed file cannot be read (the keys in memory stay).
        """
        stamp = _file_stamp(self.source)
        if stamp == self._stamp or not isinstance(self.source, FileKeySource):
            return False
        fresh = load_key_provider(self.source)
        with self._gate.changing():
            changed = [k.key_id for k in fresh.keys] != self.key_ids()
            self.keys, self._stamp = fresh.keys, stamp
        return changed

    def current(self) -> MasterKey:
        """The first key of the keyring."""
        return self.keys[0]

    def get(self, key_id: str) -> MasterKey:
        """The key with ``key_id``."""
        for key in self.keys:
            if key.key_id == key_id:
                return key
        raise KeyProviderError(f"key {key_id} is not in the keyring")

    def key_ids(self) -> list[str]:
        """Ids of every key, current first."""
        return [k.key_id for k in self.keys]


def _master_keys(secrets_: list[bytes]) -> list[MasterKey]:
    if not secrets_:
        raise KeyProviderError("the keyring holds no key")
    keys = []
    for secret in secrets_:
        if len(secret) != KEY_BYTES:
            raise KeyProviderError(f"a master key must be {KEY_BYTES} bytes, got {len(secret)}")
        keys.append(MasterKey(key_id_of(secret), secret))
    return keys


def _file_stamp(source: FileKeySource | EnvKeySource | None) -> tuple[int, int, int] | None:
    if not isinstance(source, FileKeySource):
        return None
    try:
        st = source.path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _decode(text: str, where: str) -> list[bytes]:
    keys = []
    for line in text.replace(",", "\n").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            keys.append(base64.b64decode(line, validate=True))
        except (binascii.Error, ValueError):
            raise KeyProviderError(f"{where}: not base64 of a {KEY_BYTES}-byte key") from None
    return keys


def load_key_provider(source: FileKeySource | EnvKeySource) -> KeyringProvider:
    """Build the key provider a configuration names.

    A key file holds one base64 key per line, current first; an environment variable holds them
    separated by commas.

    Raises
    ------
    KeyProviderError
        The file is missing, readable by group or others, or holds no valid key; or the
        environment variable is unset.
    """
    if isinstance(source, EnvKeySource):
        value = os.environ.get(source.variable)
        if not value:
            raise KeyProviderError(f"environment variable {source.variable} is not set")
        return KeyringProvider(_decode(value, f"environment variable {source.variable}"), source)
    path = source.path
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise KeyProviderError(f"key file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyProviderError(f"key file {path}: readable by others (mode {oct(mode & 0o777)}); chmod 600")
    return KeyringProvider(_decode(text, f"key file {path}"), source)


def write_keyring(path: Path, secrets_: list[bytes]) -> None:
    """Atomically replace a key file with ``secrets_`` (current first), mode 0600."""
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(base64.b64encode(s).decode() + "\n" for s in secrets_))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
