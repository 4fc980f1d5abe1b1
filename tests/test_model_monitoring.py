"""Issue 24 (monitoring): what each job's model saw and said is recorded without PHI; drift of a
model version between its reference window and the recent one (PSI) crosses the shipped alert
rule's threshold for what changed and not for what did not — checked by Prometheus's own
``promtool`` on the metrics the node exposes; the shipped rules pass ``promtool check rules`` and
``promtool test rules``.

The studies run through the node's own pipeline in this process (ingest, route, de-identify,
lung-ct-density, SEG + SR into a folder), 15 of one population and 15 shifted by +150 HU with
another convolution kernel in their headers.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from ainode_sdk.registry import Registry
from node.console.metrics import LedgerCollector
from node.instances import ReceivedInstance
from node.jobs.pipeline import Pipeline, Services
from node.monitoring.drift import psi
from node.monitoring.summary import model_summaries
from node.settings.config import Settings
from node.storage.index import Index, JobState
from node.storage.ingest import Ingest
from node.storage.keys import KeyringProvider
from node.storage.secrets import NodeSecrets
from node.storage.store import ObjectStore

from .peers import AINODE, CT_PATIENT_NAME, CT_SERIES, ROOT, series_files

pytestmark = [pytest.mark.slow]

RULES = ROOT / "deploy" / "prometheus" / "ainode-models.rules.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
SLICES = slice(20, 44)  # 24 slices across both lungs: lung-ct-density's minimum is 20
JITTER = range(-21, 22, 3)  # 15 studies per population, each its own small intensity offset (HU)
AFFECTED_INPUTS = {"input.kernel"}
UNAFFECTED_INPUTS = {"input.manufacturer", "input.model_name", "input.slice_thickness_mm", "input.pixel_spacing_mm",
                     "input.kvp", "input.slices", "input.contrast"}  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 2.0e9

    def __call__(self) -> float:
        return self.now


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


def test_the_shipped_rules_pass_promtool_check_and_test():
    checked = _promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert checked.returncode == 0 and "SUCCESS: 4 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", "tests/ainode-models.test.yml", cwd=RULES.parent)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_psi_is_zero_for_one_population_and_large_for_a_shift():
    same = [float(v) for v in range(40)]
    assert psi(same, same) == 0.0
    assert psi(["B30f"] * 15, ["B30f"] * 15) == 0.0
    assert psi(same, [v + 100 for v in same]) > 2
    assert psi(["B30f"] * 15, ["B70f"] * 15) > 2


@pytest.fixture(scope="module")
def monitored(tmp_path_factory) -> tuple[Index, Settings, ObjectStore, Path]:
    """30 studies analysed by lung-ct-density: 15 as scanned (each with its own small offset),
    then the same 15 at +150 HU with the kernel ``YC`` in their headers."""
    tmp = tmp_path_factory.mktemp("monitoring")
    settings = Settings.model_validate({
        "node": {"data_dir": str(tmp / "data")}, "keys": {"provider": "env"}, "peers": [{"ae_title": "STORESCU"}],
        "destinations": {"folder": {"type": "folder", "path": str(tmp / "results")}},
        "routes": [{"name": "lung", "match": {"Modality": "CT"}, "algorithms": ["lung-ct-density"],
                    "destinations": ["folder"], "completion": {"quiet_period_s": 1}}],
        "monitoring": {"reference_studies": 15, "recent_studies": 15, "bins": 5},
    })  # fmt: skip
    key = secrets.token_bytes(32)
    (tmp / "ainode.yaml").write_text(yaml.safe_dump({  # for the ainode commands a test runs on this node
        "node": {"data_dir": str(tmp / "data")}, "keys": {"provider": "env", "variable": "AINODE_TEST_KEY"},
        "monitoring": {"reference_studies": 15, "recent_studies": 15, "bins": 5},
    }))  # fmt: skip
    (tmp / "key").write_text(base64.b64encode(key).decode())
    store = ObjectStore(tmp / "data" / "store", KeyringProvider([key]))
    index = Index.for_data_dir(tmp / "data")
    node_secrets = NodeSecrets(store)
    clock = Clock()
    pipeline = Pipeline(Services(settings, store, index, node_secrets, Registry(), "cpu", clock=clock))
    originals = [pydicom.dcmread(p) for p in series_files(CT_SERIES)[SLICES]]
    for shift, kernel in ((0, None), (150, "YC")):
        for jitter in JITTER:
            ingest = Ingest(store, index, node_secrets)
            study = pydicom.uid.generate_uid()
            series = pydicom.uid.generate_uid()
            for ds in originals:  # changed in place: each study sets what it changes
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
                ds.RescaleIntercept = -1024 + shift + jitter  # every voxel's HU moves
                if kernel:
                    ds.ConvolutionKernel = kernel
                buffer = io.BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                syntax = str(ds.file_meta.TransferSyntaxUID)
                ingest(ReceivedInstance(study, series, str(ds.SOPInstanceUID), str(ds.SOPClassUID), syntax,
                                        "STORESCU", buffer.getvalue()))  # fmt: skip
            ingest.close()
            clock.now += 60
            (key,) = [s.study_key for s in index.studies() if not index.jobs(s.study_key)]
            (job_id,) = pipeline.plan(key)
            assert pipeline.run_job(job_id) == JobState.DELIVERED, index.job(job_id).reason
    return index, settings, store, tmp


def test_each_job_records_what_its_model_saw_and_said_without_phi(monitored):
    index, _settings, _store, _tmp = monitored
    records = index.model_records("lung-ct-density")
    assert (
        len(records) == 30 and {r.outcome for r in records} == {"delivered"} and {r.role for r in records} == {"live"}
    )
    first, last = json.loads(records[0].inputs), json.loads(records[-1].inputs)
    assert first == {"manufacturer": "Philips", "model_name": "Brilliance16", "kernel": "L", "contrast": "no",
                     "slice_thickness_mm": 5.0, "pixel_spacing_mm": 0.8418, "kvp": 120.0, "slices": 24}  # fmt: skip
    assert last["kernel"] == "YC"
    outputs = json.loads(records[0].outputs)
    assert {"Left lung", "Right lung"} <= set(outputs["segments"])
    left = outputs["segments"]["Left lung"]
    assert left["volume_ml"] > 100 and -1000 < left["mean"] < -500 and left["p05"] < left["p50"] < left["p95"]
    assert any("Volume" in name for name in outputs["measurements"])
    text = " ".join(r.inputs + r.outputs for r in records)
    assert CT_PATIENT_NAME not in text and not re.search(r"\d+\.\d+\.\d+\.\d+\.\d+", text)  # no name, no UID


def test_drift_crosses_the_alert_threshold_for_what_changed_only(monitored, tmp_path):
    index, settings, store, _tmp = monitored
    (summary,) = [m for m in model_summaries(index, settings.monitoring) if m.model == "lung-ct-density"]
    assert (summary.reference_n, summary.recent_n) == (15, 15)
    drift = {d.feature: d.psi for d in summary.drift}
    print("drift (PSI), largest first:", json.dumps(dict(list(drift.items())[:12]), indent=1))
    print("unaffected:", {f: drift[f] for f in sorted(UNAFFECTED_INPUTS)})
    affected = AFFECTED_INPUTS | {"output.Left lung.mean", "output.Right lung.mean", "output.Left lung.p50"}
    threshold = float(re.search(r"ainode_model_drift > ([0-9.]+)", RULES.read_text()).group(1))
    assert all(drift[f] > threshold for f in affected), {f: drift[f] for f in affected}
    assert all(drift[f] <= threshold for f in UNAFFECTED_INPUTS)

    # the node's /metrics, as Prometheus would scrape it, through the shipped rule (promtool)
    registry = CollectorRegistry()
    registry.register(LedgerCollector(index, store, lambda: settings))
    scraped = generate_latest(registry).decode()
    series = [line for line in scraped.splitlines() if line.startswith("ainode_model_drift{")]
    assert len(series) == len(drift)
    alerts = [line for line in series if float(line.rsplit(" ", 1)[1]) > threshold]
    test = {
        "rule_files": [str(RULES)], "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": line.rsplit(" ", 1)[0], "values": f"{line.rsplit(' ', 1)[1]}x30"}
                             for line in series],
            "alert_rule_test": [{
                "eval_time": "20m", "alertname": "AinodeModelDrift",
                "exp_alerts": [{"exp_labels": {"severity": "warning", **_labels(line)}} for line in alerts],
            }],
        }],
    }  # fmt: skip
    (tmp_path / "drift.test.yml").write_text(yaml.safe_dump(test))
    # exp_annotations left out: promtool then checks labels only
    for case in test["tests"][0]["alert_rule_test"][0]["exp_alerts"]:
        case["exp_annotations"] = _annotations(case["exp_labels"], scraped)
    (tmp_path / "drift.test.yml").write_text(yaml.safe_dump(test))
    tested = _promtool("test", "rules", "drift.test.yml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    fired = {_labels(line)["feature"] for line in alerts}
    assert affected <= fired and not (fired & UNAFFECTED_INPUTS)


def _labels(line: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', line.split("{", 1)[1].rsplit("}", 1)[0]))


def _annotations(labels: dict[str, str], scraped: str) -> dict[str, str]:
    line = next(
        ln for ln in scraped.splitlines()
        if ln.startswith("ainode_model_drift{") and _labels(ln).get("feature") == labels["feature"]
    )  # fmt: skip
    value = float(line.rsplit(" ", 1)[1])
    rule = yaml.safe_load(RULES.read_text())["groups"][0]["rules"][0]
    return {
        "summary": f"{labels['model']} {labels['version']}: {labels['feature']} has drifted (PSI {value:.2f})",
        "description": rule["annotations"]["description"],
    }


def test_a_baseline_set_by_dates_is_the_reference_window(monitored):
    index, _settings, _store, tmp = monitored
    records = index.model_records("lung-ct-density")

    def iso(epoch: float) -> str:
        return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat()

    env = {**os.environ, "AINODE_TEST_KEY": (tmp / "key").read_text()}
    config = str(tmp / "ainode.yaml")
    # the first ten studies are the baseline: the recent window is what came after
    baseline = subprocess.run([AINODE, "models", "baseline", "lung-ct-density", "--version", "1.0.0", "--from",
                               iso(records[0].recorded_at - 1), "--until", iso(records[9].recorded_at + 1),
                               "--config", config], capture_output=True, text=True, env=env, check=False)  # fmt: skip
    assert baseline.returncode == 0, baseline.stderr
    drift = subprocess.run([AINODE, "models", "drift", "lung-ct-density", "--top", "100", "--config", config],
                           capture_output=True,
                           text=True, env=env, check=False)  # fmt: skip
    assert drift.returncode == 0, drift.stderr
    print(drift.stdout)
    assert "lung-ct-density 1.0.0: reference 10 jobs (baseline dates), recent 15;" in drift.stdout
    assert re.search(r"input.kernel\s+PSI\s+[0-9.]+  DRIFT", drift.stdout)
    assert re.search(r"input.slices\s+PSI\s+0.000\n", drift.stdout)
    wrong = subprocess.run([AINODE, "models", "baseline", "lung-ct-density", "--version", "1.0.0", "--from",
                            "last week", "--until", "now", "--config", config], capture_output=True, text=True,
                           env=env, check=False)  # fmt: skip
    assert wrong.returncode != 0 and "'last week' is no ISO 8601 date" in wrong.stderr
