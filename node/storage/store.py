"""The encrypted object store: every byte of PHI the node keeps at rest goes through here.

Envelope encryption: each object gets a fresh 256-bit data key (DEK); the payload is sealed with
AES-256-GCM under the DEK, the DEK with AES-256-GCM under the key-encryption key (KEK) derived from
the master key named in the header. The object id is the associated data of both, so an object
cannot be swapped for another. Layout of a stored object::

    b"AIN1" | key id (16 ASCII hex) | wrap nonce (12) | wrapped DEK (32 + 16 tag) | nonce (12) | ciphertext + tag (16)

Writes are atomic and durable: temporary file in the same folder, ``fsync``, ``rename``, ``fsync``
of the folder. Object ids are random (uuid4), never derived from UIDs.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from node.errors import KeyProviderError, OutOfResourcesError, StorageError, TamperedObjectError
from node.storage.keys import KeyProvider

MAGIC = b"AIN1"
_KID = 16
_NONCE = 12
_WRAPPED = 32 + 16
HEADER_BYTES = len(MAGIC) + _KID + _NONCE + _WRAPPED + _NONCE


class ObjectStore:
    """Encrypted, durable storage of opaque byte strings under random object ids.

    Parameters
    ----------
    root
        Folder of the store (created with mode 0700).
    keys
        Provider of the master keys.
    min_free_bytes
        Refuse writes with :class:`OutOfResourcesError` when less than this is free on the disk.
    """

    def __init__(self, root: Path, keys: KeyProvider, min_free_bytes: int = 0) -> None:
        self.root = root
        self.keys = keys
        self.min_free_bytes = min_free_bytes
        self.on_tamper: Callable[[str, str], None] | None = None
        for sub in ("objects", "quarantine", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, object_id: str) -> Path:
        return self.root / "objects" / object_id[:2] / object_id

    def seal(self, object_id: str, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext`` for ``object_id`` (see the module docstring for the layout)."""
        master = self.keys.current()
        dek = AESGCM.generate_key(bit_length=256)
        wrap_nonce, nonce = os.urandom(_NONCE), os.urandom(_NONCE)
        aad = object_id.encode()
        wrapped = AESGCM(master.derive("kek")).encrypt(wrap_nonce, dek, b"dek:" + aad)
        body = AESGCM(dek).encrypt(nonce, plaintext, aad)
        return b"".join((MAGIC, master.key_id.encode(), wrap_nonce, wrapped, nonce, body))

    def unseal(self, object_id: str, blob: bytes) -> bytes:
        """Decrypt and authenticate a sealed object.

        Raises
        ------
        TamperedObjectError
            Wrong magic, truncated, authentication failed (altered bytes, wrong object id), or the
            master key named in the header is not in the keyring.
        """
        key_id, wrap_nonce, wrapped = self._header(object_id, blob)
        nonce, pos = blob[HEADER_BYTES - _NONCE : HEADER_BYTES], HEADER_BYTES
        aad = object_id.encode()
        dek = self._unwrap(object_id, key_id, wrap_nonce, wrapped)
        try:
            return AESGCM(dek).decrypt(nonce, blob[pos:], aad)
        except InvalidTag:
            raise TamperedObjectError(f"object {object_id}: authentication failed (tampered)") from None

    def _unwrap(self, object_id: str, key_id: str, wrap_nonce: bytes, wrapped: bytes) -> bytes:
        try:
            master = self.keys.get(key_id)
        except KeyProviderError:
            raise TamperedObjectError(
                f"object {object_id}: names key {key_id!r}, not in the keyring (tampered, or the key was removed)"
            ) from None
        try:
            return AESGCM(master.derive("kek")).decrypt(wrap_nonce, wrapped, b"dek:" + object_id.encode())
        except InvalidTag:
            raise TamperedObjectError(f"object {object_id}: data key authentication failed (tampered)") from None

    @staticmethod
    def _header(object_id: str, blob: bytes) -> tuple[str, bytes, bytes]:
        if len(blob) < HEADER_BYTES + 16 or not blob.startswith(MAGIC):
            raise TamperedObjectError(f"object {object_id}: truncated or not an ainode object")
        pos = len(MAGIC)
        key_id = blob[pos : pos + _KID].decode("ascii", "replace")
        wrap_nonce = blob[pos + _KID : pos + _KID + _NONCE]
        wrapped = blob[pos + _KID + _NONCE : pos + _KID + _NONCE + _WRAPPED]
        return key_id, wrap_nonce, wrapped

    def check_space(self, incoming: int = 0) -> None:
        """Raise :class:`OutOfResourcesError` if writing ``incoming`` bytes would pass the watermark."""
        free = shutil.disk_usage(self.root).free
        if free - incoming < self.min_free_bytes:
            raise OutOfResourcesError(f"{free // 2**20} MiB free, watermark {self.min_free_bytes // 2**20} MiB")

    def put(self, plaintext: bytes, object_id: str | None = None) -> str:
        """Seal and durably write ``plaintext``; return its object id.

        Raises
        ------
        OutOfResourcesError
            The disk watermark would be passed.
        StorageError
            The write failed.
        """
        object_id = object_id or uuid.uuid4().hex
        self.check_space(len(plaintext))
        with self.keys.sealing():  # a key change waits until this object is durable
            self._write(object_id, self.seal(object_id, plaintext))
        return object_id

    def _read(self, object_id: str) -> bytes:
        try:
            return self._path(object_id).read_bytes()
        except OSError as exc:
            raise StorageError(f"object {object_id}: cannot read: {exc.strerror}") from None

    def _write(self, object_id: str, blob: bytes) -> None:
        final = self._path(object_id)
        final.parent.mkdir(exist_ok=True, mode=0o700)
        tmp = self.root / "tmp" / f"{object_id}.{uuid.uuid4().hex[:8]}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
                os.fdatasync(fd)  # data and size; the name is made durable by the directory's fsync
            finally:
                os.close(fd)
            os.replace(tmp, final)
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"object {object_id}: write failed: {exc.strerror}") from None

    def get(self, object_id: str) -> bytes:
        """Read and decrypt an object.

        Raises
        ------
        TamperedObjectError
            The object failed authentication; it has been moved to ``quarantine/`` (still
            encrypted) and ``on_tamper`` was told.
        StorageError
            The object cannot be read.
        """
        try:
            return self.unseal(object_id, self._read(object_id))
        except TamperedObjectError as exc:
            self._quarantine_tampered(object_id, exc)
            raise

    def _quarantine_tampered(self, object_id: str, exc: TamperedObjectError) -> None:
        if self._path(object_id).exists():
            self.quarantine(object_id)
        if self.on_tamper is not None:
            self.on_tamper(object_id, str(exc))

    def key_id_of(self, object_id: str) -> str:
        """The id of the master key that wraps an object's data key (reads the header only)."""
        with open(self._path(object_id), "rb") as fh:
            head = fh.read(HEADER_BYTES + 16)
        return self._header(object_id, head)[0]

    def object_ids(self, prefix: str = "") -> list[str]:
        """Every object in the store whose id starts with ``prefix`` (quarantined ones excluded);
        only the shard folders that can hold such ids are listed."""
        shards = f"{prefix[:2]}*" if prefix else "*"
        return sorted(
            p.name for p in (self.root / "objects").glob(f"{shards}/*") if p.is_file() and p.name.startswith(prefix)
        )

    def key_id_of_blob(self, object_id: str, blob: bytes) -> str:
        """The id of the master key named in a sealed blob's header."""
        return self._header(object_id, blob)[0]

    def rewrap_blob(self, object_id: str, blob: bytes) -> tuple[bytes, bool]:
        """A sealed blob with its data key re-wrapped under the current master key (the payload
        bytes are unchanged), and whether anything changed.

        Raises
        ------
        TamperedObjectError
            The header or the wrapped data key failed authentication.
        """
        current = self.keys.current()
        key_id, wrap_nonce, wrapped = self._header(object_id, blob)
        if key_id == current.key_id:
            return blob, False
        dek = self._unwrap(object_id, key_id, wrap_nonce, wrapped)
        new_nonce = os.urandom(_NONCE)
        new_wrapped = AESGCM(current.derive("kek")).encrypt(new_nonce, dek, b"dek:" + object_id.encode())
        body = blob[HEADER_BYTES - _NONCE :]
        return b"".join((MAGIC, current.key_id.encode(), new_nonce, new_wrapped, body)), True

    def rewrap(self, object_id: str) -> bool:
        """Re-wrap a stored object's data key under the current master key (atomic rewrite; the
        payload is not re-encrypted). Returns ``False`` when it already was. Tampered objects are
        quarantined and :class:`TamperedObjectError` is raised."""
        with self.keys.sealing():
            try:
                blob, changed = self.rewrap_blob(object_id, self._read(object_id))
            except TamperedObjectError as exc:
                self._quarantine_tampered(object_id, exc)
                raise
            if changed:
                self._write(object_id, blob)
        return changed

    def exists(self, object_id: str) -> bool:
        """Whether the store holds ``object_id`` (outside quarantine)."""
        return self._path(object_id).exists()

    def delete(self, object_id: str) -> None:
        """Remove an object (no error if it is already gone)."""
        self._path(object_id).unlink(missing_ok=True)

    def quarantine(self, object_id: str) -> Path:
        """Move an object, still encrypted, to ``quarantine/`` for an administrator to inspect."""
        target = self.root / "quarantine" / object_id
        os.replace(self._path(object_id), target)
        return target
