"""The encrypted object store: every byte of PHI the node keeps at rest goes through here.

Envelope encryption: each object gets a fresh 256-bit data key (DEK); the payload is sealed with
AES-256-GCM under the DEK, the DEK with AES-256-GCM under the key-encryption key (KEK) derived from
the master key named in the header. The object id is the associated data of both, so an object
cannot be swapped for another. Layout of a stored object::

    b"AIN1" | key id (16 ASCII hex) | wrap nonce (12) | wrapped DEK (32 + 16 tag) | nonce (12) | ciphertext + tag (16)

Writes are atomic and durable: temporary file in the same folder, ``fsync``, ``rename``, ``fsync``
of the folder. Object ids are random (uuid4), never derived from UIDs. Received instances are not
files of their own but records appended to segment files (:meth:`ObjectStore.append`,
:mod:`node.storage.segments`): the same envelope encryption, one ``fdatasync`` per instance.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from node.errors import KeyProviderError, OutOfResourcesError, StorageError, TamperedObjectError
from node.storage import segments
from node.storage.keys import KeyProvider
from node.storage.segments import SegmentWriter, Slot
from node.storage.spool import Spool

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
        for sub in ("objects", "quarantine", "tmp", "segments"):
            (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.segments_root = root / "segments"
        self._segments: SegmentWriter | None = None

    @property
    def segment_writer(self) -> SegmentWriter:
        """This process's segment writer (its first segment is created by the first append)."""
        if self._segments is None:
            self._segments = SegmentWriter(self.segments_root)
        return self._segments

    def close_segments(self) -> list[Path]:
        """Close this process's segments (every record is durable); returns their paths."""
        return self._segments.close() if self._segments is not None else []

    def _path(self, object_id: str) -> Path:
        return self.root / "objects" / object_id[:2] / object_id

    def seal(self, object_id: str, plaintext: bytes | bytearray) -> bytes:
        """Encrypt ``plaintext`` for ``object_id`` (see the module docstring for the layout)."""
        return b"".join(self._seal_stream(object_id, (plaintext,)))

    def _wrap(self, object_id: str, dek: bytes) -> tuple[str, bytes, bytes]:
        """``dek`` wrapped for ``object_id`` under the current master key's key-encryption key:
        ``(master key id, wrap nonce, wrapped key)`` (the inverse of :meth:`_unwrap`)."""
        master = self.keys.current()
        wrap_nonce = os.urandom(_NONCE)
        return (
            master.key_id,
            wrap_nonce,
            AESGCM(master.derive("kek")).encrypt(wrap_nonce, dek, b"dek:" + object_id.encode()),
        )

    def _new_data_key(self, object_id: str) -> tuple[bytes, str, bytes, bytes]:
        """A fresh AES-256 data key for ``object_id`` and its wrap (:meth:`_wrap`):
        ``(data key, master key id, wrap nonce, wrapped key)``."""
        dek = AESGCM.generate_key(bit_length=256)
        return (dek, *self._wrap(object_id, dek))

    def _envelope(self, object_id: str) -> tuple[bytes, bytes, bytes]:
        """A fresh data key for ``object_id``, the object's header (its wrap and the payload's
        nonce) and that nonce: ``(data key, header, nonce)``."""
        dek, key_id, wrap_nonce, wrapped = self._new_data_key(object_id)
        nonce = os.urandom(_NONCE)
        return dek, b"".join((MAGIC, key_id.encode(), wrap_nonce, wrapped, nonce)), nonce

    def _seal_stream(self, object_id: str, parts: Iterable[bytes | bytearray]) -> Iterator[bytes]:
        """The sealed object, part by part as ``parts`` come: the header, then the AES-GCM
        ciphertext of their concatenation, then its tag (what ``AESGCM.encrypt`` gives of the
        whole, never joined into one more copy)."""
        dek, header, nonce = self._envelope(object_id)
        encryptor = Cipher(algorithms.AES(dek), modes.GCM(nonce)).encryptor()
        encryptor.authenticate_additional_data(object_id.encode())
        yield header
        for part in parts:
            yield encryptor.update(part)
        yield encryptor.finalize() + encryptor.tag

    def append(self, plaintext: bytes) -> str:
        """Seal ``plaintext`` and append it to this process's segment, durably; returns the new
        object id (it names the record's place). One ``fdatasync``, shared with the process's
        concurrent appends; no file created, no directory synced.

        Raises
        ------
        OutOfResourcesError
            The disk watermark would be passed.
        StorageError
            The write failed.
        """
        self.check_space(len(plaintext))

        def seal(object_id: str) -> tuple[bytes, tuple[bytes, bytes]]:
            dek, key_id, wrap_nonce, wrapped = self._new_data_key(object_id)
            nonce = os.urandom(_NONCE)
            return Slot(key_id, wrap_nonce, wrapped, 1).pack(), (
                nonce, AESGCM(dek).encrypt(nonce, plaintext, object_id.encode())
            )  # fmt: skip

        with self.keys.sealing():  # a key change waits until this record is durable
            return self.segment_writer.append(_NONCE + len(plaintext) + 16, seal)

    def append_stream(self, parts: Iterable[bytes | bytearray], size: int) -> str:
        """:meth:`append` for a plaintext of ``size`` bytes that comes as ``parts`` (a large data
        set read back from its :class:`~node.storage.spool.Spool`): sealed part by part, never
        whole in memory. A failure while writing leaves no record behind.

        Raises
        ------
        OutOfResourcesError
            The disk watermark would be passed.
        StorageError
            The write failed, or ``parts`` did not add up to ``size`` bytes.
        """
        self.check_space(size)

        def seal(object_id: str) -> tuple[bytes, Iterator[bytes]]:
            dek, key_id, wrap_nonce, wrapped = self._new_data_key(object_id)
            nonce = os.urandom(_NONCE)
            encryptor = Cipher(algorithms.AES(dek), modes.GCM(nonce)).encryptor()
            encryptor.authenticate_additional_data(object_id.encode())

            def body() -> Iterator[bytes]:
                yield nonce
                for part in parts:
                    yield encryptor.update(part)
                yield encryptor.finalize() + encryptor.tag

            return Slot(key_id, wrap_nonce, wrapped, 1).pack(), body()

        with self.keys.sealing():
            return self.segment_writer.append(_NONCE + size + 16, seal)

    def spool(self) -> Spool:
        """A new encrypted spool for a large data set arriving (:mod:`node.storage.spool`)."""
        return Spool(self.root / "tmp", self.check_space)

    def _segment_dek(self, object_id: str, slots: tuple[Slot, Slot]) -> tuple[bytes, Slot, int]:
        """The data key of a segment record, from its newest slot that authenticates, with that
        slot and its index.

        Raises
        ------
        StorageError
            The record was deleted (both slots shredded), or quarantined by an earlier read.
        TamperedObjectError
            No slot authenticates.
        """
        live = sorted(((slot, i) for i, slot in enumerate(slots) if not slot.empty), key=lambda x: -x[0].sequence)
        if not live:
            if self._quarantined(object_id).exists():  # another reader found it tampered or damaged
                raise StorageError(f"object {object_id}: quarantined (tampered or damaged: the audit log says which)")
            raise StorageError(f"object {object_id}: deleted")
        problem: TamperedObjectError | None = None
        for slot, i in live:
            try:
                return self._unwrap(object_id, slot.key_id, slot.wrap_nonce, slot.wrapped), slot, i
            except TamperedObjectError as exc:
                problem = exc
        assert problem is not None
        raise problem

    def _get_segment(self, object_id: str) -> bytes:
        where = segments.locate(self.segments_root, object_id)
        _length, slots, body = segments.read_record(where.path, where.offset)
        dek = self._segment_dek(object_id, slots)[0]
        try:
            # the ciphertext as a view of the record (not a copy of half a megabyte)
            return AESGCM(dek).decrypt(body[:_NONCE], memoryview(body)[_NONCE:], object_id.encode())
        except InvalidTag:
            raise TamperedObjectError(f"object {object_id}: authentication failed (tampered)") from None

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
            return AESGCM(dek).decrypt(nonce, memoryview(blob)[pos:], aad)
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

    def put(self, plaintext: bytes | bytearray, object_id: str | None = None) -> str:
        """Seal and durably write ``plaintext``; return its object id (as :meth:`put_stream`, which
        names the errors)."""
        return self.put_stream((plaintext,), object_id or uuid.uuid4().hex, len(plaintext))

    def put_stream(self, parts: Iterable[bytes | bytearray], object_id: str, size_hint: int = 0) -> str:
        """Seal and durably write the concatenation of ``parts`` as they come (a large object is
        never whole in memory, in plain or sealed form); return its object id. ``size_hint``: its
        expected size, for the disk watermark.

        Raises
        ------
        OutOfResourcesError
            The disk watermark would be passed.
        StorageError
            The write failed (an exception from ``parts`` leaves nothing behind either).
        """
        self.check_space(size_hint)
        with self.keys.sealing():  # a key change waits until this object is durable
            self._write(object_id, self._seal_stream(object_id, parts))
        return object_id

    def _read(self, object_id: str) -> bytes:
        try:
            return self._path(object_id).read_bytes()
        except OSError as exc:
            raise StorageError(f"object {object_id}: cannot read: {exc.strerror}") from None

    def _write(self, object_id: str, parts: Iterable[bytes | bytearray]) -> None:
        """Write ``parts`` (one after the other) as object ``object_id``: a temporary file,
        ``fdatasync``, renamed into place, the directory synced."""
        final = self._path(object_id)
        final.parent.mkdir(exist_ok=True, mode=0o700)
        tmp = self.root / "tmp" / f"{object_id}.{uuid.uuid4().hex[:8]}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                for part in parts:
                    view = memoryview(part)
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
        except BaseException:  # the parts failed: no partial object left behind
            tmp.unlink(missing_ok=True)
            raise

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
            if segments.is_segment_id(object_id):
                return self._get_segment(object_id)
            return self.unseal(object_id, self._read(object_id))
        except TamperedObjectError as exc:
            self._quarantine_tampered(object_id, exc)
            raise

    def _quarantine_tampered(self, object_id: str, exc: TamperedObjectError) -> None:
        if self.exists(object_id):
            self.quarantine(object_id)
        if self.on_tamper is not None:
            self.on_tamper(object_id, str(exc))

    def key_id_of(self, object_id: str) -> str:
        """The id of the master key that wraps an object's data key (reads the header only; ``""``
        for a deleted segment record).

        Raises
        ------
        StorageError
            The object cannot be read (it is gone).
        """
        if segments.is_segment_id(object_id):
            where = segments.locate(self.segments_root, object_id)
            live = [s for s in segments.read_head(where.path, where.offset)[1] if not s.empty]
            return max(live, key=lambda s: s.sequence).key_id if live else ""
        try:
            with open(self._path(object_id), "rb") as fh:
                head = fh.read(HEADER_BYTES + 16)
        except OSError as exc:
            raise StorageError(f"object {object_id}: cannot read: {exc.strerror}") from None
        return self._header(object_id, head)[0]

    def objects_per_key(self) -> Counter[str]:
        """How many stored objects each master key wraps (by key id); an object deleted while they
        are counted (a job's stage output swept, a study purged) is not counted."""
        counts: Counter[str] = Counter()
        for object_id in self.object_ids():
            try:
                key_id = self.key_id_of(object_id)
            except StorageError:  # gone since it was listed
                continue
            if key_id:  # a segment record deleted since it was listed names none
                counts[key_id] += 1
        return counts

    def object_ids(self, prefix: str = "") -> list[str]:
        """Every object in the store whose id starts with ``prefix`` (quarantined ones excluded);
        only the shard folders that can hold such ids are listed."""
        shards = f"{prefix[:2]}*" if prefix else "*"
        files = [
            p.name for p in (self.root / "objects").glob(f"{shards}/*") if p.is_file() and p.name.startswith(prefix)
        ]
        if prefix and not prefix.startswith(segments.PREFIX):
            return sorted(files)
        return sorted(files + [o for path in self.segment_paths() for o in self.segment_object_ids(path)
                               if o.startswith(prefix)])  # fmt: skip

    def segment_paths(self) -> list[Path]:
        """Every segment file of the store."""
        return sorted(self.segments_root.glob("*.seg"))

    def segment_object_ids(self, path: Path) -> list[str]:
        """The ids of a segment's records that are not deleted."""
        head = segments.segment_prefix(path)
        return [f"{head}{offset:012x}" for offset, _n, (a, b) in segments.records(path) if not (a.empty and b.empty)]

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
        new_key_id, new_nonce, new_wrapped = self._wrap(object_id, self._unwrap(object_id, key_id, wrap_nonce, wrapped))
        body = blob[HEADER_BYTES - _NONCE :]
        return b"".join((MAGIC, new_key_id.encode(), new_nonce, new_wrapped, body)), True

    def rewrap(self, object_id: str) -> bool:
        """Re-wrap a stored object's data key under the current master key (atomic rewrite; the
        payload is not re-encrypted; a segment record gets the new wrap in its other slot).
        Returns ``False`` when it already was. Tampered objects are quarantined and
        :class:`TamperedObjectError` is raised."""
        if segments.is_segment_id(object_id):
            return self._rewrap_segment(object_id)
        with self.keys.sealing():
            try:
                blob, changed = self.rewrap_blob(object_id, self._read(object_id))
            except TamperedObjectError as exc:
                self._quarantine_tampered(object_id, exc)
                raise
            if changed:
                self._write(object_id, (blob,))
        return changed

    def _rewrap_segment(self, object_id: str) -> bool:
        where = segments.locate(self.segments_root, object_id)
        with self.keys.sealing():
            current = self.keys.current()
            try:
                dek, slot, index = self._segment_dek(object_id, segments.read_head(where.path, where.offset)[1])
            except TamperedObjectError as exc:
                self._quarantine_tampered(object_id, exc)
                raise
            if slot.key_id == current.key_id:
                return False
            new = Slot(*self._wrap(object_id, dek), slot.sequence + 1)
            segments.write_slot(where.path, where.offset, 1 - index, new.pack())  # the other slot: crash-safe
        return True

    def exists(self, object_id: str) -> bool:
        """Whether the store holds ``object_id`` (outside quarantine; a deleted record is gone)."""
        if segments.is_segment_id(object_id):
            where = segments.locate(self.segments_root, object_id)
            try:
                return any(not s.empty for s in segments.read_head(where.path, where.offset)[1])
            except StorageError:
                return False
        return self._path(object_id).exists()

    def delete(self, object_id: str) -> None:
        """Remove an object (no error if it is already gone). A segment record is crypto-shredded
        and its space given back (:func:`node.storage.segments.shred`)."""
        if not segments.is_segment_id(object_id):
            self._path(object_id).unlink(missing_ok=True)
        elif self.exists(object_id):
            where = segments.locate(self.segments_root, object_id)
            segments.shred(where.path, where.offset)

    def reclaim_segments(self, object_ids: Iterable[str]) -> int:
        """Remove the finished segments holding ``object_ids`` once every record in them is
        deleted (:func:`node.storage.segments.reclaim`); returns how many were removed."""
        paths = {segments.locate(self.segments_root, o).path for o in object_ids if segments.is_segment_id(o)}
        return segments.reclaim(self.segments_root, paths) if paths else 0

    def _quarantined(self, object_id: str) -> Path:
        """Where :meth:`quarantine` keeps ``object_id``."""
        return self.root / "quarantine" / object_id

    def quarantine(self, object_id: str) -> Path:
        """Move an object, still encrypted, to ``quarantine/`` for an administrator to inspect (a
        segment record is copied there whole, then deleted from its segment)."""
        target = self._quarantined(object_id)
        if segments.is_segment_id(object_id):
            where = segments.locate(self.segments_root, object_id)
            length = segments.read_head(where.path, where.offset)[0]
            with open(where.path, "rb") as fh:
                fh.seek(where.offset)
                target.write_bytes(fh.read(segments.RECORD_HEAD + length))
            self.delete(object_id)
            return target
        os.replace(self._path(object_id), target)
        return target
