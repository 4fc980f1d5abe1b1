"""Issue 13, in a radiologist's viewer: real OHIF 3.13.2 in headless Chromium over Orthanc's DICOMweb
shows the SEG and the planar SR of what ainode computed (lung-ct-density, and a declared MONAI model
of another structure), with every measurement value and the outline on its slice.

Screenshots are kept in ``test-artefacts/viewer/`` (``$AINODE_TEST_ARTEFACTS``).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image

from lung_ct_density import LungCtDensity
from node.jobs.volume import load_volume
from node.results.air import has_air_equipment

from .models import SPLEEN, seeded_bundle, spleen_declaration
from .peers import (
    CT_MIDDLE,
    CT_SERIES,
    LUNG_ROUTE,
    ROOT,
    dciodvfy,
    free_port,
    pacs_node_config,
    series_files,
    start_orthanc,
    wait_until,
)
from .viewer import CHROMIUM, DICOMWEB_PLUGIN, serve_ohif, viewer_available

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARTEFACTS = Path(os.environ.get("AINODE_TEST_ARTEFACTS", ROOT / "test-artefacts")) / "viewer"
THUMBNAIL = '[data-cy="study-browser-thumbnail-no-image"]'
ALL_OBJECTS = ["SEG", "SR", "GSPS", "SC"]
Group = tuple[str, list[str], str]
"""A planar SR group as OHIF shows it: label, values ("Volume: 2328.90 ml"), Instance Number of its slice."""


@pytest.fixture
def viewer_ready() -> None:
    """The viewer's parts are installed (CI installs them: .ci/run); missing ones fail the test."""
    missing = viewer_available()
    if missing:
        pytest.fail(f"the OHIF viewer test cannot run: {missing}")


def _analysed_in_orthanc(tmp_path: Path, start_node: Any, routes: list[dict[str, Any]], models: dict[str, Any],
                         files: list[Path] | None = None) -> tuple[Any, str, list[dict[str, Any]]]:  # fmt: skip
    """Orthanc (with DICOMweb) holds the shared CT (or ``files`` of it), forwards it to ainode, and
    gets the results back; returns Orthanc, the Study Instance UID and the study's series."""
    node_port = free_port()
    pacs = start_orthanc(tmp_path / "orthanc", "AINODE", node_port, plugins=[DICOMWEB_PLUGIN])
    config_path, config = pacs_node_config(tmp_path, pacs, node_port, routes, {"objects": ALL_OBJECTS}, models)
    start_node(config_path, config)
    for path in series_files(CT_SERIES) if files is None else files:
        pacs.rest("POST", "/instances", raw=path.read_bytes())
    (study_id,) = pacs.rest("GET", "/studies")
    pacs.rest("POST", "/modalities/ainode/store", {"Resources": [study_id], "Synchronous": True})

    def results() -> list[dict[str, Any]] | None:
        series = pacs.rest("GET", f"/studies/{study_id}/series")
        return series if len(series) == 5 else None  # CT + SEG, SR, GSPS, SC

    series = wait_until(results, 600, 1.0)
    study_uid = pacs.rest("GET", f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"]
    return pacs, study_uid, series


def _fetch(pacs: Any, series: list[dict[str, Any]], number: str, out: Path) -> pydicom.Dataset:
    (chosen,) = [s for s in series if s["MainDicomTags"].get("SeriesNumber") == number]
    out.write_bytes(pacs.rest("GET", f"/instances/{chosen['Instances'][0]}/file"))
    return pydicom.dcmread(out)


def _groups(sr: pydicom.Dataset, slices: dict[str, pydicom.Dataset]) -> list[Group]:
    """Per measurement group of the planar SR: its label, each value as OHIF prints it ("Volume:
    2328.90 ml", ``Number.toFixed(2)`` and the UCUM code) and the Instance Number of its slice."""
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    out = []
    for group in report.content.get_volumetric_roi_measurement_groups():
        values = [f"{m.name.meaning}: {float(m.value):.2f} {m.unit.value}" for m in group.get_measurements()]
        scoord = next(item for item in group[0].ContentSequence if item.ValueType == "SCOORD")
        image = str(scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        out.append((str(group.tracking_identifier), values, str(slices[image].InstanceNumber)))
    return out


def _outline_pixels(path: Path) -> int:
    """Pixels of OHIF's SR annotation colours (green; yellow when selected) in a screenshot: the CT
    is grey and the viewer's own controls are blue and white."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int((((g > 180) & (r < 120) & (b < 120)) | ((r > 180) & (g > 180) & (b < 100))).sum())


def _screen_text(page: Any) -> str:
    """The page's text and every SVG annotation text box's: a structure as large as the field of view
    (the seeded spleen model's) puts its text box at the viewport's edge, clipped from ``innerText``."""
    return page.inner_text("body") + "\n" + "\n".join(page.locator("svg text").all_text_contents())


def _nudge(page: Any) -> None:
    """Ask OHIF again when nothing of the SR is drawn: one slice on with the mouse wheel over the
    viewport (a new image is rendered, with its annotations), then back by the viewport's arrows
    (to the next measurement: they cycle through the groups; with one group, to it again), or the
    SR once more when its viewport has no arrows yet."""
    page.mouse.move(960, 500)
    page.mouse.wheel(0, 120)
    time.sleep(1)
    arrows = page.locator('[data-cy="viewport-action-arrows-right"] svg')
    if arrows.count():
        arrows.first.click()
    else:
        page.locator(THUMBNAIL).filter(has_text="S:9902").dblclick()


def _open(browser: Any, base: str, study_uid: str, errors: list[str]) -> Any:
    """A page in a new browser context (nothing kept from other pages) with the study in OHIF's
    viewer, its thumbnails listed and the first-visit tour skipped; page errors go to ``errors``."""
    page = browser.new_page(viewport={"width": 1920, "height": 1000})
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    console = ARTEFACTS / "console.log"  # OHIF's own messages, for a failure's artefacts
    page.on("console", lambda m: console.open("a").write(f"{m.type}: {m.text[:500]}\n"))
    page.goto(f"{base}/viewer?StudyInstanceUIDs={study_uid}")
    page.wait_for_selector(THUMBNAIL, timeout=120_000)
    time.sleep(2)
    if page.get_by_text("Skip all").count():
        page.get_by_text("Skip all").first.click()
    return page


def _wait_for_unseen_group(page: Any, groups: list[Group], seen: dict[str, tuple[str, int]], shot: Path
                           ) -> tuple[str, list[Group], str, int]:  # fmt: skip
    """Within 120 s, a group not yet seen with all its values on screen, on its slice, its outline
    drawn (OHIF draws each in turn); returns the screen's text, the groups shown, the Instance Number
    on screen and the outline's pixels in the screenshot ``shot``."""
    start = time.monotonic()
    deadline, nudge, instance, outline = start + 120, start + 20, "?", 0
    text, shown = "", []
    while time.monotonic() < deadline:
        text = _screen_text(page)
        if time.monotonic() > nudge and not any(g[0] not in seen and g[1][0] in text for g in groups):
            nudge = time.monotonic() + 20
            _nudge(page)
        shown = [g for g in groups if g[0] not in seen and all(v in text for v in g[1])]
        match = re.search(r"I:(\d+) \(\d+/\d+\)", text)
        instance = match.group(1) if match else "?"
        if shown and instance == shown[0][2]:
            page.screenshot(path=shot)
            outline = _outline_pixels(shot)
            if outline > 100:
                break
        time.sleep(0.5)
    return text, shown, instance, outline


def _check_in_ohif(orthanc_http_port: int, study_uid: str, segments: list[str], groups: list[Group], name: str) -> None:
    """Open the study in OHIF: the SEG's segment labels in the segmentation panel; the planar SR
    without an error, each group's values on screen, on its slice, with its outline drawn."""
    from playwright.sync_api import sync_playwright

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with serve_ohif(orthanc_http_port) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = _open(browser, base, study_uid, errors)
            # the SEG
            page.locator(THUMBNAIL).filter(has_text="S:9901").dblclick()
            page.get_by_role("button", name="Yes").first.click(timeout=60_000)
            page.locator('[data-cy="panelSegmentation-btn"]').click()
            for label in segments:
                page.get_by_text(label, exact=True).first.wait_for(timeout=60_000)
            page.screenshot(path=ARTEFACTS / f"{name}-seg.png")
            # the planar SR, opened as a radiologist opens it from the study: in a new browser context
            # (OHIF 3.13 keeps viewport state in the browser's storage: the SEG's volume viewport, in
            # which it sometimes draws nothing of an SR), each group in turn (OHIF's arrows step
            # through the measurements)
            page.context.close()
            page = _open(browser, base, study_uid, errors)
            page.locator(THUMBNAIL).filter(has_text="S:9902").dblclick()
            seen: dict[str, tuple[str, int]] = {}
            reloaded = False
            step = 0
            while step < len(groups):
                shot = ARTEFACTS / f"{name}-sr-{step + 1}.png"
                text, shown, instance, outline = _wait_for_unseen_group(page, groups, seen, shot)
                if not shown or "Something went wrong" in text:
                    page.screenshot(path=ARTEFACTS / f"{name}-sr-{step + 1}-failed.png")  # for the CI artefacts
                if not shown and not reloaded:  # OHIF never drew it: once more, in a new viewer
                    reloaded = True
                    page.context.close()
                    page = _open(browser, base, study_uid, errors)
                    page.locator(THUMBNAIL).filter(has_text="S:9902").dblclick()
                    continue
                assert "Something went wrong" not in text, text[-2000:]
                assert shown, f"step {step + 1}: no unseen group's values on screen ({sorted(seen)}):\n{text[-2000:]}"
                seen[shown[0][0]] = (instance, outline)
                page.locator('[data-cy="viewport-action-arrows-right"] svg').click()
                time.sleep(1)
                step += 1
        finally:
            browser.close()
    assert errors == []
    assert set(seen) == {g[0] for g in groups}, seen  # every group's values appeared
    for label, _values, instance in groups:
        shown_instance, outline = seen[label]
        assert shown_instance == instance, (label, shown_instance, instance)  # jumped to its slice
        assert outline > 100, (label, outline)  # and drew the outline there


def test_ohif_shows_lung_seg_and_every_planar_sr_value(viewer_ready, tmp_path, start_node):
    pacs, study_uid, series = _analysed_in_orthanc(tmp_path, start_node, [LUNG_ROUTE], {})
    try:
        numbers = [s["MainDicomTags"]["SeriesNumber"] for s in series]
        assert sorted(numbers, key=int) == ["2", "9901", "9902", "9905", "9906"]
        assert numbers.index("9906") > numbers.index("2")  # the key images sort after the CT
        slices = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, series_files(CT_SERIES))}
        original = next(iter(slices.values()))
        for number in ("9901", "9902", "9905", "9906"):  # as the PACS holds them: valid, re-identified, AIR
            path = tmp_path / f"{number}.dcm"
            delivered = _fetch(pacs, series, number, path)
            assert dciodvfy(path)[0] == [], number
            assert (delivered.PatientID, delivered.StudyInstanceUID) == (original.PatientID, original.StudyInstanceUID)
            assert has_air_equipment(delivered, LungCtDensity.spec), number
        sr = _fetch(pacs, series, "9902", tmp_path / "sr.dcm")
        groups = _groups(sr, slices)
        volume, _ = load_volume(list(slices.values()))
        computed = LungCtDensity().run(volume, "cpu").measurements
        for label, values, _instance in groups:  # the SR holds what the algorithm computed
            mine = [f"{m.concept[2]}: {m.value:.2f} {m.unit[0]}" for m in computed if m.segment_label == label]
            assert values == mine
        assert [g[0] for g in groups] == ["Left lung", "Right lung", "Both lungs"]
        _check_in_ohif(pacs.http_port, study_uid, ["Left lung", "Right lung", "Low attenuation area"], groups, "lung")
    finally:
        pacs.stop()


def test_ohif_shows_a_declared_models_other_structure(viewer_ready, tmp_path, start_node):
    # the background favoured a little: the seeded network then finds a scatter of "spleen" voxels
    # (about 0.5 % of the volume, 285 ml) instead of the whole field of view
    bundle = seeded_bundle(SPLEEN, tmp_path / "bundles", favour=(0,), favour_by=0.4)
    route = {
        "name": "spleen",
        "match": {"Modality": "CT"},
        "algorithms": ["spleen"],
        "completion": {"quiet_period_s": 1.0},
    }
    pacs, study_uid, series = _analysed_in_orthanc(  # the middle 32 slices: half the bundle's windows
        tmp_path, start_node, [route], {"spleen": spleen_declaration(bundle)}, series_files(CT_SERIES)[CT_MIDDLE]
    )
    try:
        slices = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, series_files(CT_SERIES))}
        groups = _groups(_fetch(pacs, series, "9902", tmp_path / "sr.dcm"), slices)
        assert [g[0] for g in groups] == ["Spleen"] and len(groups[0][1]) == 3  # volume, mean, median
        _check_in_ohif(pacs.http_port, study_uid, ["Spleen"], groups, "spleen")
    finally:
        pacs.stop()
