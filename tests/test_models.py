"""Issue 12: the sites' own models by configuration — MONAI bundles, TorchScript, ONNX — with generic
SEG/SR, models kept loaded, and GPU placement.

The bundles are the Model Zoo's as published (``../shared/monai_bundles``) with seeded weights; MONAI's
own bundle runner on the same volume is the reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml

from ainode_sdk.declared.model import DeclaredModel
from ainode_sdk.declared.spec import ModelDeclaration
from node.jobs.devices import GIB, DeviceInfo, DevicePool
from node.jobs.volume import load_volume
from node.settings import load_settings

from .models import (
    LOWRES,
    SNOMED_MAPPING,
    SPLEEN,
    SPLEEN_PREPROCESSING,
    WHOLE_BODY,
    export_onnx,
    export_torchscript,
    monai_reference,
    seeded_bundle,
    spleen_declaration,
)
from .peers import (
    AINODE,
    CT_MIDDLE,
    CT_SERIES,
    CT_SOFT_SERIES,
    ROOT,
    dciodvfy,
    free_port,
    make_studies,
    node_config,
    pacs_node_config,
    series_files,
    wait_until,
)

WHOLE_BODY_FAVOURED = (2, 3, 5, 6, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69)
"""Channels the seeded whole-body network is biased to (kidneys, liver, stomach, lung lobes, lumbar
vertebrae, left ribs), so its argmax holds a known set of labels."""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def spleen(work) -> Path:
    return seeded_bundle(SPLEEN, work / "bundles")


@pytest.fixture(scope="module")
def ct_volume():
    datasets = [pydicom.dcmread(p) for p in series_files(CT_SERIES)]
    volume, slices = load_volume(datasets)
    return volume, slices


def _mask_by_slice(seg: pydicom.Dataset, slices: list[pydicom.Dataset], segment: int = 1) -> np.ndarray:
    """The SEG's segment as (slices, rows, columns) in the order of ``slices`` (original UIDs)."""
    reader = hd.seg.Segmentation.from_dataset(seg)
    uids = [str(s.SOPInstanceUID) for s in slices]
    pixels = reader.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[segment])
    return pixels[..., 0].astype(bool)


def _sr_values(sr: pydicom.Dataset, concept: str) -> list[float]:
    found: list[float] = []

    def walk(items: Any) -> None:
        for item in items:
            if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == concept:
                found.append(float(item.MeasuredValueSequence[0].NumericValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


def _assert_valid(path: Path) -> None:
    errors, _warnings = dciodvfy(path)
    assert errors == [], errors


def test_invalid_declarations_are_refused_with_file_line_and_key(tmp_path, spleen):
    def check(models: dict) -> str:
        path = tmp_path / "ainode.yaml"
        path.write_text(yaml.safe_dump({"keys": {"provider": "env"}, "models": models}, sort_keys=False))
        done = subprocess.run([AINODE, "config", "check", str(path)], capture_output=True, text=True, check=False)
        assert done.returncode == 2, done.stdout
        return done.stderr

    missing = check({"spleen": {"type": "monai_bundle", "path": str(tmp_path / "nope")}})
    assert f"ainode.yaml:4: models.spleen: path: {tmp_path / 'nope'} is not a MONAI bundle" in missing
    uncovered = check({"spleen": {"type": "monai_bundle", "path": str(spleen)}})
    assert "models.spleen: labels: no codes for channel(s) spleen" in uncovered
    scheme = {**spleen_declaration(spleen)}
    scheme["labels"] = {1: {"label": "Spleen", "type": ["78961009", "SNOMED", "Spleen"]}}
    assert "unknown coding scheme 'SNOMED'" in check({"spleen": scheme})
    weights = {**spleen_declaration(spleen), "weights": "other.pt"}
    assert "weights: " in check({"spleen": weights}) and "other.pt does not exist" in check({"spleen": weights})
    onnx = {"type": "onnx", "path": str(tmp_path / "m.onnx"), "labels": {1: {"label": "x", "type": ["1", "SCT", "x"]}}}
    assert "preprocessing: needed for a onnx model" in check({"m": onnx})


@pytest.mark.integration
@pytest.mark.slow
def test_spleen_bundle_routed_end_to_end_through_orthanc_equals_monai(orthanc, start_node, tmp_path, spleen):
    node_port = free_port()
    pacs = orthanc("AINODE", node_port)
    route = {
        "name": "spleen",
        "match": {"Modality": "CT"},
        "algorithms": ["spleen"],
        "completion": {"quiet_period_s": 1},
    }
    models = {"spleen": spleen_declaration(spleen)}
    config_path, config = pacs_node_config(tmp_path, pacs, node_port, [route], models=models)
    node = start_node(config_path, config)
    listed = node.cli("algorithms", "list")
    assert "spleen 0.5.9 [model (monai_bundle" in listed.stdout, listed.stdout + listed.stderr
    sent = series_files(CT_SERIES)[CT_MIDDLE]  # half the bundle's windows
    for path in sent:
        pacs.rest("POST", "/instances", raw=path.read_bytes())
    (study_id,) = pacs.rest("GET", "/studies")
    pacs.rest("POST", "/modalities/ainode/store", {"Resources": [study_id], "Synchronous": True})

    def results() -> dict[str, Any] | None:
        by_modality = {s["MainDicomTags"].get("Modality"): s for s in pacs.rest("GET", f"/studies/{study_id}/series")}
        return by_modality if {"SEG", "SR"} <= set(by_modality) else None

    by_modality = wait_until(results, 300)
    files = {}
    for modality in ("SEG", "SR"):
        (instance,) = by_modality[modality]["Instances"]
        files[modality] = tmp_path / f"{modality}.dcm"
        files[modality].write_bytes(pacs.rest("GET", f"/instances/{instance}/file"))
        _assert_valid(files[modality])
    seg, sr = pydicom.dcmread(files["SEG"]), pydicom.dcmread(files["SR"])
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "Spleen"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "spleen"
    assert hd.sr.Comprehensive3DSR.from_dataset(sr) is not None  # highdicom reads both back
    volume, slices = load_volume([pydicom.dcmread(p) for p in sent])
    ours = _mask_by_slice(seg, slices)

    reference = monai_reference(spleen, volume, tmp_path / "monai") > 0  # MONAI's own runner, same weights
    assert ours.any() and reference.any()  # a mask to compare, not two empty ones
    agreement = float((ours == reference).mean())
    assert agreement >= 0.999, agreement
    (volume_ml,) = _sr_values(sr, "118565006")
    assert volume_ml == pytest.approx(ours.sum() * volume.voxel_volume_ml, abs=0.01)
    (job,) = [json.loads(node.cli("jobs", "show", "1").stdout)]
    assert job["timings"]["model_inference_s"] > 0 and job["timings"]["model_loads"] == 1
    loaded = node.cli("algorithms", "list").stdout
    assert "loaded: spleen on cpu" in loaded and "loaded 1 time(s)" in loaded


@pytest.mark.slow
def test_torchscript_and_onnx_exports_give_the_bundles_mask(work, spleen, ct_volume):
    volume, _slices = ct_volume
    half = type(volume)(**{**volume.__dict__, "voxels": np.ascontiguousarray(volume.voxels[CT_MIDDLE])})
    bundle = DeclaredModel("spleen", ModelDeclaration.model_validate(spleen_declaration(spleen))).run(half, "cpu")
    labels = {1: {"label": "Spleen", "type": ["78961009", "SCT", "Spleen"]}}
    for kind, export in (("torchscript", export_torchscript), ("onnx", export_onnx)):
        path = export(spleen, work / f"spleen.{kind}")
        declaration = ModelDeclaration.model_validate(
            {"type": kind, "path": str(path), "labels": labels, "preprocessing": SPLEEN_PREPROCESSING}
        )
        result = DeclaredModel(f"spleen-{kind}", declaration).run(half, "cpu")
        assert result.label_map is not None and bundle.label_map is not None
        agreement = float((result.label_map == bundle.label_map).mean())
        assert agreement >= 0.999, (kind, agreement)


@pytest.mark.integration
@pytest.mark.slow
def test_whole_body_low_resolution_seg_codes_every_label_from_the_snomed_table(tmp_path, start_node, work):
    import psutil

    bundle = seeded_bundle(WHOLE_BODY, work / "wholebody", overrides=LOWRES, favour=WHOLE_BODY_FAVOURED)
    results = tmp_path / "results"
    config_path, config = node_config(
        tmp_path, peers=[{"ae_title": "STORESCU"}], destinations={"folder": {"type": "folder", "path": str(results)}},
        routes=[{"name": "whole-body", "match": {"Modality": "CT"}, "algorithms": ["wholebody"],
                 "destinations": ["folder"], "completion": {"quiet_period_s": 1.0}}],
    )  # fmt: skip
    config["models"] = {
        "wholebody": {"type": "monai_bundle", "path": str(bundle), "overrides": LOWRES,
                      "label_mapping": str(SNOMED_MAPPING), "measurements": ["volume"]},
    }  # fmt: skip
    config_path.write_text(yaml.safe_dump(config))
    node = start_node(config_path, config)
    from .peers import storescu

    assert storescu(node.port, series_files(CT_SERIES)[CT_MIDDLE]).returncode == 0
    assert node.proc is not None
    process = psutil.Process(node.proc.pid)
    peak = {"node": 0, "all": 0}

    def sample() -> bool:
        try:
            rss = process.memory_info().rss
            peak["node"] = max(peak["node"], rss)
            peak["all"] = max(peak["all"], rss + sum(c.memory_info().rss for c in process.children(recursive=True)))
        except psutil.Error:
            pass
        return len(list(results.rglob("*.dcm"))) == 2

    wait_until(sample, 400, 0.2)
    print(
        f"whole-body low-res: node peak RSS {peak['node'] / 2**20:.0f} MB, with children {peak['all'] / 2**20:.0f} MB"
    )
    (seg_path,) = [p for p in results.rglob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"]
    _assert_valid(seg_path)
    seg = pydicom.dcmread(seg_path)
    by_label = {str(s.SegmentLabel): s for s in seg.SegmentSequence}
    assert len(by_label) >= 10
    for item in by_label.values():  # every segment coded from the table: no private codes
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    lobe = by_label["Lung upper lobe left"].SegmentedPropertyTypeCodeSequence[0]
    assert (lobe.CodeValue, lobe.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning) == ("45653009", "Left")
    assert by_label["Vertebrae L1"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "66794005"
    right = by_label["Kidney right"].SegmentedPropertyTypeCodeSequence[0]
    assert (right.CodeValue, right.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning) == ("64033007", "Right")
    reader = hd.seg.Segmentation.from_dataset(seg)
    assert reader.number_of_segments == len(by_label)
    assert peak["node"] < 1.5 * 2**30  # the node itself stays small: the model lives in its worker


TINY_PREPROCESSING = {"spacing_mm": [6.0, 6.0, 10.0], "window_min": -1000, "window_max": 400, "roi_size": [32, 32, 16]}


def _tiny_torchscript(path: Path, seed: int) -> Path:
    """A small seeded 3D conv net (1 -> 2 channels) as TorchScript: a fast stand-in for a site's model."""
    import torch

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1)).eval()
    torch.jit.trace(net, torch.zeros(1, 1, 32, 32, 16)).save(str(path))
    return path


def _endless_torchscript(path: Path) -> Path:
    """A TorchScript model that runs until its process is killed: the model worker is then always
    mid-inference, whatever the machine's speed."""
    import torch

    class Endless(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            for _ in range(1 << 62):
                y = y + 0.0
            return y

    torch.jit.script(Endless().eval()).save(str(path))
    return path


def _tiny_node(tmp_path: Path, start_node, model: dict[str, Any]):
    results = tmp_path / "results"
    config_path, config = node_config(
        tmp_path, peers=[{"ae_title": "STORESCU"}], destinations={"folder": {"type": "folder", "path": str(results)}},
        routes=[{"name": "tiny", "match": {"Modality": "CT"}, "algorithms": ["tiny"], "destinations": ["folder"],
                 "completion": {"quiet_period_s": 1.0}}],
    )  # fmt: skip
    config["models"] = {"tiny": model}
    config_path.write_text(yaml.safe_dump(config))
    return start_node(config_path, config), results


def _job(node, job_id: int) -> dict[str, Any]:
    shown = node.cli("jobs", "show", str(job_id))
    return json.loads(shown.stdout) if shown.returncode == 0 else {}


def _finished(node, job_id: int) -> dict[str, Any] | None:
    job = _job(node, job_id)
    return job if job.get("state") in ("delivered", "failed", "refused") else None


@pytest.mark.integration
@pytest.mark.slow
def test_a_model_loads_once_reloads_changed_weights_and_survives_a_crash(tmp_path, start_node):
    import psutil

    weights = _tiny_torchscript(tmp_path / "tiny.ts", seed=1)
    labels = {1: {"label": "Thing", "type": ["91723000", "SCT", "Anatomical structure"]}}
    node, _results = _tiny_node(
        tmp_path, start_node, {"type": "torchscript", "path": str(weights), "labels": labels,
                               "preprocessing": TINY_PREPROCESSING},
    )  # fmt: skip
    from .peers import storescu

    studies = make_studies(CT_SERIES, 5, tmp_path / "studies")
    for n in range(3):
        assert storescu(node.port, studies[n]).returncode == 0
        job = wait_until(lambda n=n: _finished(node, n + 1), 120)
        assert job["state"] == "delivered", job
        assert job["timings"]["model_loads"] == 1  # the worker's own count: loaded once, reused twice
    _tiny_torchscript(weights, seed=2)  # a new model file
    assert storescu(node.port, studies[3]).returncode == 0
    job = wait_until(lambda: _finished(node, 4), 120)
    assert job["state"] == "delivered" and job["timings"]["model_loads"] == 2

    # the worker dies while a model runs (one that never ends: the worker's CPU time shows it under
    # way): the job fails with the reason, the replay runs on a new worker
    status = node.data_dir / "run" / "models-cpu.json"
    worker = json.loads(status.read_text())["pid"]
    idle = psutil.Process(worker).cpu_times()
    _endless_torchscript(weights)
    assert storescu(node.port, studies[4]).returncode == 0
    wait_until(lambda: _job(node, 5).get("state") == "running" or None, 60, 0.05)
    wait_until(lambda: sum(psutil.Process(worker).cpu_times()[:2]) > sum(idle[:2]) + 2.0 or None, 120, 0.1)
    assert _job(node, 5).get("state") == "running"  # two seconds of the worker's CPU: inside the endless loop
    os.kill(worker, signal.SIGKILL)
    job = wait_until(lambda: _finished(node, 5), 120)
    assert job["state"] == "failed" and "model worker died" in job["reason"], job
    _tiny_torchscript(weights, seed=3)  # the site puts a model that ends back
    retried = node.cli("jobs", "retry", "5")
    assert retried.returncode == 0
    job = wait_until(lambda: _job(node, 5).get("state") == "delivered" and _job(node, 5), 120)
    assert json.loads(status.read_text())["pid"] != worker  # a new worker


@pytest.mark.integration
def test_a_gpu_required_model_is_refused_on_a_machine_without_cuda(tmp_path, start_node):
    weights = _tiny_torchscript(tmp_path / "tiny.ts", seed=1)
    labels = {1: {"label": "Thing", "type": ["91723000", "SCT", "Anatomical structure"]}}
    node, results = _tiny_node(
        tmp_path, start_node, {"type": "torchscript", "path": str(weights), "labels": labels,
                               "preprocessing": TINY_PREPROCESSING, "resources": {"gpu": "required"}},
    )  # fmt: skip
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from .peers import storescu

    assert storescu(node.port, series_files(CT_SERIES)).returncode == 0
    job = wait_until(lambda: _finished(node, 1), 120)
    assert job["state"] == "failed"
    assert job["reason"] == "model tiny needs a GPU (gpu: required); this node has none (no CUDA device)"
    assert "failed" in node.cli("studies", "list").stdout and not list(results.rglob("*.dcm"))


def test_two_models_that_do_not_fit_together_never_share_a_gpu():
    pool = DevicePool([DeviceInfo("cuda:0", total_bytes=24 * GIB, free_bytes=10 * GIB)])
    running: list[str] = []
    overlaps: list[tuple[str, ...]] = []
    lock = threading.Lock()

    def run(name: str) -> None:
        for _ in range(5):
            with pool.place(name, "required", 6.0, cpu_fallback=False) as device:
                assert device == "cuda:0"
                with lock:
                    running.append(name)
                    if len(running) > 1:
                        overlaps.append(tuple(running))
                time.sleep(0.01)
                with lock:
                    running.remove(name)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("model-a", "model-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert overlaps == []  # 6 + 6 GiB > 10 GiB free: never at the same time
    # two that fit do share it
    with pool.place("a", "required", 4.0, False) as first, pool.place("b", "required", 4.0, False) as second:
        assert first == second == "cuda:0" and pool.reserved_gib()["cuda:0"] == 8.0


def test_stat_jobs_take_a_freed_gpu_first():
    pool = DevicePool([DeviceInfo("cuda:0", total_bytes=8 * GIB, free_bytes=8 * GIB)])
    order: list[str] = []
    holder = pool.place("first", "required", 6.0, False)
    holder.__enter__()

    def wait(name: str, priority: str) -> None:
        with pool.place(name, "required", 6.0, False, priority=priority):
            order.append(name)

    routine = threading.Thread(target=wait, args=("routine", "routine"))
    routine.start()
    time.sleep(0.2)
    stat = threading.Thread(target=wait, args=("stat", "stat"))
    stat.start()
    time.sleep(0.2)
    holder.__exit__(None, None, None)
    routine.join(10)
    stat.join(10)
    assert order == ["stat", "routine"]


def test_cpu_only_node_places_optional_models_on_the_cpu_and_refuses_required_ones():
    pool = DevicePool([])
    with pool.place("m", "optional", 2.0, cpu_fallback=True) as device:
        assert device == "cpu"
    from node.errors import PluginError

    with pytest.raises(PluginError, match="needs a GPU"), pool.place("m", "required", 2.0, cpu_fallback=True):
        pass


@pytest.mark.gpu
def test_spleen_bundle_runs_on_cuda_and_matches_the_cpu(spleen, ct_volume):
    volume, _ = ct_volume
    declaration = ModelDeclaration.model_validate(spleen_declaration(spleen))
    on_gpu = DeclaredModel("spleen", declaration).run(volume, "cuda")
    on_cpu = DeclaredModel("spleen-cpu", declaration).run(volume, "cpu")
    assert on_gpu.label_map is not None and on_cpu.label_map is not None
    assert float((on_gpu.label_map == on_cpu.label_map).mean()) >= 0.999


@pytest.mark.slow
def test_algorithms_check_on_the_spleen_bundle_and_lung_ct_density(tmp_path, spleen):
    config = tmp_path / "ainode.yaml"
    config.write_text(yaml.safe_dump({"keys": {"provider": "env"}, "models": {"spleen": spleen_declaration(spleen)}}))
    env = {**os.environ, "AINODE_KEY": "unused"}
    series = tmp_path / "series"  # the chest CT's middle 32 slices (5 mm): the bundle's windows halved
    series.mkdir()
    for path in series_files(CT_SERIES)[CT_MIDDLE]:
        (series / path.name).symlink_to(path)
    for name in ("spleen", "lung-ct-density"):
        out = tmp_path / name
        done = subprocess.run(
            [AINODE, "algorithms", "check", name, str(series), "--out", str(out), "--config", str(config)],
            capture_output=True, text=True, env=env, timeout=600, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{name}: PASS" in done.stdout
        written = sorted(p.name.split("_")[0] for p in out.glob("*.dcm"))
        assert written == ["GSPS", "SC", "SC", "SC", "SC", "SEG", "SR", "SR-segment"]  # every kind of object
        assert done.stdout.count("dciodvfy 0 error(s)") == 8


def test_node_results_hold_no_anatomy_of_one_algorithm():
    for path in (ROOT / "node" / "results").glob("*.py"):
        text = path.read_text().lower()
        for word in ("lung", "chest", "thorax", "laa"):
            assert word not in text, f"{path.name} mentions {word!r}"


def test_settings_accept_a_declared_model(tmp_path, spleen):
    path = tmp_path / "ainode.yaml"
    path.write_text(yaml.safe_dump({"keys": {"provider": "env"}, "models": {"spleen": spleen_declaration(spleen)}}))
    settings = load_settings(path)
    assert settings.models["spleen"].label_table()[1].label == "Spleen"


def test_an_sr_only_plugin_with_qualitative_and_located_findings(tmp_path, ct_volume):
    from node.jobs.isolation import run_isolated_packed, unpack_result
    from node.results import build_results

    volume, slices = ct_volume
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in series_files(CT_SERIES)]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    ordered = [by_uid[str(s.SOPInstanceUID)] for s in slices]
    for ds in ordered:
        ds.pop("ReferencedStudySequence", None)  # the de-identification removes it in the node
    from ainode_sdk.base import NoParams

    result = unpack_result(run_isolated_packed("tests.plugins:Finds", volume, "cpu", NoParams(), 60))
    from tests.plugins import Finds

    (sr,) = build_results(ordered, result, Finds.spec, lambda kind: pydicom.uid.generate_uid(), "AINODE")
    assert sr.Modality == "SR"
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    _assert_valid(path)
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
    groups = report.content.get_planar_roi_measurement_groups()
    assert len(groups) == 2
    expected = str(slices[volume.voxels.shape[0] // 2].SOPInstanceUID)
    for group in groups:
        region = group.roi
        assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == expected  # its slice
    point = next(g for g in groups if g.roi.GraphicType == "POINT").roi
    rows, columns = volume.voxels.shape[1:]
    assert point.GraphicData == pytest.approx([columns // 4 + 0.5, rows // 3 + 0.5], abs=1e-3)
    box = next(g for g in groups if g.roi.GraphicType == "POLYLINE").roi
    assert len(box.GraphicData) == 10 and box.GraphicData[:2] == box.GraphicData[-2:]  # closed
    assert _sr_values(sr, "PROB") == [87.0, 10.0]


@pytest.mark.slow
def test_algorithms_check_on_a_folder_of_two_series_checks_each(tmp_path):
    """Issue 22, defect 11: not "two images share one slice position", but each series named and run."""
    folder = tmp_path / "study"
    for source in (CT_SERIES, CT_SOFT_SERIES):
        (folder / source.name).mkdir(parents=True)
        for path in sorted(source.glob("*.dcm")):
            (folder / source.name / path.name).symlink_to(path)
    out = tmp_path / "out"
    done = subprocess.run(
        [AINODE, "algorithms", "check", "lung-ct-density", str(folder), "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "AINODE_KEY": "unused"}, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 series found" in done.stdout and "share one slice position" not in done.stdout + done.stderr
    assert "series 1 (CT, Series Number" in done.stdout and "series 2 (CT, Series Number" in done.stdout
    assert done.stdout.count(": PASS") == 3  # each series, then the whole check
    for n in (1, 2):
        assert sorted(p.name.split("_")[0] for p in (out / f"series-{n}").glob("*.dcm"))[-2:] == ["SR", "SR-segment"]
