"""Issue 6: dry runs, the JSON Schema, and hot reload under load."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .peers import AINODE, CT_SERIES, DATA, MR_SERIES, TOOL_ENV, node_config, series_files, wait_until

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "ainode.example.yaml"


def _ainode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AINODE, *args], capture_output=True, text=True, check=False)


def test_route_test_explains_match_and_mismatch_without_values():
    ct = _ainode("route", "test", str(DATA / "ct_chest_lungpetctdx_A0001"), "--config", str(EXAMPLE))
    assert ct.returncode == 0, ct.stderr
    assert ct.stdout.count("route chest-ct-lung-density: MATCH") == 2  # both CT series
    assert "StudyDescription regex: PASS" in ct.stdout
    assert "-> runs lung-ct-density; results to results-folder (folder)" in ct.stdout
    assert "Lung_Dx" not in ct.stdout and "Chest" not in ct.stdout  # no values without --show-values
    mr = _ainode("route", "test", str(MR_SERIES), "--config", str(EXAMPLE))
    assert "route chest-ct-lung-density: NO MATCH (decided by Modality eq)" in mr.stdout
    assert "route mr-brain-store-only: MATCH" in mr.stdout
    shown = _ainode("route", "test", str(MR_SERIES), "--config", str(EXAMPLE), "--show-values")
    assert "Modality = 'MR'" in shown.stdout


def test_schema_describes_every_section():
    out = _ainode("config", "schema")
    schema = json.loads(out.stdout)
    assert set(schema["properties"]) >= {"node", "keys", "peers", "destinations", "routes", "deidentification"}
    route = schema["$defs"]["Route"]
    assert route["additionalProperties"] is False
    assert "regex" in json.dumps(route["properties"]["match"])


@pytest.mark.integration
@pytest.mark.slow
def test_reload_during_association_changes_next_study_and_keeps_old_on_error(start_node, tmp_path):
    def config_with(route_name: str) -> dict:
        route = {
            "name": route_name,
            "match": {"Modality": "MR"},
            "algorithms": ["lung-ct-density"],  # refuses MR: a quick, visible job per study
            "completion": {"quiet_period_s": 1.0},
        }
        return route

    config_path, config = node_config(
        tmp_path, peers=[{"ae_title": "STORESCU"}], destinations={}, routes=[config_with("v1")]
    )
    node = start_node(config_path, config)
    ct_files = series_files(CT_SERIES)
    # a long association: the CT series sent slowly, one instance at a time with a pause
    sender = subprocess.Popen(
        ["storescu", "-aet", "STORESCU", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, ct_files)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**TOOL_ENV, "TCP_NODELAY": "0"},
    )  # fmt: skip
    time.sleep(0.3)
    config["routes"] = [config_with("v2")]
    config_path.write_text(yaml.safe_dump(config))
    reload = node.cli("config", "reload")
    assert reload.returncode == 0, reload.stderr
    _out, err = sender.communicate(timeout=120)
    assert sender.returncode == 0, err[-2000:]
    wait_until(lambda: "configuration reloaded" in node.log(), 30)
    # no instance lost on the association that straddled the reload
    assert wait_until(lambda: f"{len(ct_files):>5} instance(s)" in node.studies(), 30)

    mr_files = sorted(p for p in MR_SERIES.iterdir() if p.is_file())
    sent = subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, mr_files)],
        capture_output=True, text=True, env=TOOL_ENV, check=False,
    )  # fmt: skip
    assert sent.returncode == 0
    wait_until(lambda: [j for j in node.index().jobs() if j.state == "refused"], 60)
    (job,) = node.cli("jobs", "list").stdout.split("\n")[:1]
    shown = json.loads(node.cli("jobs", "show", job.split()[0]).stdout)
    assert shown["route"] == "v2"  # the study after the reload was routed by the new rules

    # an invalid file is refused by the CLI and by the node; the running config stays in force
    config["routes"][0]["match"] = {"Modality": {"equals": "MR"}}
    config_path.write_text(yaml.safe_dump(config))
    bad = node.cli("config", "reload")
    assert bad.returncode == 2 and "unknown operator 'equals'; did you mean 'eq'?" in bad.stderr
    import os
    import signal

    os.kill(int((node.data_dir / "ainode.pid").read_text()), signal.SIGHUP)  # the node checks too
    wait_until(lambda: "configuration reload refused" in node.log(), 30)
    config["routes"] = [config_with("v2")]  # valid again, so the admin CLI can read the trail
    config_path.write_text(yaml.safe_dump(config))
    shown_audit = node.cli("audit", "show")
    assert shown_audit.returncode == 0, shown_audit.stderr
    audit = shown_audit.stdout
    assert "configuration reloaded: sha256" in audit and "configuration reload refused" in audit
    assert node.proc is not None and node.proc.poll() is None  # still serving
