"""Issue 24, end to end with a real PACS (Orthanc) and DCMTK: the real trained lung U-Net
(ONNX and TorchScript) routed and delivered; a silent (shadow) trial whose results never reach
the PACS and whose comparison agrees with one computed here from the two SEGs; promotion by
``ainode config reload``; readers' IOCM rejection notes, sent by storescu and by Orthanc,
counted against the job, model and version that made the results."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from node.results import build_rejection_note

from .console import PASSWORDS
from .peers import (
    AINODE,
    CT_MIDDLE,
    CT_PATIENT_NAME,
    CT_SERIES,
    ROOT,
    NodeProcess,
    Orthanc,
    free_port,
    series_files,
    start_node_process,
    start_orthanc,
    storescu,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARTEFACTS = Path(os.environ.get("AINODE_TEST_ARTEFACTS", ROOT / "test-artefacts")) / "models"
SHARED_MODELS = ROOT.parent / "shared" / "models" / "lung_unet_small"
ROUTES = [
    {"name": "unet", "match": {"Modality": "CT", "StudyDescription": "UNET"}, "completion": {"quiet_period_s": 1},
     "algorithms": ["lung-unet", "lung-unet-ts", "lung-ct-density"], "destinations": ["pacs"]},
    {"name": "trial", "match": {"Modality": "CT", "StudyDescription": "TRIAL"}, "completion": {"quiet_period_s": 1},
     "algorithms": ["lung-ct-density"], "destinations": ["pacs", "research"],
     "shadow": [{"algorithm": "lung-unet", "segments": {"Lung": ["Left lung", "Right lung"]}}]},
]  # fmt: skip


@dataclass
class Site:
    """Orthanc as the hospital's PACS forwarding to a running ainode."""

    pacs: Orthanc
    node: NodeProcess
    tmp: Path
    config: dict[str, Any]

    def ainode(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([AINODE, *args, "--config", str(self.node.config_path)], capture_output=True,
                              text=True, env=self.node.env, timeout=300, check=False)  # fmt: skip

    def send(self, description: str) -> tuple[str, list[pydicom.Dataset]]:
        """A copy of the shared chest CT's middle 32 slices (both lungs in each) as a new study with
        ``description``, uploaded to Orthanc and forwarded to ainode; returns Orthanc's study id and
        the instances."""
        study, series = generate_uid(), generate_uid()
        sent = []
        for path in series_files(CT_SERIES)[CT_MIDDLE]:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyDescription = study, series, description
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            out = self.tmp / "sent" / f"{ds.SOPInstanceUID}.dcm"
            out.parent.mkdir(exist_ok=True)
            ds.save_as(out)
            self.pacs.rest("POST", "/instances", raw=out.read_bytes())
            sent.append(ds)
        found = self.pacs.rest("POST", "/tools/lookup", raw=study.encode())
        study_id = found[0]["ID"]
        self.pacs.rest("POST", "/modalities/ainode/store", {"Resources": [study_id], "Synchronous": True})
        return study_id, sent

    def results(self, study_id: str, count: int) -> list[pydicom.Dataset]:
        """The SEG and SR instances Orthanc holds in the study once there are ``count`` of them."""

        def ready() -> list[str] | None:
            series = self.pacs.rest("GET", f"/studies/{study_id}/series")
            ids = [i for s in series if s["MainDicomTags"].get("Modality") in ("SEG", "SR") for i in s["Instances"]]
            return ids if len(ids) >= count else None

        ids = wait_until(ready, timeout_s=600, interval_s=1.0)
        out = []
        for instance in ids:
            path = self.tmp / "received" / f"{instance}.dcm"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(self.pacs.rest("GET", f"/instances/{instance}/file"))
            out.append(pydicom.dcmread(path))
        return out


def _models() -> dict[str, Any]:
    declared = yaml.safe_load((ROOT / "config" / "lung-unet.example.yaml").read_text())["models"]
    for model in declared.values():
        model["path"] = str(SHARED_MODELS / Path(model["path"]).name)
    return declared


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Any:
    tmp = tmp_path_factory.mktemp("lifecycle")
    node_port = free_port()
    pacs = start_orthanc(tmp / "orthanc", "AINODE", node_port)
    config = {
        "node": {"ae_title": "AINODE", "host": "127.0.0.1", "port": node_port, "data_dir": str(tmp / "data")},
        "keys": {"provider": "env", "variable": "AINODE_TEST_KEY"},
        "peers": [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}, {"ae_title": "STORESCU"}],
        "destinations": {"pacs": {"type": "dicom", "peer": "PACS"},
                         "research": {"type": "folder", "path": str(tmp / "research"), "research": True}},
        "routes": ROUTES, "models": _models(),
        "console": {"host": "127.0.0.1", "port": free_port()},
        "monitoring": {"reference_studies": 2, "recent_studies": 2},  # a few studies make a window here
    }  # fmt: skip
    path = tmp / "ainode.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {"AINODE_TEST_KEY": base64.b64encode(secrets.token_bytes(32)).decode()}
    for name, password in PASSWORDS.items():
        added = subprocess.run([AINODE, "users", "add", name, "--role", name, "--password-stdin", "--config",
                                str(path)], input=password + "\n", capture_output=True, text=True,
                               env={**os.environ, **env}, check=False)  # fmt: skip
        assert added.returncode == 0, added.stderr
    node = start_node_process(path, config, env, tmp / "node.log")
    yield Site(pacs, node, tmp, config)
    node.stop()
    pacs.stop()


def _by_algorithm(objects: list[pydicom.Dataset]) -> dict[tuple[str, str], pydicom.Dataset]:
    """(modality, algorithm name) -> the object (SEG: Segment Algorithm Name; SR: its series description)."""
    out = {}
    for ds in objects:
        if ds.Modality == "SEG":
            out[("SEG", str(ds.SegmentSequence[0].SegmentAlgorithmName))] = ds
        else:
            out[("SR", str(ds.ContentSequence and _algorithm_of_sr(ds)))] = ds
    return out


def _algorithm_of_sr(sr: pydicom.Dataset) -> str:
    """The Algorithm Name (111001, DCM) of the SR's first measurement group (TID 4019)."""
    for item in _items(sr):
        if item.ConceptNameCodeSequence[0].CodeValue == "111001":
            return str(item.TextValue)
    return ""


def _items(ds: pydicom.Dataset):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _masks(seg: pydicom.Dataset, sources: list[str], labels: list[str]) -> np.ndarray:
    """The union of ``labels``' masks over ``sources`` (highdicom's reading: source slice order)."""
    reader = hd.seg.Segmentation.from_dataset(copy.deepcopy(seg))
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence if str(s.SegmentLabel) in labels]
    pixels = reader.get_pixels_by_source_instance(sources, segment_numbers=numbers,
                                                  assert_missing_frames_are_empty=True)  # fmt: skip
    return pixels.astype(bool).any(axis=-1)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def test_the_lung_unet_runs_end_to_end_as_onnx_and_torchscript(site):
    study_id, sent = site.send("UNET")
    objects = _by_algorithm(site.results(study_id, 6))
    assert set(objects) == {(m, a) for m in ("SEG", "SR") for a in ("lung-unet", "lung-unet-ts", "lung-ct-density")}
    sources = [str(ds.SOPInstanceUID) for ds in sent]
    onnx = _masks(objects[("SEG", "lung-unet")], sources, ["Lung"])
    torchscript = _masks(objects[("SEG", "lung-unet-ts")], sources, ["Lung"])
    density = _masks(objects[("SEG", "lung-ct-density")], sources, ["Left lung", "Right lung"])
    dice, same = _dice(onnx, density), float((onnx == torchscript).mean())
    print(f"through Orthanc: lung U-Net vs lung-ct-density Dice {dice:.4f}; ONNX vs TorchScript {same:.6%} identical")
    assert dice >= 0.95 and same >= 0.9999
    seg = objects[("SEG", "lung-unet")]
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    voxel_ml = float(np.prod([float(v) for v in measures.PixelSpacing])) * float(measures.SliceThickness) / 1000
    volume = next(float(i.MeasuredValueSequence[0].NumericValue) for i in _items(objects[("SR", "lung-unet")])
                  if "MeasuredValueSequence" in i and i.ConceptNameCodeSequence[0].CodeMeaning == "Volume")  # fmt: skip
    assert volume == pytest.approx(int(onnx.sum()) * voxel_ml, rel=1e-4)
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == "4e64091" and "weights_sha256" in str(algorithm.AlgorithmParameters)
    tid4019 = {i.ConceptNameCodeSequence[0].CodeValue: str(i.get("TextValue", ""))
               for i in _items(objects[("SR", "lung-unet")])}  # fmt: skip
    assert tid4019["111001"] == "lung-unet" and tid4019["111003"] == "4e64091"  # Algorithm Name, Version
    assert "weights_sha256=374b4942d649" in tid4019["111002"]  # Algorithm Parameters


def test_a_shadow_reaches_no_clinical_destination_and_its_comparison_is_right(site):
    study_id, sent = site.send("TRIAL")
    objects = _by_algorithm(site.results(study_id, 2))
    site_node = site.node

    def compared() -> Any:
        records = [r for r in site_node.index().model_records("lung-unet", role="shadow") if r.comparison]
        return records or None

    (record,) = wait_until(compared, timeout_s=300, interval_s=1.0)
    # the PACS got the live algorithm's objects only
    assert set(objects) == {("SEG", "lung-ct-density"), ("SR", "lung-ct-density")}
    (shadow_path,) = [p for p in (site.tmp / "research").rglob("*.dcm") if pydicom.dcmread(p).Modality == "SEG"]
    shadow = pydicom.dcmread(shadow_path)
    sources = [str(ds.SOPInstanceUID) for ds in sent]
    expected = _dice(_masks(shadow, sources, ["Lung"]), _masks(objects[("SEG", "lung-ct-density")], sources,
                                                               ["Left lung", "Right lung"]))  # fmt: skip
    comparison = json.loads(record.comparison)
    assert "segments" in comparison, comparison
    (lung,) = comparison["segments"]
    print(f"shadow lung-unet vs live lung-ct-density: stored Dice {lung['dice']:.6f}, from the two SEGs {expected:.6f}")
    assert lung["label"] == "Lung" and lung["against"] == ["Left lung", "Right lung"]
    assert lung["dice"] == pytest.approx(expected, abs=1e-6) and lung["dice"] >= 0.95
    assert lung["volume_diff_ml"] == pytest.approx(lung["volume_ml"] - lung["reference_volume_ml"], abs=1e-3)
    compared_cli = site.ainode("models", "compare", "lung-unet", "--version", "4e64091", "--against", "lung-ct-density")
    assert compared_cli.returncode == 0, compared_cli.stderr
    print(compared_cli.stdout)
    assert "1 studies, 0 failure(s)" in compared_cli.stdout
    assert re.search(
        rf"Lung vs Left lung \+ Right lung: 1 studies; Dice median {lung['dice']:.4f}", compared_cli.stdout
    )


def test_a_rejection_note_is_counted_against_its_job_model_and_version(site):
    study_id, _sent = site.send("TRIAL")
    objects = _by_algorithm(site.results(study_id, 2))
    sr, seg = objects[("SR", "lung-ct-density")], objects[("SEG", "lung-ct-density")]
    index = site.node.index()
    before = len(index.rejections())

    def note(rejected: pydicom.Dataset, title: Any, name: str) -> Path:
        kos = build_rejection_note(
            [rejected], series_instance_uid=generate_uid(), sop_instance_uid=generate_uid(), device_name="READER",
            device_uid=generate_uid(), description="rejected in the viewer", title=title,
        )  # fmt: skip
        path = site.tmp / f"{name}.dcm"
        kos.save_as(path, enforce_file_format=True)
        return path

    # DCMTK's storescu sends a reader's note rejecting the delivered SR
    quality = note(sr, codes.DCM.RejectedForQualityReasons, "quality")
    sent = storescu(site.node.port, [quality])
    assert sent.returncode == 0, sent.stderr
    assert storescu(site.node.port, [quality]).returncode == 0  # the same note again counts once
    rows = wait_until(lambda: index.rejections()[before:] or None, timeout_s=30)
    assert [(r.model, r.version, r.route, r.reason_code, r.reason) for r in rows] == [
        ("lung-ct-density", "1.0.0", "trial", "113001", "Rejected for Quality Reasons")
    ]
    job = index.job(rows[0].job_id)
    assert job.algorithm == "lung-ct-density" and job.state == "delivered"

    # Orthanc forwards one rejecting the SEG for patient safety
    safety = note(seg, codes.DCM.RejectedForPatientSafetyReasons, "safety")
    uploaded = site.pacs.rest("POST", "/instances", raw=safety.read_bytes())
    site.pacs.rest("POST", "/modalities/ainode/store", {"Resources": [uploaded["ID"]], "Synchronous": True})
    rows = wait_until(lambda: index.rejections()[before + 1 :] or None, timeout_s=30)
    assert [(r.job_id, r.reason_code, r.calling_ae_title) for r in rows] == [(job.id, "113037", "PACS")]

    # one referencing nothing of ainode's changes nothing, and neither note became a study
    other = pydicom.dcmread(series_files(CT_SERIES)[0], stop_before_pixels=True)
    assert storescu(site.node.port, [note(other, codes.DCM.RejectedForQualityReasons, "unknown")]).returncode == 0
    assert len(index.rejections()) == before + 2
    assert not any(s.instance_count == 1 for s in index.studies())  # no KOS was stored as a study
    audit = site.ainode("audit", "show")
    assert f"results of job {job.id} (lung-ct-density 1.0.0) rejected: 113001 Rejected for Quality Reasons" in (
        audit.stdout
    )
    assert "113037 Rejected for Patient Safety Reasons" in audit.stdout
    drift = site.ainode("models", "drift", "lung-ct-density")
    assert "rejected by readers: 1 x 113001 Rejected for Quality Reasons" in drift.stdout, drift.stdout + drift.stderr


def test_promotion_by_config_reload_serves_the_next_study_with_the_promoted_version(site):
    config = copy.deepcopy(site.config)
    trial = config["routes"][1]
    trial["algorithms"], trial["shadow"] = ["lung-unet"], []  # shadow -> live
    site.node.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    reloaded = site.ainode("config", "reload")
    assert reloaded.returncode == 0, reloaded.stderr
    wait_until(lambda: "configuration reloaded" in site.node.log() or None, timeout_s=30)
    listed = site.ainode("algorithms", "list")
    assert "used by: route unet: live; route trial: live" in listed.stdout, listed.stdout
    study_id, _sent = site.send("TRIAL")
    objects = _by_algorithm(site.results(study_id, 2))
    assert set(objects) == {("SEG", "lung-unet"), ("SR", "lung-unet")}


def test_the_models_page_shows_versions_roles_comparisons_drift_and_rejections(site):
    import httpx
    from playwright.sync_api import sync_playwright

    from .viewer import CHROMIUM

    url = f"http://127.0.0.1:{site.config['console']['port']}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url + "/models")
            page.fill("input[name=name]", "viewer")
            page.fill("input[name=password]", PASSWORDS["viewer"])
            page.click("button:has-text('Sign in')")
            page.wait_for_url(url + "/models")
            ARTEFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTEFACTS / "models-page.png"), full_page=True)
            text = page.inner_text("main")
            unet = page.inner_text("section#model-lung-unet-4e64091")
            density = page.inner_text("section#model-lung-ct-density-1\\.0\\.0")
            html = page.content()
        finally:
            browser.close()
    # versions and how each route uses them (the trial was promoted: lung-unet is live on both routes)
    assert "lung-unet-ts" in text and "lung-unet version 4e64091" in unet
    assert "lung-unet: route unet: live" in unet and "lung-unet: route trial: live" in unet
    # the shadow trial's comparison, the readers' rejections, drift with its charts
    assert "Shadow comparison" in unet and "Lung vs Left lung + Right lung" in unet
    assert "113001" in density and "Rejected for Quality Reasons" in density and "113037" in density
    assert "PSI" in density and "output.Left lung.mean" in density
    assert html.count("<polyline") >= 6
    # no PHI for a viewer
    assert CT_PATIENT_NAME not in html and not re.search(r"\d+\.\d+\.\d+\.\d+\.\d+\.\d+", text)
    # an operator may look but not change routing: no form on the page, a reload is refused
    client = httpx.Client(base_url=url, timeout=60)
    login = client.post("/api/login", json={"name": "operator", "password": PASSWORDS["operator"]})
    client.headers["X-CSRF-Token"] = login.json()["csrf_token"]
    assert "<form" not in client.get("/models").text.split("<main>", 1)[1]
    assert client.post("/api/routing/reload", json={"confirm": True}).status_code == 403
