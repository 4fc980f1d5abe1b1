"""Dry run of the routing rules on files, folders or a DICOMDIR (``ainode route test``).

Series are grouped into studies and decided by the router itself (:func:`route_study`); for each
series it prints every route in order with the router's verdict, every test of its condition with
PASS/FAIL, and what would run and where results would go. Nothing is sent, and no attribute
value is printed unless asked for (``show_values``): tag names and verdicts are not PHI.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.fileset import FileSet

from node.conditions import evaluate, explain_tree
from node.routing.router import Verdict, route_study
from node.settings.config import DicomDestination, DicomwebDestination, Settings
from node.settings.routes import Route


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


def _by_study(found: list[tuple[Dataset, int]]) -> dict[str, dict[str, tuple[Dataset, int]]]:
    """Series grouped by Study Instance UID (the unit the router decides on), keyed by series UID."""
    studies: dict[str, dict[str, tuple[Dataset, int]]] = {}
    for n, (ds, count) in enumerate(found):
        study = studies.setdefault(str(ds.get("StudyInstanceUID", "")), {})
        study[str(ds.get("SeriesInstanceUID", n))] = (ds, count)
    return studies


def dry_run(settings: Settings, paths: Sequence[Path], calling_ae_title: str, show_values: bool = False) -> str:
    """The explanation text for every series found under ``paths``: the router's own decision
    (:func:`node.routing.router.route_study`, per study), with each condition's tests explained."""
    return explain(settings, series_headers(paths), calling_ae_title, show_values)


def explain(
    settings: Settings, found: list[tuple[Dataset, int]], calling_ae_title: str, show_values: bool = False
) -> str:
    """The explanation text for series given as (one header, number of instances) pairs (files on
    disk, an upload held in memory, or series the node has stored)."""
    studies = _by_study(found)
    lines = [
        f"{len(found)} series in {len(studies)} study(ies); routing mode {settings.routing.mode}; "
        f"calling AE title {calling_ae_title}"
    ]
    n = 0
    for series in studies.values():
        decision = route_study(settings, {k: ds for k, (ds, _c) in series.items()}, calling_ae_title,
                               settings.node.ae_title)  # fmt: skip
        for key, (_ds, count) in series.items():
            n += 1
            header = decision.headers[key]
            lines.append(f"\nseries {n} of {len(found)}: {count} instance(s)")
            if show_values:
                lines += [f"  {k} = {v!r}" for k, v in sorted(header.items())]
            for route, verdict in decision.verdicts[key]:
                lines += _explain(settings, route, verdict, header)
            if all(v in (Verdict.NO_MATCH, Verdict.NOT_OFFERED) for _r, v in decision.verdicts[key]):
                lines.append("  => no route matched: the series is stored and nothing runs")
    return "\n".join(lines)


def _explain(settings: Settings, route: Route, verdict: Verdict, header: dict[str, Any]) -> list[str]:
    if verdict == Verdict.NOT_OFFERED:
        return [f"  route {route.name}: not offered (first_match: an earlier route took the series)"]
    tests = [f"    {line}" for line in explain_tree(route.match, header)]
    if verdict == Verdict.NO_MATCH:
        return [f"  route {route.name}: NO MATCH (decided by {evaluate(route.match, header).decided_by})", *tests]
    how = "" if verdict == Verdict.MATCH else "; another series of the study matched, the route takes them all"
    lines = [f"  route {route.name}: MATCH ({route.level} level, priority {route.priority}{how})", *tests]
    runs = ", ".join(a.name for a in route.algorithms) or "no algorithm"
    where = []
    for name in route.destinations:
        dest = settings.destinations[name]
        kind = (f"C-STORE to {dest.peer}" if isinstance(dest, DicomDestination)
                else "STOW-RS" if isinstance(dest, DicomwebDestination) else "folder")  # fmt: skip
        where.append(f"{name} ({kind})")
    lines.append(f"    -> runs {runs}; results to {', '.join(where) or 'nowhere'}")
    quiet = route.completion.quiet_period_s
    lines.append(f"    -> de-identification profile {route.deidentification!r}, quiet period {quiet:g} s")
    return lines
