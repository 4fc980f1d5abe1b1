"""Append-only encrypted segment files: where received instances are stored durably, one
``fdatasync`` each, without creating a file or syncing a directory per instance.

Each receiving process appends to its own segment (``store/segments/<writer>-<n>.seg``, a new one
every :data:`SEGMENT_BYTES`); concurrent associations of the process share one ``fdatasync``
(group commit) and each answers Success only once its record is durable. A record::

    b"AISG" | body length (u64) | slot A (80) | slot B (80) | body: nonce (12) | ciphertext + tag

A slot is ``key id (16 ASCII hex) | wrap nonce (12) | wrapped data key (32 + 16) | sequence (u32)``:
the record's data key wrapped by a master key, as in :mod:`node.storage.store`. Re-wrapping (key
rotation) writes the slot not in use with the next sequence number, so a crash leaves at least
one slot intact; the slot with the highest sequence that authenticates is used. Deleting a record
zeroes both slots: its data key is gone and the ciphertext can never be decrypted again
(crypto-shredding); its body's blocks are then punched out of the file, so a purge gives the disk
back at once, even inside the segment a writer still appends to (:func:`shred`); a segment whose
records are all deleted is removed by :func:`reclaim`.

The object id names the record's place: ``g<writer 12 hex><segment 4 hex><offset 12 hex>``, and is
the associated data of both encryptions, so a record cannot be moved or swapped. The writer holds
an exclusive ``flock`` on its open segment; a segment nobody holds and that carries no ``.done``
mark was left by a process that stopped before its index rows were written: reconciliation
indexes its records (:func:`unfinished`).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import secrets
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from node.errors import StorageError

MAGIC = b"AISG"
SLOT = struct.Struct("<16s12s48sI")
HEAD = struct.Struct("<4sQ")
RECORD_HEAD = HEAD.size + 2 * SLOT.size
PREFIX = "g"
SEGMENT_BYTES = 512 * 2**20
"""A writer starts a new segment once its current one is this large."""
ZERO_SLOTS = bytes(2 * SLOT.size)


@dataclass(frozen=True)
class Location:
    """Where a segment record lives."""

    path: Path
    offset: int


def is_segment_id(object_id: str) -> bool:
    """Whether ``object_id`` names a segment record (other objects are files of their own)."""
    return len(object_id) == 29 and object_id.startswith(PREFIX)


def segment_id(writer: str, number: int, offset: int) -> str:
    """The object id of the record at ``offset`` of segment ``number`` of ``writer``."""
    return f"{PREFIX}{writer}{number:04x}{offset:012x}"


def locate(root: Path, object_id: str) -> Location:
    """The segment file and offset an object id names."""
    writer, number, offset = object_id[1:13], int(object_id[13:17], 16), int(object_id[17:], 16)
    return Location(root / f"{writer}-{number:04x}.seg", offset)


def segment_prefix(path: Path) -> str:
    """The object id prefix of every record of the segment at ``path``."""
    writer, _, number = path.stem.partition("-")
    return f"{PREFIX}{writer}{int(number, 16):04x}"


@dataclass(frozen=True)
class Slot:
    """One key-wrap slot of a record."""

    key_id: str
    wrap_nonce: bytes
    wrapped: bytes
    sequence: int

    @classmethod
    def unpack(cls, raw: bytes) -> Slot:
        key_id, nonce, wrapped, sequence = SLOT.unpack(raw)
        return cls(key_id.decode("ascii", "replace"), nonce, wrapped, sequence)

    def pack(self) -> bytes:
        return SLOT.pack(self.key_id.encode("ascii"), self.wrap_nonce, self.wrapped, self.sequence)

    @property
    def empty(self) -> bool:
        return self.sequence == 0


def _unpack_head(raw: bytes) -> tuple[int, tuple[Slot, Slot]]:
    """The body length and the two slots of a record head (:data:`RECORD_HEAD` bytes)."""
    _magic, length = HEAD.unpack_from(raw)
    return length, (Slot.unpack(raw[HEAD.size : HEAD.size + SLOT.size]), Slot.unpack(raw[HEAD.size + SLOT.size :]))


def read_head(path: Path, offset: int) -> tuple[int, tuple[Slot, Slot]]:
    """A record's body length and its two slots.

    Raises
    ------
    StorageError
        No record starts there (truncated segment, wrong offset).
    """
    length, slots, _body = read_record(path, offset, body=False)
    return length, slots


def read_record(path: Path, offset: int, body: bool = True) -> tuple[int, tuple[Slot, Slot], bytes]:
    """A record's body length, its two slots and (``body``) its body: nonce, ciphertext and tag;
    one open of the segment.

    Raises
    ------
    StorageError
        No record starts there (truncated segment, wrong offset), or its body is truncated.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            raw = fh.read(RECORD_HEAD)
            if len(raw) < RECORD_HEAD or raw[:4] != MAGIC:
                raise StorageError(f"segment {path.name}: no record at offset {offset}")
            length, slots = _unpack_head(raw)
            data = fh.read(length) if body else b""
    except OSError as exc:
        raise StorageError(f"segment {path.name}: cannot read: {exc.strerror}") from None
    if body and len(data) != length:
        raise StorageError(f"segment {path.name}: record at {offset} is truncated")
    return length, slots, data


def write_slot(path: Path, offset: int, index: int, slot: bytes) -> None:
    """Overwrite slot ``index`` (0 or 1; ``slot`` of :data:`SLOT` size, or both slots' zeros at 0)
    of the record at ``offset`` and make it durable."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, slot, offset + HEAD.size + index * SLOT.size)
        os.fdatasync(fd)
    finally:
        os.close(fd)


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


@cache
def _fallocate() -> Callable[..., int] | None:
    """libc's ``fallocate(2)`` (Linux), or ``None`` where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


def shred(path: Path, offset: int) -> bool:
    """Delete the record at ``offset``: zero both slots (its data key is gone: crypto-shredding),
    then give its body's blocks back to the filesystem (``fallocate(FALLOC_FL_PUNCH_HOLE)``; the
    file keeps its size, so the records after it keep their offsets), durably. Returns whether
    the space was given back (``False`` on a filesystem without hole punching: the bytes are
    freed when the whole segment is, see :func:`reclaim`).

    Raises
    ------
    StorageError
        No record starts there, or the segment cannot be written.
    """
    length = read_head(path, offset)[0]
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, ZERO_SLOTS, offset + HEAD.size)
        fallocate = _fallocate()
        punched = fallocate is not None and fallocate(
            fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset + RECORD_HEAD, length
        ) == 0  # fmt: skip
        os.fdatasync(fd)
    except OSError as exc:
        raise StorageError(f"segment {path.name}: cannot delete a record: {exc.strerror}") from None
    finally:
        os.close(fd)
    return punched


@dataclass(frozen=True)
class Space:
    """The disk space of a store's segments (bytes)."""

    segments: int
    allocated: int
    """Blocks the filesystem holds for them."""
    live: int
    """Records not deleted, heads included."""

    @property
    def reclaimable(self) -> int:
        """Bytes of deleted records the filesystem still holds (given back when their segment is removed)."""
        return max(0, self.allocated - self.live)


def space(root: Path) -> Space:
    """How much disk the segments under ``root`` take, and how much of it deleted records hold."""
    count = allocated = live = 0
    for path in sorted(root.glob("*.seg")) if root.exists() else []:
        try:
            allocated += path.stat().st_blocks * 512
            count += 1
            live += sum(RECORD_HEAD + (0 if a.empty and b.empty else n) for _o, n, (a, b) in records(path))
        except FileNotFoundError:
            continue  # removed meanwhile
    return Space(count, allocated, live)


def records(path: Path) -> Iterator[tuple[int, int, tuple[Slot, Slot]]]:
    """``(offset, body length, slots)`` of every whole record of a segment, in order; a torn
    record at the end (a process killed while appending, never acknowledged) ends the scan."""
    size = path.stat().st_size
    offset = 0
    with open(path, "rb") as fh:
        while offset + RECORD_HEAD <= size:
            fh.seek(offset)
            raw = fh.read(RECORD_HEAD)
            if raw[:4] != MAGIC:
                return
            length, slots = _unpack_head(raw)
            if offset + RECORD_HEAD + length > size:
                return
            yield offset, length, slots
            offset += RECORD_HEAD + length


class SegmentWriter:
    """One process's appends (see the module docstring); thread-safe.

    Parameters
    ----------
    root
        The segments folder (created with mode 0700).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.writer = secrets.token_hex(6)
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._number = -1
        self._fds: dict[int, int] = {}  # segment number -> descriptor: the one appended to
        self._numbers: list[int] = []  # every segment this writer created
        self._sizes: dict[int, int] = {}  # bytes appended (written whole) per segment
        self._synced: dict[int, int] = {}  # bytes made durable per segment

    def path(self, number: int) -> Path:
        """The file of this writer's segment ``number``."""
        return self.root / f"{self.writer}-{number:04x}.seg"

    @property
    def paths(self) -> list[Path]:
        """The segments this writer created."""
        return [self.path(n) for n in self._numbers]

    def _rotate(self) -> None:
        """Start the next segment: created, locked while this process writes it, its name durable.
        The full one is made durable and closed (its lock released): a long-running receiver holds
        one descriptor, not one per segment it ever wrote."""
        previous, number = self._number, self._number + 1
        fd = os.open(self.path(number), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._fds[number], self._sizes[number], self._number = fd, 0, number
        self._numbers.append(number)
        if previous in self._fds:
            with self._sync_lock:
                try:
                    os.fdatasync(self._fds[previous])
                except OSError as exc:
                    raise StorageError(f"segment sync failed: {exc.strerror}") from None
                finally:
                    os.close(self._fds.pop(previous))
                self._synced[previous] = self._sizes[previous]

    def append(self, length: int, seal: Callable[[str], tuple[bytes, Iterable[bytes]]]) -> str:
        """Append one record whose body is ``length`` bytes; returns its object id once durable.

        ``seal(object_id)`` returns the record's first slot and its body, encrypted for that id:
        a tuple of bytes (written at once, with the head, never joined), or any other iterable of
        parts, written as they come (a large data set). If the parts fail or do not add
        up to ``length``, the segment is cut back to where the record began.

        Raises
        ------
        StorageError
            The write or the sync failed, or the body's length differs from ``length``.
        """
        with self._lock:
            size = self._sizes.get(self._number, 0)
            if self._number not in self._fds or (size > 0 and size + RECORD_HEAD + length > SEGMENT_BYTES):
                self._rotate()
            number = self._number
            start = self._sizes[number]
            object_id = segment_id(self.writer, number, start)
            slot, body = seal(object_id)
            head = b"".join((HEAD.pack(MAGIC, length), slot, bytes(SLOT.size)))
            fd, written = self._fds[number], 0
            try:
                if isinstance(body, tuple):  # one write, no copy: an ordinary instance
                    written, whole, body = sum(map(len, body)), body, ()
                    if written == length:
                        _write_all(fd, head, *whole)
                else:
                    _write_all(fd, head)
                for part in body:
                    written += len(part)
                    if written > length:
                        break
                    _write_all(fd, part)
                if written != length:
                    raise StorageError("segment record: the body's length differs from the one announced")
            except OSError as exc:
                os.ftruncate(fd, start)
                raise StorageError(f"segment append failed: {exc.strerror}") from None
            except BaseException:
                os.ftruncate(fd, start)  # no torn record between whole ones
                raise
            self._sizes[number] += RECORD_HEAD + length
            end = self._sizes[number]
        self._sync(number, end)
        return object_id

    def _sync(self, number: int, end: int) -> None:
        """Make segment ``number`` durable up to ``end``; one ``fdatasync`` covers every record
        written before it (group commit across the process's associations)."""
        with self._sync_lock:
            if self._synced.get(number, 0) >= end:
                return
            target = self._sizes[number]  # everything written so far is covered by this sync
            try:
                os.fdatasync(self._fds[number])
            except OSError as exc:
                raise StorageError(f"segment sync failed: {exc.strerror}") from None
            self._synced[number] = target

    def close(self) -> list[Path]:
        """Close every segment of this writer (their records are durable); returns their paths."""
        with self._lock, self._sync_lock:
            paths = self.paths
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()  # a later append starts the next segment
            return paths


def _write_all(fd: int, *parts: bytes | bytearray) -> None:
    """Write ``parts`` one after the other (one ``writev`` while the kernel takes them whole)."""
    views = [memoryview(part) for part in parts if part]
    while views:
        done = os.writev(fd, views)
        while views and done >= len(views[0]):
            done -= len(views.pop(0))
        if views:
            views[0] = views[0][done:]


def mark_done(path: Path) -> None:
    """Mark a segment whose records are all in the index (its writer stopped cleanly)."""
    path.with_suffix(".done").touch()


def unfinished(root: Path) -> list[Path]:
    """Segments no live process writes to that carry no ``.done`` mark: their writer stopped
    before its index rows were all written (killed), so reconciliation must index them."""
    out = []
    for path in sorted(root.glob("*.seg")) if root.exists() else []:
        if path.with_suffix(".done").exists() or held(path):
            continue
        out.append(path)
    return out


def held(path: Path) -> bool:
    """Whether a live process holds the segment open for appending."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock
    return False


def reclaim(root: Path, paths: Iterable[Path] | None = None) -> int:
    """Remove the segments (``paths``, by default every one under ``root``) that are finished
    (``.done``: nobody appends to them and the index holds their records) and whose records are
    all deleted; returns how many. A segment being created has no ``.done`` mark and is never
    removed."""
    removed = 0
    candidates = sorted(set(paths)) if paths is not None else sorted(root.glob("*.seg")) if root.exists() else []
    for path in candidates:
        if not path.with_suffix(".done").exists() or held(path):
            continue
        if any(not (a.empty and b.empty) for _o, _l, (a, b) in records(path)):
            continue
        path.unlink(missing_ok=True)
        path.with_suffix(".done").unlink(missing_ok=True)
        removed += 1
    if removed:
        dir_fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return removed
