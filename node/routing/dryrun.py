"""Dry run of the routing rules on files, folders or a DICOMDIR (``ainode route test``).

For each series it prints every route in order, whether it matched, every test of its condition
with PASS/FAIL, and what would run and where results would go. Nothing is sent, and no attribute
value is printed unless asked for (``show_values``): tag names and verdicts are not PHI.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.fileset import FileSet

from node.routing.rules import evaluate, explain_tree, header_of, keywords_of
from node.settings.models import DicomDestination, Settings


def _paths(paths: Sequence[Path]) -> Iterable[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.name != "DICOMDIR")
        elif path.name == "DICOMDIR":
            yield from (Path(instance.path) for instance in FileSet(dcmread(path)))
        else:
            yield path


def series_headers(paths: Sequence[Path]) -> list[tuple[Dataset, int]]:
    """One header per series (by Series Instance UID) and its number of instances."""
    series: dict[str, tuple[Dataset, int]] = {}
    for path in _paths(paths):
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue
        uid = str(ds.get("SeriesInstanceUID", path))
        first, count = series.get(uid, (ds, 0))
        series[uid] = (first, count + 1)
    return list(series.values())


def dry_run(settings: Settings, paths: Sequence[Path], calling_ae_title: str, show_values: bool = False) -> str:
    """The explanation text for every series found under ``paths``."""
    keywords = set().union(*(keywords_of(r.match) for r in settings.routes)) if settings.routes else set()
    found = series_headers(paths)
    lines = [f"{len(found)} series; routing mode {settings.routing.mode}; calling AE title {calling_ae_title}"]
    for n, (ds, count) in enumerate(found, start=1):
        header = header_of(ds, keywords, calling_ae_title, settings.node.ae_title)
        lines.append(f"\nseries {n} of {len(found)}: {count} instance(s)")
        if show_values:
            lines += [f"  {k} = {v!r}" for k, v in sorted(header.items())]
        taken = False
        for route in settings.routes:
            if taken:
                lines.append(f"  route {route.name}: not offered (first_match: an earlier route took the series)")
                continue
            decision = evaluate(route.match, header)
            if not decision.matched:
                lines.append(f"  route {route.name}: NO MATCH (decided by {decision.decided_by})")
                lines += [f"    {line}" for line in explain_tree(route.match, header)]
                continue
            lines.append(f"  route {route.name}: MATCH ({route.level} level, priority {route.priority})")
            lines += [f"    {line}" for line in explain_tree(route.match, header)]
            runs = ", ".join(a.name for a in route.algorithms) or "no algorithm"
            where = []
            for name in route.destinations:
                dest = settings.destinations[name]
                where.append(
                    f"{name} (C-STORE to {dest.peer})" if isinstance(dest, DicomDestination) else f"{name} (folder)"
                )
            lines.append(f"    -> runs {runs}; results to {', '.join(where) or 'nowhere'}")
            quiet = route.completion.quiet_period_s
            lines.append(f"    -> de-identification profile {route.deidentification!r}, quiet period {quiet:g} s")
            taken = settings.routing.mode == "first_match"
        if not any(evaluate(r.match, header).matched for r in settings.routes):
            lines.append("  => no route matched: the series is stored and nothing runs")
    return "\n".join(lines)
