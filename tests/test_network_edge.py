"""Issue 11 (defect 13): unauthenticated peers cannot shut everyone else out.

Bounded attacks against the running node on loopback, each followed by a legitimate DCMTK storescu
(plain and over TLS) that must still store its instances within seconds: connections stuck in the
middle of a PDU, a PDU header declaring 2 GB, idle TCP connections on the TLS port. The attackers
connect from 127.0.0.5, the modality from 127.0.0.1 (two hosts)."""

from __future__ import annotations

import socket
import struct
import subprocess
import time

import pytest
import yaml

from .peers import CT_SERIES, TOOL_ENV, node_config, series_files, storescu
from .pki import make_pki

pytestmark = [pytest.mark.integration]

ATTACKER = "127.0.0.5"
NETWORK_TIMEOUT_S = 3.0


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _node(tmp_path, start_node, tls=None):
    config_path, config = node_config(tmp_path, peers=[{"ae_title": "STORESCU"}], destinations={}, routes=[])
    config["node"] |= {"receivers": 1, "network_timeout_s": NETWORK_TIMEOUT_S}
    if tls is not None:
        config["node"]["tls"] = tls
    config_path.write_text(yaml.safe_dump(config))
    node = start_node(config_path, config)
    node.wait_warm()  # the memory figures below are the connections' own
    return node


def _connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((ATTACKER, 0))
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    return sock


def _closed_by_peer(sock: socket.socket, deadline: float) -> bool:
    """Whether the node closes ``sock`` before ``deadline`` (monotonic)."""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def _store_five(port: int) -> float:
    start = time.monotonic()
    sent = storescu(port, series_files(CT_SERIES)[:5])
    assert sent.returncode == 0, sent.stderr[-2000:]
    return time.monotonic() - start


def test_fifty_connections_stuck_mid_pdu_do_not_block_a_modality(tmp_path, start_node):
    node = _node(tmp_path, start_node)
    assert node.proc is not None
    before = _rss_mb(node.proc.pid)
    stuck = []
    for _ in range(50):
        sock = _connect(node.port)
        sock.sendall(b"\x01\x00\x00")  # 3 bytes of an A-ASSOCIATE-RQ header, then nothing
        stuck.append(sock)
    sent_at = time.monotonic()
    assert _store_five(node.port) < 15
    deadline = sent_at + NETWORK_TIMEOUT_S + 3
    still_open = [s for s in stuck if not _closed_by_peer(s, deadline)]
    assert not still_open, f"{len(still_open)} stuck connection(s) still open after the network timeout"
    assert _rss_mb(node.proc.pid) - before < 50
    assert "connection refused: 12 connections from this address already" in node.log()
    for sock in stuck:
        sock.close()
    assert _store_five(node.port) < 15


def test_a_pdu_declaring_two_gigabytes_is_refused_before_it_is_buffered(tmp_path, start_node):
    node = _node(tmp_path, start_node)
    assert node.proc is not None
    before = _rss_mb(node.proc.pid)
    sock = _connect(node.port)
    sock.sendall(struct.pack(">BBL", 0x01, 0, 2**31))
    zeros, sent, refused = bytes(1 << 20), 0, False
    started = time.monotonic()
    try:
        while sent < 300 * 2**20 and time.monotonic() - started < 20:
            sock.sendall(zeros)
            sent += len(zeros)
    except OSError:  # the node closed the connection
        refused = True
    if not refused:
        refused = _closed_by_peer(sock, time.monotonic() + NETWORK_TIMEOUT_S + 2)
    sock.close()
    assert refused, f"the node accepted {sent >> 20} MiB of a 2 GB PDU"
    assert _rss_mb(node.proc.pid) - before < 50
    assert _store_five(node.port) < 15


def test_idle_connections_on_the_tls_port_do_not_block_tls_associations(tmp_path, start_node):
    pki = make_pki(tmp_path / "pki")
    tls = {"certificate": str(pki.server.certificate), "private_key": str(pki.server.key)}
    tls["ca_certificates"] = str(pki.ca)
    node = _node(tmp_path, start_node, tls=tls)
    idle = [_connect(node.port) for _ in range(4)]  # TCP only: no ClientHello, ever
    opened = time.monotonic()
    files = series_files(CT_SERIES)[:5]
    for _ in range(3):
        start = time.monotonic()
        sent = subprocess.run(
            ["storescu", "-R", "+tls", str(pki.client.key), str(pki.client.certificate), "+cf", str(pki.ca),
             "-aet", "STORESCU", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, files)],
            capture_output=True, text=True, env=TOOL_ENV, timeout=60, check=False,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr[-2000:]
        assert time.monotonic() - start < 15
    assert all(_closed_by_peer(s, opened + NETWORK_TIMEOUT_S + 3) for s in idle)
    for sock in idle:
        sock.close()
