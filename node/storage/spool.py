"""An encrypted spool for one large data set while it arrives (no plaintext PHI touches disk).

A receiving process holds the first part of a data set in memory; beyond that the rest goes to a
:class:`Spool`: an unlinked temporary file in the store's ``tmp/`` folder (it vanishes with the
process, even on ``kill -9``), each written chunk sealed with AES-256-GCM under a key that exists
only in this process's memory, its nonce the chunk's number. :meth:`Spool.chunks` gives the
plaintext back chunk by chunk, so that the instance can be sealed into its segment record without
ever being whole in memory (:meth:`node.storage.store.ObjectStore.append_stream`).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from node.errors import StorageError

_LENGTH = struct.Struct("<I")
_TAG = 16
_CHECK_EVERY = 64 * 2**20


class Spool:
    """Write-once, read-back encrypted spool of one data set (see the module docstring).

    Parameters
    ----------
    folder
        Where the (unlinked) file is made: the store's ``tmp/``.
    check_space
        Raises :class:`~node.errors.OutOfResourcesError` when writing that many bytes would pass
        the disk watermark (:meth:`node.storage.store.ObjectStore.check_space`).
    """

    def __init__(self, folder: Path, check_space: Callable[[int], None] = lambda _n: None) -> None:
        self._fd = os.open(folder, os.O_RDWR | os.O_TMPFILE | os.O_EXCL, 0o600)
        self._aead = AESGCM(AESGCM.generate_key(bit_length=256))
        self._count = 0
        self.size = 0
        self.check_space = check_space
        self._checked = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``, sealed; :class:`~node.errors.OutOfResourcesError` once the disk would
        pass the store's watermark (looked at every 64 MiB), :class:`~node.errors.StorageError`
        when the write fails."""
        if self.size - self._checked > _CHECK_EVERY:  # look at the disk every 64 MiB
            self._checked = self.size
            self.check_space(_CHECK_EVERY)
        sealed = self._aead.encrypt(self._count.to_bytes(12, "little"), bytes(data), None)
        self._count += 1
        try:
            os.write(self._fd, _LENGTH.pack(len(sealed)) + sealed)
        except OSError as exc:
            raise StorageError(f"spool write failed: {exc.strerror}") from None
        self.size += len(data)

    def chunks(self) -> Iterator[bytes]:
        """The plaintext back, chunk by chunk as written.

        Raises
        ------
        StorageError
            The spool cannot be read or fails authentication.
        """
        offset, number = 0, 0
        while number < self._count:
            head = os.pread(self._fd, _LENGTH.size, offset)
            (length,) = _LENGTH.unpack(head)
            sealed = os.pread(self._fd, length, offset + _LENGTH.size)
            try:
                yield self._aead.decrypt(number.to_bytes(12, "little"), sealed, None)
            except InvalidTag:
                raise StorageError("spool: a chunk failed authentication") from None
            offset += _LENGTH.size + length
            number += 1

    def close(self) -> None:
        """Forget the spool (its file had no name; closing it frees the disk)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
