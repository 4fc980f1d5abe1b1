"""Issue 25 (DICOMweb destinations): results delivered by STOW-RS to a real Orthanc with its
DICOMweb plugin — with Orthanc's HTTP basic authentication, and with a bearer token through a
small authenticating proxy; a wrong credential dead-letters with the HTTP status as its reason; a
superseded result is withdrawn by a rejection note sent by STOW-RS too."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pydicom
import pytest

from .peers import (
    CT_SERIES,
    LUNG_ROUTE,
    ROOT,
    Orthanc,
    free_port,
    node_config,
    series_files,
    start_orthanc,
    storescu,
    wait_until,
)
from .viewer import DICOMWEB_PLUGIN

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USER, PASSWORD, TOKEN = "ainode", "stow-secret-1234", "bearer-token-5678"


@pytest.fixture
def pacs(tmp_path) -> Iterator[Orthanc]:
    """Orthanc with DICOMweb and HTTP basic authentication on (and the IOCM script that acts on
    rejection notes)."""
    orthanc = start_orthanc(tmp_path / "orthanc", "AINODE", free_port(), plugins=[DICOMWEB_PLUGIN],
                            users={USER: PASSWORD},
                            lua_scripts=[ROOT / "deploy" / "orthanc" / "iocm-rejection.lua"])  # fmt: skip
    yield orthanc
    orthanc.stop()


class _BearerProxy(http.server.BaseHTTPRequestHandler):
    """Lets a request through to Orthanc (with Orthanc's own credentials) only with the bearer token."""

    upstream = ""
    accept: Any = staticmethod(lambda token: token == TOKEN)

    def _body(self) -> bytes:
        """The request body (dicomweb-client streams it: chunked transfer coding)."""
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        self.rfile.readline()
        return b"".join(parts)

    def do_POST(self) -> None:
        body = self._body()  # read before answering: the client is still sending
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        if scheme != "Bearer" or not self.accept(token):
            self.send_response(401)
            self.send_header("WWW-Authenticate", "Bearer")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        request = urllib.request.Request(self.upstream + self.path, data=body, method="POST")
        for name in ("Content-Type", "Accept"):
            if self.headers.get(name):
                request.add_header(name, self.headers[name])
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, payload, kind = response.status, response.read(), response.headers.get("Content-Type")
        except urllib.error.HTTPError as exc:
            status, payload, kind = exc.code, exc.read(), exc.headers.get("Content-Type")
        self.send_response(status)
        if kind:
            self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def _serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` served on a free loopback port; yields its DICOMweb URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()


@contextmanager
def _proxy(pacs: Orthanc, accept: Any = None) -> Iterator[str]:
    """The authenticating proxy in front of Orthanc's DICOMweb; yields its DICOMweb URL."""
    attributes: dict[str, Any] = {"upstream": f"http://127.0.0.1:{pacs.http_port}"}
    if accept is not None:
        attributes["accept"] = staticmethod(accept)
    with _serving(type("Proxy", (_BearerProxy,), attributes)) as url:
        yield url


@pytest.fixture
def bearer_proxy(pacs) -> Iterator[str]:
    with _proxy(pacs) as url:
        yield url


def _node(tmp_path: Path, start_node: Any, destination: dict[str, Any]) -> Any:
    config_path, config = node_config(
        tmp_path, peers=[{"ae_title": "STORESCU"}], destinations={"web": destination},
        routes=[{**LUNG_ROUTE, "destinations": ["web"], "completion": {"quiet_period_s": 2.0}}],
    )  # fmt: skip
    config["delivery"] = {"max_attempts": 1}
    config_path.write_text(__import__("yaml").safe_dump(config, sort_keys=False))
    return start_node(config_path, config)


def _files() -> list[Path]:
    return sorted(series_files(CT_SERIES), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True)
                                                             .ImagePositionPatient[2]))  # fmt: skip


def _modalities(pacs: Orthanc) -> list[str]:
    return sorted(s["MainDicomTags"]["Modality"] for s in pacs.rest("GET", "/series?expand"))


def test_stow_rs_with_basic_authentication_and_a_withdrawal_by_stow(pacs, tmp_path, start_node, monkeypatch):
    monkeypatch.setenv("ORTHANC_PASSWORD", PASSWORD)  # the node's environment (start_node passes it on)
    url = f"http://127.0.0.1:{pacs.http_port}/dicom-web"
    auth = {"type": "basic", "username": USER, "password_env": "ORTHANC_PASSWORD"}
    node = _node(tmp_path, start_node, {"type": "dicomweb", "url": url, "objects": ["SEG", "SR"], "auth": auth})
    files = _files()
    assert storescu(node.port, files[:40]).returncode == 0
    wait_until(lambda: node.job_state(1) == "delivered" or None, 180)
    assert _modalities(pacs) == ["SEG", "SR"]  # Orthanc holds only what ainode stored: the results
    first = {i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.rest("GET", "/instances?expand")}

    assert storescu(node.port, files[40:]).returncode == 0  # a late burst: re-analysis, withdrawal
    wait_until(lambda: node.job_state(2) == "delivered" or None, 180)
    assert "withdrawn from web" in (node.index().job(1).reason or "")
    assert _modalities(pacs) == ["KO", "SEG", "SR"]  # the superseding results and the note
    for uid in first:  # Orthanc acted on the note it received by STOW-RS
        assert pacs.rest("POST", "/tools/lookup", raw=uid.encode()) == []
    (kos,) = [i for i in pacs.rest("GET", "/instances?expand") if i["MainDicomTags"].get("SOPInstanceUID")
              and pacs.rest("GET", f"/instances/{i['ID']}/simplified-tags").get("Modality") == "KO"]  # fmt: skip
    tags = pacs.rest("GET", f"/instances/{kos['ID']}/tags?simplify")
    assert tags["ConceptNameCodeSequence"][0]["CodeValue"] == "113001"


def test_stow_rs_with_a_bearer_token_through_a_proxy(pacs, bearer_proxy, tmp_path, start_node, monkeypatch):
    monkeypatch.setenv("STOW_TOKEN", TOKEN)
    node = _node(tmp_path, start_node, {"type": "dicomweb", "url": bearer_proxy,
                                        "auth": {"type": "bearer", "token_env": "STOW_TOKEN"}})  # fmt: skip
    assert storescu(node.port, _files()).returncode == 0
    wait_until(lambda: node.job_state(1) == "delivered" or None, 180)
    assert _modalities(pacs) == ["SEG", "SR"]


def test_a_wrong_credential_dead_letters_with_the_http_status(pacs, bearer_proxy, tmp_path, start_node, monkeypatch):
    monkeypatch.setenv("STOW_TOKEN", "not-the-token")
    node = _node(tmp_path, start_node, {"type": "dicomweb", "url": bearer_proxy,
                                        "auth": {"type": "bearer", "token_env": "STOW_TOKEN"}})  # fmt: skip
    assert storescu(node.port, _files()).returncode == 0
    wait_until(lambda: node.job_state(1) == "failed" or None, 180)
    reason = node.index().job(1).reason
    print("dead letter:", reason)
    assert "dead letter after 1 attempt(s)" in reason and "HTTP 401" in reason
    assert TOKEN not in node.log() and "not-the-token" not in node.log()
    assert pacs.rest("GET", "/series") == []


def test_stow_rs_with_oauth2_client_credentials_renews_its_token(pacs, tmp_path, start_node, monkeypatch):
    from .oidc_provider import oidc_provider

    with oidc_provider() as provider, _proxy(pacs, provider.valid) as url:
        provider.token_lifetime_s = 63  # Authlib renews a minute before expiry: this one is stale in 3 s
        monkeypatch.setenv("STOW_CLIENT_SECRET", provider.client_secret)
        auth = {"type": "oauth2", "token_url": f"{provider.issuer}/token", "client_id": provider.client_id,
                "client_secret_env": "STOW_CLIENT_SECRET"}  # fmt: skip
        node = _node(tmp_path, start_node, {"type": "dicomweb", "url": url, "auth": auth})
        files = _files()
        assert storescu(node.port, files[:40]).returncode == 0
        wait_until(lambda: node.job_state(1) == "delivered" or None, 180)
        assert len(provider.access_tokens) == 1
        time.sleep(4)
        assert storescu(node.port, files[40:]).returncode == 0  # re-analysis: results and a note, sent again
        wait_until(lambda: node.job_state(2) == "delivered" or None, 180)
        assert len(provider.access_tokens) == 2  # a new token was fetched for the expired one
        assert "KO" in _modalities(pacs)
        assert provider.client_secret not in node.log()


class _PartialStow(http.server.BaseHTTPRequestHandler):
    """A STOW-RS service that refuses the SR of the first request (0xA700) and takes everything
    after: what a partial failure looks like (PS3.18 Failed SOP Sequence, HTTP 202)."""

    requests: ClassVar[list[list[str]]] = []
    refuse_always = False

    def do_POST(self) -> None:
        from python_multipart.multipart import MultipartParser, parse_options_header

        body = _BearerProxy._body(self)  # type: ignore[arg-type]
        _kind, options = parse_options_header(self.headers["Content-Type"])
        parts: list[bytearray] = []
        parser = MultipartParser(options[b"boundary"], {
            "on_part_begin": lambda: parts.append(bytearray()),
            "on_part_data": lambda data, start, end: parts[-1].extend(data[start:end]),
        })  # fmt: skip
        parser.write(body)
        datasets = [pydicom.dcmread(io.BytesIO(bytes(p))) for p in parts]
        self.requests.append([str(ds.Modality) for ds in datasets])
        refuse = self.refuse_always or len(self.requests) == 1
        stored, failed = pydicom.Dataset(), []
        stored.ReferencedSOPSequence = []
        for ds in datasets:
            item = pydicom.Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
            if refuse and ds.Modality == "SR":
                item.FailureReason = 0xA700
                failed.append(item)
            else:
                stored.ReferencedSOPSequence.append(item)
        if failed:
            stored.FailedSOPSequence = failed
        payload = json.dumps(stored.to_json_dict()).encode()
        self.send_response(202 if failed else 200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("refuse_always", [False, True])
def test_a_partial_stow_failure_sends_again_only_what_failed(tmp_path, start_node, refuse_always):
    handler = type("Stow", (_PartialStow,), {"requests": [], "refuse_always": refuse_always})
    with _serving(handler) as url:
        node = _node(tmp_path, start_node, {"type": "dicomweb", "url": url})
        assert storescu(node.port, _files()).returncode == 0
        state = "failed" if refuse_always else "delivered"
        wait_until(lambda: node.job_state(1) == state or None, 180)
        assert sorted(handler.requests[0]) == ["SEG", "SR"] and handler.requests[1] == ["SR"]  # only what failed
        if refuse_always:
            reason = node.index().job(1).reason
            print("dead letter:", reason)
            assert "1 object(s) not stored (SR): failure reason 0xA700" in reason


class _Unavailable(http.server.BaseHTTPRequestHandler):
    """A DICOMweb service that answers every request 503 Service Unavailable, counting them."""

    requests: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.requests.append(self.path)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_one_delivery_attempt_is_one_request_the_node_retries_by_its_own_policy():
    """dicomweb-client repeats a request answered 503 four times over 30 s by default; the node's
    delivery attempt sends it once (its own ``max_attempts`` and ``backoff_s`` retry)."""
    import requests

    from node.errors import DeliveryError
    from node.network.dicomweb import stow

    handler = type("Unavailable", (_Unavailable,), {"requests": []})
    with _serving(handler) as url, pytest.raises(DeliveryError, match="HTTP 503"):
        stow(url, requests.Session(), [pydicom.dcmread(series_files(CT_SERIES)[0])], 10)
    assert handler.requests == ["/dicom-web/studies"]
