"""A job's de-identified series as one stored object: its instances' PS3.10 encodings framed one
after the other (:func:`series_frames`), written in the background while the next stage runs on
the series in memory (:class:`SeriesWrite`), and read back (:func:`unframe_series`).
"""

from __future__ import annotations

import pickle
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from pydicom import Dataset

from node.dicomio import encode
from node.errors import StorageError

_SERIES_MAGIC = b"AIDSER1\0"
_FRAME = struct.Struct("<Q")


def series_frames(
    datasets: list[Dataset], halfway: Callable[[], None] = lambda: None, framed: Callable[[int], None] = lambda n: None
) -> Iterator[bytes]:
    """The PS3.10 encodings of ``datasets`` framed, part by part: a magic, then per instance its
    length (8 bytes, little endian) and its bytes. ``framed(n)`` is told once the first ``n``
    are out.

    Raises
    ------
    ValueError
        A data set cannot be encoded.
    """
    yield _SERIES_MAGIC
    for number, ds in enumerate(datasets):
        if number == len(datasets) // 2:
            halfway()
        encoded = encode(ds)
        yield _FRAME.pack(len(encoded))
        yield encoded
        framed(number + 1)


class SeriesWrite:
    """The de-identified series of a job, held in memory for the next stages and framed
    (:func:`series_frames`) into the store part by part by a background write that begins once the
    volume is loaded (:meth:`Stages.flush` begins it otherwise): the two would take turns on the
    interpreter. Each instance's pixel data can be dropped as soon as it is framed
    (:meth:`drop_pixel_data`); neither the framed series nor its ciphertext is ever whole in memory.

    Parameters
    ----------
    datasets
        The de-identified instances; only :meth:`drop_pixel_data` changes them.
    object_id
        The stored object the series is written to.
    """

    def __init__(self, datasets: list[Dataset], object_id: str) -> None:
        self.datasets = datasets
        self.object_id = object_id
        self.write: Future[str] | None = None  # once begun
        self._lock = threading.Lock()
        self._framed = 0
        self._drop = False

    def size_hint(self) -> int:
        """About the framed series' size in bytes (its pixel data)."""
        return sum(len(ds.PixelData) for ds in self.datasets if "PixelData" in ds)

    def frames(self, halfway: Callable[[], None] = lambda: None) -> Iterator[bytes]:
        """The framed series (in the writer thread)."""
        return series_frames(self.datasets, halfway, self._done)

    def _done(self, count: int) -> None:
        with self._lock:
            self._framed = count
            if self._drop:
                drop_pixel_data(self.datasets[count - 1])

    def dropping(self) -> bool:
        """Whether the pixel data of framed instances is dropped (:meth:`drop_pixel_data`)."""
        with self._lock:
            return self._drop

    def drop_pixel_data(self) -> None:
        """Drop the pixel data of every instance framed so far and of each one framed from now on."""
        with self._lock:
            self._drop = True
            for ds in self.datasets[: self._framed]:
                drop_pixel_data(ds)


def drop_pixel_data(ds: Dataset) -> None:
    """``ds`` without its Pixel Data (the result build needs only the headers)."""
    if "PixelData" in ds:
        del ds.PixelData


def unframe_series(payload: bytes) -> Iterator[bytes]:
    """The encodings :func:`series_frames` framed (or, from an earlier release, pickled as a list).

    Raises
    ------
    StorageError
        The payload is truncated.
    """
    if not payload.startswith(_SERIES_MAGIC):
        yield from pickle.loads(payload)  # an authenticated object only ainode writes
        return
    view, at = memoryview(payload), len(_SERIES_MAGIC)
    while at < len(view):
        (length,) = _FRAME.unpack_from(view, at)
        at += _FRAME.size
        if at + length > len(view):
            raise StorageError("de-identified series: truncated frame")
        yield bytes(view[at : at + length])
        at += length
