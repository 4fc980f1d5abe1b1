"""Issue 25 (STOW-RS ingest): peers store into ainode by STOW-RS, through the same path as a
C-STORE — Orthanc's own DICOMweb client pushes a study, it is analysed and the results reach
Orthanc; no token gets 401 and a wrong one 403, storing nothing; a 2 GB request is refused
before it is read and a streamed one cut off, the node's memory barely moving; a kill -9 during
uploads loses no instance that was answered 200."""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import yaml
from dicomweb_client.api import DICOMwebClient

from .peers import (
    CT_SERIES,
    LUNG_ROUTE,
    free_port,
    make_studies,
    node_config,
    peak_rss_growth,
    series_files,
    start_node_process,
    start_orthanc,
    wait_for_port,
    wait_until,
)
from .viewer import DICOMWEB_PLUGIN

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "stow-token-" + secrets.token_hex(8)


def _config(tmp_path: Path, pacs_port: int | None = None) -> tuple[Path, dict[str, Any], str]:
    peers = [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}] if pacs_port else []
    config_path, config = node_config(
        tmp_path, peers=[{"ae_title": "STORESCU"}, *peers],
        destinations={"pacs": {"type": "dicom", "peer": "PACS"}} if pacs_port else {},
        routes=[{**LUNG_ROUTE, "destinations": ["pacs"] if pacs_port else []}],
    )  # fmt: skip
    config["console"] = {"host": "127.0.0.1", "port": free_port()}
    client = {"name": "ORTHANCWEB", "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}
    config["dicomweb"] = {"clients": [client], "max_request_bytes": 256 * 2**20}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path, config, f"http://127.0.0.1:{config['console']['port']}/dicomweb"


def _client(url: str, token: str = TOKEN) -> DICOMwebClient:
    return DICOMwebClient(url, headers={"Authorization": f"Bearer {token}"})


def test_orthanc_pushes_a_study_by_stow_rs_and_gets_the_results(tmp_path, start_node):
    node_port = free_port()
    config_path, config, url = _config(tmp_path, pacs_port=None)
    server = {"Url": url + "/", "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}}
    pacs = start_orthanc(tmp_path / "orthanc", "AINODE", node_port, plugins=[DICOMWEB_PLUGIN],
                         dicomweb_servers={"ainode": server})  # fmt: skip
    try:
        config["node"]["port"] = node_port
        config["peers"].append({"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port})
        config["destinations"] = {"pacs": {"type": "dicom", "peer": "PACS"}}
        config["routes"][0]["destinations"] = ["pacs"]
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        node = start_node(config_path, config)
        wait_for_port(config["console"]["port"], 60)
        for path in series_files(CT_SERIES):
            pacs.rest("POST", "/instances", raw=path.read_bytes())
        (study_id,) = pacs.rest("GET", "/studies")
        pushed = pacs.rest("POST", "/dicom-web/servers/ainode/stow", {"Resources": [study_id], "Synchronous": True})
        print("Orthanc's STOW-RS job:", pushed)
        wait_until(lambda: {s["MainDicomTags"]["Modality"] for s in pacs.rest("GET", "/series?expand")} >= {"SEG", "SR"}
                   or None, 180)  # fmt: skip
        (study,) = node.index().studies()
        assert study.calling_ae_title == "ORTHANCWEB" and study.instance_count == 64
        audit = node.cli("audit", "show").stdout
        assert "instances received" in audit and "ORTHANCWEB" in audit
    finally:
        pacs.stop()


@pytest.fixture
def stow_node(tmp_path, key_env) -> Iterator[tuple[Any, str, Path, dict[str, Any]]]:
    config_path, config, url = _config(tmp_path)
    node = start_node_process(config_path, config, key_env, tmp_path / "node.log")
    wait_for_port(config["console"]["port"], 60)
    yield node, url, config_path, config
    node.stop()


def test_no_token_401_a_wrong_one_403_and_nothing_stored(stow_node):
    node, url, _path, _settings = stow_node
    ds = pydicom.dcmread(series_files(CT_SERIES)[0])
    for token, status in ((None, 401), ("not-the-token", 403)):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kind = 'multipart/related; type="application/dicom"; boundary=b'
        response = httpx.post(url + "/studies", content=b"x" * 1000, timeout=30,
                              headers={**headers, "Content-Type": kind})  # fmt: skip
        assert response.status_code == status, response.text
    with pytest.raises(Exception, match="403"):
        _client(url, "wrong").store_instances([ds])
    assert node.index().studies() == []
    stored = _client(url).store_instances([ds])  # the right token stores it
    assert [str(i.ReferencedSOPInstanceUID) for i in stored.ReferencedSOPSequence] == [str(ds.SOPInstanceUID)]
    assert "FailedSOPSequence" not in stored
    wait_until(lambda: len(node.index().studies()) == 1 or None, 10)  # indexed by the batching writer


def test_a_huge_request_is_refused_early_and_memory_stays_flat(stow_node):
    node, url, _path, _settings = stow_node
    headers = {"Authorization": f"Bearer {TOKEN}",
               "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}  # fmt: skip

    def declared_2gb() -> int:
        def body() -> Iterator[bytes]:
            yield b"--b\r\nContent-Type: application/dicom\r\n\r\n"
            for _ in range(2048):  # a client that would send 2 GB (the node stops it at once)
                yield b"\0" * 2**20

        try:
            response = httpx.post(url + "/studies", content=body(), timeout=60,
                                  headers={**headers, "Content-Length": str(2 * 2**30)})  # fmt: skip
        except httpx.HTTPError:  # the node closed the connection while the client still sent
            return 413
        return response.status_code

    node.wait_warm()  # the growth measured is the request's own
    growth, status = peak_rss_growth(node.proc.pid, declared_2gb)
    print(f"2 GB declared: HTTP {status}, node RSS +{growth:.1f} MB")
    assert status == 413 and growth < 50

    def streamed() -> int:
        def body() -> Iterator[bytes]:
            yield b"--b\r\nContent-Type: application/dicom\r\n\r\n"
            for _ in range(400):  # 400 MiB chunked, past the 256 MiB request cap
                yield b"\0" * 2**20

        try:
            return httpx.post(url + "/studies", content=body(), headers=headers, timeout=120).status_code
        except httpx.HTTPError:
            return 413

    growth, status = peak_rss_growth(node.proc.pid, streamed)
    print(f"400 MiB streamed: HTTP {status}, node RSS +{growth:.1f} MB")
    assert status == 413 and growth < 50
    assert node.index().studies() == []


def test_kill_9_during_uploads_loses_nothing_answered_200(stow_node, tmp_path, key_env, monkeypatch):
    node, url, config_path, config = stow_node
    for name, value in key_env.items():
        monkeypatch.setenv(name, value)  # the test reads the store back
    (files,) = make_studies(CT_SERIES, 1, tmp_path / "studies")
    answered: list[str] = []
    stop = threading.Event()

    def upload() -> None:
        client = _client(url)
        # no retries: dicomweb-client otherwise sends a request the killed node refused four times
        # more, backing off for 30 s, before it gives up
        client.set_http_retry_params(retry=False)
        for path in files:
            if stop.is_set():
                return
            ds = pydicom.dcmread(path)
            try:
                response = client.store_instances([ds])
            except Exception:  # the node died under this request: not answered 200
                return
            answered.extend(str(i.ReferencedSOPInstanceUID) for i in response.get("ReferencedSOPSequence", []))

    uploader = threading.Thread(target=upload)
    uploader.start()
    wait_until(lambda: len(answered) >= 20 or None, 60, 0.05)
    node.kill()
    stop.set()
    uploader.join(60)
    print(f"kill -9 after {len(answered)} instances answered 200")
    restarted = start_node_process(config_path, config, key_env, tmp_path / "node-2.log")
    try:
        assert set(answered) <= restarted.stored_sop_instance_uids()
    finally:
        restarted.stop()
