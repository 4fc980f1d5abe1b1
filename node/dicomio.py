"""Encoding and decoding of PS3.10 files held in memory (pydicom), shared by every stage."""

from __future__ import annotations

import io

from pydicom import Dataset, config, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import dcmwrite

from node.errors import InvalidInstanceError


def configure_pydicom() -> None:
    """Process-wide pydicom settings of the node.

    Value validation on read and write is off: pydicom's validation warnings quote the offending
    value (a patient name, an ID) and would put PHI into logs; ainode checks what it relies on
    itself. It also saves about a tenth of the decoding time.
    """
    config.settings.reading_validation_mode = config.IGNORE
    config.settings.writing_validation_mode = config.IGNORE


def encode(ds: Dataset) -> bytes:
    """Encode a data set as a PS3.10 file (preamble, file meta, data set)."""
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def decode(data: bytes, *, stop_before_pixels: bool = False) -> Dataset:
    """Decode a PS3.10 file held in memory.

    Raises
    ------
    InvalidInstanceError
        The bytes are not a readable DICOM file.
    """
    try:
        return dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, ValueError) as exc:
        raise InvalidInstanceError(f"not a readable DICOM file: {exc}") from None
