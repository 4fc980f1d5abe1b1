"""Issue 4: DICOM TLS, encryption at rest, key rotation and tampering, access control, audit trail."""

from __future__ import annotations

import random
import socket
import ssl
import subprocess
from pathlib import Path

import pydicom
import pytest

from node.storage import segments

from .peers import (
    CT_PATIENT_NAME,
    CT_SERIES,
    LUNG_ROUTE,
    MR_SERIES,
    TOOL_ENV,
    free_port,
    node_config,
    series_files,
    wait_listening,
    wait_until,
)
from .pki import make_pki

pytestmark = [pytest.mark.integration]


def _tls_storescu(port: int, files: list[Path], key: Path, cert: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    cmd = ["storescu", "-R", "+tls", str(key), str(cert), "+cf", str(ca), "-aet", "STORESCU", "-aec", "AINODE"]
    return subprocess.run(
        [*cmd, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        env=TOOL_ENV,
        timeout=120,
        check=False,
    )


def _audit(node) -> str:
    shown = node.cli("audit", "show")
    assert shown.returncode == 0, shown.stderr
    return shown.stdout


@pytest.mark.slow
def test_tls_in_and_out_and_nothing_plaintext_at_rest(start_node, tmp_path):
    pki = make_pki(tmp_path / "pki")
    received = tmp_path / "storescp"
    received.mkdir()
    scp_port = free_port()
    scp_log = open(tmp_path / "storescp.log", "wb")  # noqa: SIM115 - closed with the process
    tls_args = ["+tls", str(pki.client.key), str(pki.client.certificate), "+cf", str(pki.ca)]
    storescp = subprocess.Popen(
        ["storescp", "-v", *tls_args, "-od", str(received), "+xa", str(scp_port)],
        stdout=scp_log, stderr=scp_log, env=TOOL_ENV,
    )  # fmt: skip
    try:
        wait_listening(scp_port)
        config_path, config = node_config(
            tmp_path,
            peers=[
                {"ae_title": "STORESCU", "certificate_subject": "CN=modality1,O=ainode-test"},
                {"ae_title": "STORESCP", "host": "127.0.0.1", "port": scp_port, "tls": True},
            ],
            destinations={"pacs": {"type": "dicom", "peer": "STORESCP"}},
            routes=[{**LUNG_ROUTE, "destinations": ["pacs"]}],
        )
        config["node"]["tls"] = {
            "certificate": str(pki.server.certificate),
            "private_key": str(pki.server.key),
            "ca_certificates": str(pki.ca),
        }
        config_path.write_text(__import__("yaml").safe_dump(config))
        node = start_node(config_path, config)
        files = series_files(CT_SERIES)

        sent = _tls_storescu(node.port, files, pki.client.key, pki.client.certificate, pki.ca)
        assert sent.returncode == 0, sent.stderr[-2000:]
        # results come back to DCMTK storescp over TLS
        try:
            results = wait_until(
                lambda: sorted(received.iterdir()) if len(list(received.iterdir())) >= 2 else None, 120
            )
        except TimeoutError:
            raise AssertionError((tmp_path / "storescp.log").read_text()[-3000:]) from None
        assert sorted(pydicom.dcmread(p).Modality for p in results) == ["SEG", "SR"]

        # refused: plaintext, an untrusted client certificate, TLS 1.1
        plain = subprocess.run(
            ["storescu", "-aet", "STORESCU", "-aec", "AINODE", "127.0.0.1", str(node.port), str(files[0])],
            capture_output=True, text=True, env=TOOL_ENV, timeout=60, check=False,
        )  # fmt: skip
        assert plain.returncode != 0
        rogue = _tls_storescu(node.port, files[:1], pki.rogue_client.key, pki.rogue_client.certificate, pki.ca)
        assert rogue.returncode != 0
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        old.load_cert_chain(str(pki.client.certificate), str(pki.client.key))
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as raw, pytest.raises(ssl.SSLError):
            old.wrap_socket(raw).do_handshake()
        audit = wait_until(lambda: (a := _audit(node)).count("TLS handshake failed") >= 2 and a, 30)
        assert "110113" in audit and "110104" in audit
    finally:
        storescp.terminate()
        storescp.wait(timeout=30)
    node.stop()

    # nothing under the data directory in plaintext: names, IDs, original UIDs, pixel runs
    originals = [pydicom.dcmread(f) for f in files]
    needles = {CT_PATIENT_NAME.encode(), str(originals[0].PatientID).encode()}
    needles |= {
        str(e.value).encode()
        for ds in originals
        for e in ds.iterall()
        if e.VR == "UI" and isinstance(e.value, str) and not e.value.startswith("1.2.840.10008.")
    }
    rng = random.Random(4)
    for ds in originals[::8]:
        pixels = ds.PixelData
        for _ in range(20):
            start = rng.randrange(len(pixels) // 4, 3 * len(pixels) // 4)
            window = pixels[start : start + 64]
            if len(set(window)) > 8:
                needles.add(window)
    stored = [p for p in node.data_dir.rglob("*") if p.is_file()]
    # instances are records of segment files: what is scanned holds at least every instance sent
    assert sum(p.stat().st_size for p in stored) > sum(f.stat().st_size for f in files)
    for path in stored:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"plaintext found in {path.relative_to(node.data_dir)}"


def test_key_rotation_keeps_objects_readable_and_tampering_is_quarantined(start_node, tmp_path):
    key_file = tmp_path / "keys" / "ainode.key"
    subprocess.run(
        [str(Path(__import__("sys").executable).parent / "ainode"), "keys", "generate", "--out", str(key_file)],
        check=True,
        capture_output=True,
    )
    config_path, config = node_config(tmp_path, peers=[{"ae_title": "STORESCU"}], destinations={}, routes=[])
    config["keys"] = {"provider": "file", "path": str(key_file)}
    config_path.write_text(__import__("yaml").safe_dump(config))
    node = start_node(config_path, config)
    mr_files = sorted(p for p in MR_SERIES.iterdir() if p.is_file())
    sent = subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, mr_files)],
        capture_output=True, text=True, env=TOOL_ENV, timeout=120, check=False,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    wait_until(lambda: f"{len(mr_files):>5} instance(s)" in node.studies(), 30)
    node.stop()

    before = node.cli("keys", "status").stdout
    old_key = before.split()[0]
    rotated = node.cli("keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert "retired 1 key(s)" in rotated.stdout
    after = node.cli("keys", "status").stdout
    assert old_key not in after and "current" in after
    assert len(key_file.read_text().split()) == 1
    verified = node.cli("store", "verify")
    assert verified.returncode == 0 and "0 tampered" in verified.stdout, verified.stdout + verified.stderr

    objects = sorted(p for p in (node.data_dir / "store" / "objects").rglob("*") if p.is_file())
    victim = objects[len(objects) // 2]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    verified = node.cli("store", "verify")
    assert verified.returncode == 1
    assert "1 tampered or unreadable" in verified.stdout
    assert (node.data_dir / "store" / "quarantine" / victim.name).exists() and not victim.exists()
    audit = _audit(node)
    assert "master key rotated" in audit and "tamper detected" in audit

    # retention: purge deletes the study's objects and its index rows, and is audited
    (study_key,) = [line.split()[0] for line in node.cli("studies", "list").stdout.splitlines()]
    purged = node.cli("purge", study_key)
    assert purged.returncode == 0, purged.stderr
    assert node.cli("studies", "list").stdout.strip() == ""
    left = [p.name for p in (node.data_dir / "store" / "objects").rglob("*") if p.is_file()]
    assert all(name.startswith("secret-") for name in left), left
    for path in (node.data_dir / "store" / "segments").glob("*.seg"):
        # every received instance's data key is gone (crypto-shredded)
        assert all(a.empty and b.empty for _at, _n, (a, b) in segments.records(path)), path
    assert "110105" in _audit(node)


def test_access_control_rejects_and_audits(start_node, tmp_path):
    config_path, config = node_config(
        tmp_path,
        peers=[{"ae_title": "STORESCU", "source_addresses": ["10.9.9.0/24"]}, {"ae_title": "ECHOSCU"}],
        destinations={},
        routes=[],
    )
    node = start_node(config_path, config)

    def echo(calling: str, called: str = "AINODE") -> int:
        cmd = ["echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(node.port)]
        return subprocess.run(cmd, capture_output=True, text=True, env=TOOL_ENV, check=False).returncode

    assert echo("INTRUDER") != 0  # unknown AE title
    assert echo("STORESCU") != 0  # known AE title, wrong source address
    assert echo("ECHOSCU", called="NOTAINODE") != 0  # wrong called AE title
    assert echo("ECHOSCU") == 0
    audit = wait_until(lambda: (a := _audit(node)).count("110113") >= 3 and a, 30)
    assert "unknown calling AE title 'INTRUDER'" in audit
    assert "STORESCU called from 127.0.0.1, not from its configured addresses" in audit
    assert "called AE title 'NOTAINODE' is not ours" in audit
