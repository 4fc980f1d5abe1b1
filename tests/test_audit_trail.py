"""Issue 11 (defects 2 and 14): audit record ids unique across writing processes, re-wrap during
appends loses nothing; the ATNA mirror goes over TLS to a collector that checks nothing is in clear."""

from __future__ import annotations

import multiprocessing
import re
import secrets
import socket
import ssl
import threading
from pathlib import Path

import pytest

from node.audit import INSTANCES_TRANSFERRED, SECURITY_ALERT, AuditEvent, AuditLog, study_event
from node.audit.syslog import SyslogSender
from node.errors import ConfigError
from node.settings import load_settings
from node.settings.config import SyslogSettings
from node.storage.keys import KeyringProvider
from node.storage.store import ObjectStore

from .pki import make_pki


def _log(root: Path, keys: list[bytes]) -> AuditLog:
    store = ObjectStore(root / "store", KeyringProvider(keys))
    return AuditLog.for_data_dir(root, store, "AINODE")


def _writer(root: str, keys: list[bytes], count: int, start: multiprocessing.synchronize.Event) -> None:
    log = _log(Path(root), keys)
    start.wait()
    for n in range(count):
        log.record(AuditEvent(SECURITY_ALERT, "E", description=f"record {n}"))


def test_ids_unique_across_concurrent_writers_and_rewrap_loses_nothing(tmp_path):
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    writers = [context.Process(target=_writer, args=(str(tmp_path), [old], 60, start)) for _ in range(4)]
    for process in writers:
        process.start()
    rewrapper = _log(tmp_path, [new, old])  # a rotation re-wraps while the others append
    start.set()
    rewrapped = 0
    while any(p.is_alive() for p in writers):
        rewrapped += rewrapper.rewrap()
    for process in writers:
        process.join(30)
        assert process.exitcode == 0
    rewrapper.rewrap()
    ids = rewrapper.record_ids()
    assert len(ids) == 4 * 60  # not one record lost to a concurrent rewrite
    assert len(set(ids)) == len(ids)  # every id (the encryption's associated data) unique
    assert len(rewrapper.read()) == 240
    assert rewrapper.key_ids() == {KeyringProvider([new]).current().key_id}
    assert rewrapped > 0


class _Collector:
    """A TLS syslog collector (RFC 5425 octet-counted frames) on loopback, for one client."""

    def __init__(self, pki, require_client_certificate: bool = True) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(pki.server.certificate), str(pki.server.key))
        context.load_verify_locations(str(pki.ca))
        context.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_NONE
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.context = context
        self.frames: list[bytes] = []
        self.client_subject: object = None
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        raw, _ = self.listener.accept()
        try:
            conn = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):  # the client refused our certificate: nothing is received
            raw.close()
            return
        with conn:
            self.client_subject = conn.getpeercert()
            buffer = b""
            conn.settimeout(20)
            while not self.done.is_set():
                try:
                    chunk = conn.recv(65536)
                except (TimeoutError, OSError):
                    break
                if not chunk:
                    break
                buffer += chunk
                while b" " in buffer:
                    length, _, rest = buffer.partition(b" ")
                    if len(rest) < int(length):
                        break
                    self.frames.append(rest[: int(length)])
                    buffer = rest[int(length) :]


def test_syslog_mirror_over_tls_delivers_framed_audit_messages(tmp_path):
    pki = make_pki(tmp_path / "pki")
    collector = _Collector(pki)
    settings = SyslogSettings(
        host="127.0.0.1", port=collector.port, ca_certificates=pki.ca,
        certificate=pki.client.certificate, private_key=pki.client.key,
    )  # fmt: skip
    sender = SyslogSender(settings)
    store = ObjectStore(tmp_path / "store", KeyringProvider([secrets.token_bytes(32)]))
    log = AuditLog.for_data_dir(tmp_path, store, "AINODE", sender)
    study_uid = "1.2.826.0.1.3680043.8.498.1234567890"
    for n in range(5):
        log.record(study_event(INSTANCES_TRANSFERRED, "C", study_uid, f"instances received {n}"))
    assert sender.flush(20)
    deadline = threading.Event()
    for _ in range(100):
        if len(collector.frames) >= 5:
            break
        deadline.wait(0.1)
    collector.done.set()
    assert len(collector.frames) == 5
    for n, frame in enumerate(collector.frames):
        text = frame.decode()
        assert text.startswith("<85>1 ") and " ainode - IHE+RFC-3881 - " in text  # RFC 5424, facility 10
        assert "<AuditMessage>" in text and f"instances received {n}" in text
    assert collector.client_subject  # the node presented its certificate (mutual TLS)
    local = log.read()  # and the encrypted local log has them all too
    assert len(local) == 5 and study_uid in local[0]
    assert study_uid.encode() not in (tmp_path / "audit" / "audit.log").read_bytes()


def test_syslog_client_refuses_a_collector_whose_certificate_it_cannot_check(tmp_path):
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other")  # a collector with a certificate from another CA
    collector = _Collector(other, require_client_certificate=False)
    sender = SyslogSender(SyslogSettings(host="127.0.0.1", port=collector.port, ca_certificates=pki.ca))
    sender.send("<AuditMessage>secret study</AuditMessage>", 0)
    assert not sender.flush(2)  # never handed over: the handshake fails, the record stays queued
    assert collector.frames == []


@pytest.mark.parametrize(
    ("audit", "expected"),
    [
        ({"syslog": {"host": "127.0.0.1", "transport": "udp"}}, "sends the audit trail (with Study Instance UIDs)"),
        ({"syslog": {"host": "127.0.0.1"}}, "ca_certificates: needed"),
    ],
)
def test_plaintext_or_unchecked_syslog_is_refused_at_load(tmp_path, audit, expected):
    import yaml

    path = tmp_path / "ainode.yaml"
    path.write_text(yaml.safe_dump({"keys": {"provider": "env"}, "audit": audit}))
    with pytest.raises(ConfigError, match=re.escape(expected)) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}:")


def test_plaintext_udp_only_with_the_explicit_opt_in(tmp_path):
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(10)
    settings = SyslogSettings(
        host="127.0.0.1", port=receiver.getsockname()[1], transport="udp", allow_plaintext_udp=True
    )
    sender = SyslogSender(settings)
    sender.send("<AuditMessage/>", 0)
    data, _ = receiver.recvfrom(65536)
    assert b"<AuditMessage/>" in data
