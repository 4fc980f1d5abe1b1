"""The audit trail's mirror to the site's ATNA repository: syslog (RFC 5424) over TLS (RFC 5425).

Audit messages name studies by their Study Instance UID, so they travel only over TLS with the
collector's certificate checked against the configured CA (and the node's client certificate when
one is configured, as IHE ATNA's mutual authentication asks). Plain UDP (RFC 5426) sends them in
clear and is used only when the configuration says so explicitly (``allow_plaintext_udp``).

Messages are queued and sent by a background thread, so a slow or absent collector never delays a
C-STORE or a job; the encrypted local log always has every record. When the queue is full (the
collector has been away for long), the oldest messages are dropped with a warning.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import socket
import ssl
import threading
import time

from node.errors import ConfigError
from node.settings.config import SyslogSettings

logger = logging.getLogger(__name__)

QUEUE_LIMIT = 10000
RECONNECT_S = 5.0


def format_message(xml: str, outcome: int, hostname: str | None = None) -> bytes:
    """An RFC 5424 message carrying one DICOM audit message (facility 10, security/authorization;
    notice for success, warning otherwise; APP-NAME ainode, MSGID IHE+RFC-3881)."""
    severity = 5 if outcome == 0 else 4
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    host = hostname or socket.gethostname()
    return f"<{10 * 8 + severity}>1 {stamp} {host} ainode - IHE+RFC-3881 - \ufeff{xml}".encode()


def client_context(settings: SyslogSettings) -> ssl.SSLContext:
    """TLS context of the syslog client: TLS 1.2+, the collector's certificate and host name checked
    against ``ca_certificates``, the node's certificate presented when configured.

    Raises
    ------
    ConfigError
        A certificate, key or CA file cannot be loaded.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(str(settings.ca_certificates))
        if settings.certificate is not None and settings.private_key is not None:
            context.load_cert_chain(str(settings.certificate), str(settings.private_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"audit.syslog: cannot load certificate, key or CA: {exc}") from None
    return context


class SyslogSender:
    """Sends audit messages to one collector from a background thread.

    Parameters
    ----------
    settings
        Collector address and transport (``tls`` with RFC 5425 octet-counting framing, or ``udp``).
    """

    def __init__(self, settings: SyslogSettings) -> None:
        self.settings = settings
        self._context = client_context(settings) if settings.transport == "tls" else None
        self._queue: queue.Queue[bytes] = queue.Queue(QUEUE_LIMIT)
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="ainode-syslog", daemon=True)
        self._thread.start()

    def send(self, xml: str, outcome: int) -> None:
        """Queue one audit message (never blocks)."""
        message = format_message(xml, outcome)
        while True:
            try:
                self._queue.put_nowait(message)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    logger.warning("audit syslog queue full: oldest message dropped (the local log has it)")
                except queue.Empty:
                    continue

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued message was handed to the collector; returns whether it was."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.05)
        return False

    def _connect(self) -> socket.socket:
        address = (self.settings.host, self.settings.port)
        if self._context is None:
            sock = socket.socket(socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect(address)
            return sock
        raw = socket.create_connection(address, timeout=10)
        try:
            return self._context.wrap_socket(raw, server_hostname=self.settings.host)
        except (ssl.SSLError, OSError):
            raw.close()
            raise

    def _run(self) -> None:
        pending: bytes | None = None
        while True:
            if pending is None:
                pending = self._queue.get()
            try:
                if self._sock is None:
                    self._sock = self._connect()
                if self._context is None:
                    self._sock.send(pending)
                else:
                    self._sock.sendall(f"{len(pending)} ".encode() + pending)  # RFC 5425 4.3: MSG-LEN SP
            except (OSError, ssl.SSLError) as exc:
                logger.warning("audit record not sent to syslog (retrying): %s", getattr(exc, "reason", None) or exc)
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                time.sleep(RECONNECT_S)
                continue
            pending = None
            self._queue.task_done()
