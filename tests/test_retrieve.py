"""Issue 25 (query/retrieve): ``ainode retrieve --from SOURCE`` fetches what the PACS never
forwarded — by Study Instance UID (C-FIND + C-MOVE), by Accession Number (C-FIND + C-GET) and by a
query (QIDO-RS + WADO-RS) from a real Orthanc; each study arrives, is analysed once and its
results reach Orthanc; the same call again fetches nothing; a dry run lists the studies."""

from __future__ import annotations

import os
import subprocess

import httpx
import pydicom
import pytest
import yaml

from .console import PASSWORDS, csrf_of
from .peers import (
    AINODE,
    CT_SERIES,
    LUNG_ROUTE,
    free_port,
    make_studies,
    node_config,
    start_orthanc,
    wait_for_port,
    wait_until,
)
from .viewer import DICOMWEB_PLUGIN

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _signed_in(url: str, user: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=60)
    client.post("/api/login", json={"name": user, "password": PASSWORDS[user]}).raise_for_status()
    return client


def test_retrieve_by_uid_accession_and_query_over_dimse_and_dicomweb(tmp_path, start_node, key_env):
    node_port = free_port()
    pacs = start_orthanc(tmp_path / "orthanc", "AINODE", node_port, plugins=[DICOMWEB_PLUGIN])
    try:
        studies = make_studies(CT_SERIES, 4, tmp_path / "studies")
        uids = []
        for number, files in enumerate(studies, 1):
            for path in files:
                ds = pydicom.dcmread(path)
                ds.AccessionNumber = f"ACC{number}"
                ds.save_as(path)
                pacs.rest("POST", "/instances", raw=path.read_bytes())
            uids.append(str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID))
        patient = str(pydicom.dcmread(studies[0][0], stop_before_pixels=True).PatientID)
        config_path, config = node_config(
            tmp_path, port=node_port,
            peers=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}],
            destinations={"pacs": {"type": "dicom", "peer": "PACS"}},
            # a retrieval can pause for over a second between instances while the suite's other
            # worker runs a model's conversion check on both cores: one study was analysed twice
            routes=[{**LUNG_ROUTE, "completion": {"quiet_period_s": 3.0}, "destinations": ["pacs"]}],
        )  # fmt: skip
        config["sources"] = {
            "orthanc": {"type": "dimse", "peer": "PACS", "retrieve": "move"},
            "orthanc-get": {"type": "dimse", "peer": "PACS", "retrieve": "get"},
            "orthanc-web": {"type": "dicomweb", "url": f"http://127.0.0.1:{pacs.http_port}/dicom-web"},
        }
        config["console"] = {"host": "127.0.0.1", "port": free_port()}
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        for name in ("operator", "viewer"):
            added = subprocess.run([AINODE, "users", "add", name, "--role", name, "--password-stdin", "--config",
                                    str(config_path)], input=PASSWORDS[name] + "\n", capture_output=True, text=True,
                                   env={**os.environ, **key_env}, check=False)  # fmt: skip
            assert added.returncode == 0, added.stderr
        node = start_node(config_path, config)

        def segs() -> int:
            return sum(1 for s in pacs.rest("GET", "/series?expand") if s["MainDicomTags"]["Modality"] == "SEG")

        moved = node.cli("retrieve", "--from", "orthanc", "--study", uids[0])  # C-FIND + C-MOVE
        print(moved.stdout, moved.stderr)
        assert moved.returncode == 0 and "1 study(ies) fetched, 0 failed" in moved.stdout
        got = node.cli("retrieve", "--from", "orthanc-get", "--accession", "ACC2")  # C-FIND + C-GET
        print(got.stdout, got.stderr)
        assert got.returncode == 0 and "64 instance(s)" in got.stdout
        # the console's "fetch and analyse": an operator asks for ACC4 (a viewer may not)
        url = f"http://127.0.0.1:{config['console']['port']}"
        wait_for_port(config["console"]["port"], 60)
        viewer = _signed_in(url, "viewer")
        assert viewer.get("/fetch").status_code == 403
        operator = _signed_in(url, "operator")
        page = operator.get("/fetch").text
        asked = operator.post("/fetch", data={"csrf_token": csrf_of(page), "source": "orthanc-get",
                                              "attribute": "AccessionNumber", "value": "ACC4"})  # fmt: skip
        assert asked.status_code == 200 and "1 study(ies) being fetched from orthanc-get" in asked.text
        assert patient not in asked.text
        refused = operator.post("/fetch", data={"csrf_token": csrf_of(page), "source": "orthanc-get",
                                                "attribute": "StudyInstanceUID", "value": "../../x"})  # fmt: skip
        assert refused.status_code >= 400 and "Study Instance UID" in refused.text
        wait_until(lambda: len(node.index().studies()) == 3 or None, 120)

        dry = node.cli("retrieve", "--from", "orthanc-web", "--patient-id", patient, "--modality", "CT", "--dry-run")
        print(dry.stdout, dry.stderr)
        assert dry.returncode == 0 and "4 matching study(ies), 3 already held" in dry.stdout
        assert dry.stdout.count("  fetch ") == 1 and uids[2] in dry.stdout
        web = node.cli("retrieve", "--from", "orthanc-web", "--patient-id", patient, "--modality", "CT")  # QIDO + WADO
        print(web.stdout, web.stderr)
        assert web.returncode == 0 and "1 study(ies) fetched, 0 failed" in web.stdout
        wait_until(lambda: segs() == 4 or None, 300, 1.0)  # each study analysed, its results in the PACS

        again = node.cli("retrieve", "--from", "orthanc", "--patient-id", patient)
        assert again.returncode == 0 and "4 matching study(ies), 4 already held" in again.stdout
        index = node.index()
        rows = index.studies()
        assert len(rows) == 4 and {r.instance_count for r in rows} == {64}
        assert sorted(len(index.jobs(r.study_key)) for r in rows) == [1, 1, 1, 1]  # analysed once each
        assert {r.calling_ae_title for r in rows} == {"PACS", "ORTHANC-WEB"}
        assert segs() == 4
        assert (
            "fetch and analyse from source orthanc-get: 1 study(ies) found, 1 to fetch"
            in node.cli("audit", "show").stdout
        )
        assert "retrieved from source orthanc-get" in node.cli("audit", "show").stdout
    finally:
        pacs.stop()
