"""The one guard for paths the node writes or deletes below a root (a destination folder, an
output directory, the data directory).

No path is built from a received value (a UID, a modality, a file name) without passing through
:func:`path_under`, which refuses anything that would leave the root: absolute parts, ``..``,
separators inside a part, NUL, and symbolic links that lead out.
"""

from __future__ import annotations

import os
from pathlib import Path

from node.errors import InvalidInstanceError

_FORBIDDEN = ("/", "\\", "\0")


def path_under(root: Path, *parts: str) -> Path:
    """``root / parts[0] / parts[1] ...``, guaranteed to stay under ``root``.

    Parameters
    ----------
    root
        The directory everything must stay under (it need not exist yet).
    parts
        Single path components (no separators), e.g. a checked Study Instance UID and a file name.

    Returns
    -------
    Path
        The joined path (not resolved, so links under ``root`` keep working).

    Raises
    ------
    InvalidInstanceError
        A part is empty, ``.`` or ``..``, holds a separator or NUL, or the joined path resolves
        outside ``root`` (through a symbolic link).
    """
    path = root
    for part in parts:
        text = str(part)
        if text in ("", ".", "..") or any(c in text for c in _FORBIDDEN):
            raise InvalidInstanceError("a path component derived from received data is not a plain name")
        path = path / text
    base = os.path.realpath(root)
    if os.path.commonpath([base, os.path.realpath(path)]) != base:
        raise InvalidInstanceError("a path derived from received data leads outside its root")
    return path
