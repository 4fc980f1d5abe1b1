"""Writes a benchmark's JSON report: figures plus the machine and date they were measured on."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def write_report(out: Path, benchmark: str, **content: Any) -> None:
    """Write ``content`` as ``out`` (JSON), with the benchmark's name, machine and date."""
    report = {
        "benchmark": benchmark,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **content,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


def status_mb(pid: int | str, field: str) -> float | None:
    """A memory figure of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``, ...) in MB; ``pid`` may be
    ``"self"``. ``None`` when the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None
