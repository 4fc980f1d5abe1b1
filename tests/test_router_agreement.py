"""Issue 11 (defect 5): the dry run (``ainode route test``) says exactly what the router does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from node.routing.dryrun import dry_run, series_headers
from node.routing.router import plan_routes
from node.settings import load_settings

from .peers import CT_SERIES, CT_SOFT_SERIES, DATA

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "ainode.example.yaml"
STUDIES = [
    DATA / "ct_chest_lungpetctdx_A0001",
    DATA / "mr_brain_siemens_t1sag_HFS",
    DATA / "mr_enhanced_multiframe",
    DATA / "deid_fake_phi",
    DATA / "ct_chest_derived_transcoded_A0001" / "explicit_le",
]


def _dry_run_matches(text: str) -> dict[int, set[str]]:
    """Series number -> the routes the dry run says take it."""
    out: dict[int, set[str]] = {}
    current = 0
    for line in text.splitlines():
        if found := re.match(r"series (\d+) of \d+:", line):
            current = int(found[1])
            out[current] = set()
        elif found := re.match(r"  route (\S+): MATCH", line):
            out[current].add(found[1])
    return out


def _router_matches(settings, paths: list[Path], calling: str) -> dict[int, set[str]]:
    """The same, from the router, numbering series as the dry run does (grouped by study)."""
    found = series_headers(paths)
    studies: dict[str, list] = {}
    for ds, _count in found:
        studies.setdefault(str(ds.get("StudyInstanceUID", "")), []).append(ds)
    out: dict[int, set[str]] = {}
    n = 0
    for datasets in studies.values():
        keys = [str(ds.SeriesInstanceUID) for ds in datasets]
        plans = plan_routes(settings, dict(zip(keys, datasets, strict=True)), calling, settings.node.ae_title)
        for key in keys:
            n += 1
            out[n] = {p.route.name for p in plans if key in p.series_keys}
    return out


@pytest.mark.parametrize("calling", ["PACS", "ER_CT", "RESEARCH", "STORESCU"])
def test_dry_run_agrees_with_the_router_on_every_example_route(calling):
    settings = load_settings(EXAMPLE)
    exercised: set[str] = set()
    for study in STUDIES:
        text = dry_run(settings, [study], calling)
        expected = _router_matches(settings, [study], calling)
        assert _dry_run_matches(text) == expected, f"{study.name} from {calling}:\n{text}"
        exercised |= set().union(*expected.values())
    assert exercised  # some route of the example config takes some shared series from every caller


def test_every_example_route_is_exercised_by_some_caller():
    settings = load_settings(EXAMPLE)
    taken = set()
    for calling in ("PACS", "ER_CT", "RESEARCH", "STORESCU"):
        for study in STUDIES:
            taken |= set().union(*_router_matches(settings, [study], calling).values())
    assert taken == {r.name for r in settings.routes}


def test_a_study_level_route_takes_both_series_in_router_and_dry_run(tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text(
        "keys: {provider: env}\n"
        "routes:\n"
        "  - name: whole-study\n"
        "    level: study\n"
        "    match: {ConvolutionKernel: L}\n"  # only the lung-kernel series
        "  - name: leftovers\n"
        "    match: {Modality: CT}\n"
    )
    settings = load_settings(config)
    paths = [CT_SERIES, CT_SOFT_SERIES]
    text = dry_run(settings, paths, "STORESCU")
    assert (
        _dry_run_matches(text)
        == _router_matches(settings, paths, "STORESCU")
        == {
            1: {"whole-study"},
            2: {"whole-study"},
        }
    )
    assert "another series of the study matched, the route takes them all" in text
    assert text.count("route leftovers: not offered") == 2
