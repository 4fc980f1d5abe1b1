"""Where an incoming data set goes while its P-DATA fragments arrive: memory bounded per data set.

pynetdicom collects each DIMSE message's data set in a ``BytesIO``. ainode gives every message
received on its associations a :class:`DataSetBuffer` instead (:class:`BufferedDimse`): the
first :data:`MEMORY_BYTES` stay in memory (every ordinary image), the rest goes to an encrypted
spool (:class:`node.storage.spool.Spool`), and beyond ``node.max_dataset_bytes`` nothing more is
kept at all — the C-STORE is then refused (0xC000, audited) once the sender has finished, without
the node having held the data set. A receiving process therefore grows by at most
:data:`MEMORY_BYTES` (plus a fragment) per association, whatever the data set's size.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage

from node.errors import AinodeError, DataSetTooLargeError

logger = logging.getLogger(__name__)

MEMORY_BYTES = 16 * 2**20
"""What of a data set is kept in memory; the rest is spooled (encrypted) to disk."""


class SpoolLike(Protocol):
    """What :class:`DataSetBuffer` needs of a spool (:class:`node.storage.spool.Spool`)."""

    size: int

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def chunks(self) -> Iterator[bytes]: ...

    def close(self) -> None: ...


class DataSetBuffer(io.BytesIO):
    """One incoming data set (see the module docstring).

    Parameters
    ----------
    max_bytes
        Larger data sets are not kept: :meth:`check` then raises.
    spool
        Makes the spool for the part beyond :data:`MEMORY_BYTES` (none: such a data set is refused
        as too large).
    """

    def __init__(self, max_bytes: int, spool: Callable[[], SpoolLike] | None) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.received = 0
        self._new_spool = spool
        self.spool: SpoolLike | None = None
        self.problem: AinodeError | None = None

    def write(self, data: Any) -> int:
        """Keep a fragment (pynetdicom's DIMSE layer calls this as fragments arrive)."""
        n = len(data)
        self.received += n
        if self.problem is not None:
            return n
        try:
            if self.received > self.max_bytes:
                raise DataSetTooLargeError(
                    f"the data set is over node.max_dataset_bytes ({self.max_bytes // 2**20} MiB); not kept"
                )
            if self.spool is None and self.received <= MEMORY_BYTES:
                return super().write(data)
            if self.spool is None:
                if self._new_spool is None:
                    raise DataSetTooLargeError(
                        f"the data set is over {MEMORY_BYTES // 2**20} MiB and cannot be spooled"
                    )
                self.spool = self._new_spool()
            self.spool.write(data)
        except AinodeError as exc:  # keep nothing more; the C-STORE handler answers with it
            self.problem = exc
            self.discard()
        return n

    def check(self) -> None:
        """Raise what went wrong while the data set arrived (too large, spool failed), if anything."""
        if self.problem is not None:
            raise self.problem

    @property
    def spooled(self) -> bool:
        """Whether part of the data set is in the spool (then use :meth:`parts`, not ``getvalue``)."""
        return self.spool is not None

    def parts(self) -> Iterator[bytes]:
        """The whole data set, part by part: the part in memory, then the spool's chunks."""
        yield self.getvalue()
        if self.spool is not None:
            yield from self.spool.chunks()

    def discard(self) -> None:
        """Forget what was kept (memory and spool)."""
        self.seek(0)
        self.truncate(0)
        if self.spool is not None:
            self.spool.close()


class BufferedDimse(DIMSEServiceProvider):
    """pynetdicom's DIMSE service provider, collecting each incoming data set in a
    :class:`DataSetBuffer` made by ``new_buffer``."""

    def __init__(self, assoc: Any, new_buffer: Callable[[], DataSetBuffer]) -> None:
        super().__init__(assoc)
        self._new_buffer = new_buffer

    def receive_primitive(self, primitive: Any) -> None:
        if self.message is None:
            self.message = DIMSEMessage()
            self.message.data_set = self._new_buffer()
        super().receive_primitive(primitive)
