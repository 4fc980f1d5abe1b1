"""Logging as JSON lines. Context travels in ``extra=`` (study key, job id): never names or IDs.

pynetdicom logs identifiers (UIDs, AE titles, whole PDUs) at INFO and DEBUG, so its loggers are
held at WARNING.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from typing import Any, TextIO

_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _log_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: TextIO | None = None,
    line: str | None = None, **_: Any,
) -> None:  # fmt: skip
    """Log a library warning by category and place only: the text of pydicom's and highdicom's
    warnings quotes data element values (a Patient's Name, a UID), which must not reach a log."""
    logging.getLogger("py.warnings").warning(
        "library warning (text withheld)", extra={"category": category.__name__, "source": f"{filename}:{lineno}"}
    )


def configure(level: str = "INFO") -> None:
    """Send every log record to standard error as JSON lines; library warnings are logged without
    their text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.showwarning = _log_warning
