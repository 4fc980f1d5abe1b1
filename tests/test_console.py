"""Issue 15, the monitoring part: ``/metrics`` (Prometheus text, parsed with prometheus-client's
own parser), ``/healthz`` and ``/readyz`` of a running node, and no PHI of the study in them."""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.request
from typing import Any

import pydicom
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .peers import CT_SERIES, ROOT, folder_node_config, free_port, series_files, storescu, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _console_node(tmp_path: Any, start_node: Any) -> tuple[Any, int]:
    config_path, config, _results = folder_node_config(tmp_path)
    port = free_port()
    config["console"] = {"host": "127.0.0.1", "port": port}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    node = start_node(config_path, config)
    wait_until(lambda: _alive(port) or None, 60)
    return node, port


def _alive(port: int) -> bool:
    try:
        return _get(port, "/healthz")[0] == 200
    except OSError:
        return False


def test_metrics_count_the_study_and_its_stages_without_phi(tmp_path, start_node):
    node, port = _console_node(tmp_path, start_node)
    status, body = wait_until(lambda: (r := _get(port, "/readyz"))[0] == 200 and r, 60)  # the job side starts last
    assert (status, json.loads(body)) == (200, {"status": "ready", "failing": {}})
    assert storescu(node.port, series_files(CT_SERIES)).returncode == 0

    def delivered() -> dict[Any, float] | None:  # the job delivered, then its study closed (a moment later)
        samples = _samples(_get(port, "/metrics")[1])
        done = samples.get(("ainode_studies", (("state", "done"),))) == 1
        return samples if done and samples.get(("ainode_jobs", (("state", "delivered"),))) == 1 else None

    samples = wait_until(delivered, 300, 1.0)
    assert samples[("ainode_instances_received_total", (("calling_ae_title", "STORESCU"),))] == 64
    for stage in ("deidentify", "load_volume", "inference", "build", "deliver"):
        assert samples[("ainode_stage_seconds_count", (("stage", stage),))] == 1, stage
        assert samples[("ainode_stage_seconds_sum", (("stage", stage),))] > 0, stage
    assert samples[("ainode_receive_to_delivery_seconds_count", ())] == 1
    assert samples[("ainode_stage_seconds_count", (("stage", "receive_to_complete"),))] == 1
    assert samples[("ainode_stage_seconds_sum", (("stage", "receive_to_complete"),))] >= 1.0  # the quiet period
    assert samples[("ainode_associations_total", (("calling_ae_title", "STORESCU"), ("outcome", "released")))] == 1
    assert samples[("ainode_instances_total", (("calling_ae_title", "STORESCU"), ("status", "SUCCESS")))] == 64
    sizes = sum(p.stat().st_size for p in series_files(CT_SERIES))
    received = samples[("ainode_received_bytes_total", (("calling_ae_title", "STORESCU"),))]
    assert 0.9 * sizes < received <= sizes  # the data sets as received (the files less their preambles)
    assert samples[("ainode_queue_depth", (("priority", "routine"),))] == 0
    assert samples[("ainode_disk_free_bytes", ())] > samples[("ainode_disk_watermark_bytes", ())]
    # a stranger's association is refused: counted as (unknown), its AE title is not a label
    refused = storescu(node.port, series_files(CT_SERIES)[:1], calling="INTRUDER")
    assert refused.returncode != 0
    rejected = ("ainode_associations_total", (("calling_ae_title", "(unknown)"), ("outcome", "rejected")))
    samples = wait_until(lambda: rejected in (got := _samples(_get(port, "/metrics")[1])) and got, 30)
    assert samples[rejected] == 1
    text = _get(port, "/metrics")[1] + _get(port, "/readyz")[1] + _get(port, "/healthz")[1]
    assert "INTRUDER" not in text
    ds = pydicom.dcmread(series_files(CT_SERIES)[0])
    for phi in (str(ds.PatientName), str(ds.PatientID), ds.StudyInstanceUID, ds.SeriesInstanceUID,
                ds.SOPInstanceUID, ds.StudyDate, ds.get("AccessionNumber", "") or "ACCESSION-NOT-SET"):  # fmt: skip
        assert phi not in text, phi
    assert node.proc is not None and node.proc.poll() is None
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "ainode.json").read_text())
    used = {m for p in dashboard["panels"] for t in p["targets"] for m in re.findall(r"ainode_\w+", t["expr"])}
    families = list(text_string_to_metric_families(_get(port, "/metrics")[1]))  # those without a sample too
    exported = {name for name, _labels in samples} | {f.name for f in families} | {f"{f.name}_total" for f in families}
    assert used and used <= exported, used - exported  # the dashboard plots what the node exports


def test_readyz_turns_not_ready_over_the_disk_watermark(tmp_path, start_node):
    node, port = _console_node(tmp_path, start_node)
    wait_until(lambda: _get(port, "/readyz")[0] == 200, 60)
    node.stop()
    config = yaml.safe_load(node.config_path.read_text())  # the disk has filled up meanwhile
    config["node"]["min_free_disk_mb"] = shutil.disk_usage(tmp_path).free // 2**20 + 10_000
    node.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    start_node(node.config_path, config)
    wait_until(lambda: _alive(port) or None, 60)
    # once the job side is up, only the disk keeps the node from being ready
    status, body = wait_until(lambda: "algorithms" not in (r := _get(port, "/readyz"))[1] and r, 60)
    assert status == 503
    failing = json.loads(body)["failing"]
    assert set(failing) == {"disk"} and "watermark" in failing["disk"], failing
    assert _get(port, "/healthz")[0] == 200  # alive, only not ready
