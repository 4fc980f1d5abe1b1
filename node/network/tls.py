"""DICOM TLS (PS3.15 B.12, BCP 195): TLS 1.2 minimum, 1.3 preferred, ECDHE with AES-GCM or ChaCha20.

The server context requires and verifies client certificates against the configured CA when
mutual TLS is on; the client context verifies the peer's certificate chain against the same CA
and presents the node's own certificate. A handshake failure on the server side is reported to a
callback (an audit security alert) before the connection is dropped.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from node.errors import ConfigError
from node.settings.models import TLSSettings

BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class _ReportingContext(ssl.SSLContext):
    """An SSLContext that tells ``on_failure`` about failed server-side handshakes."""

    on_failure: Callable[[str, str], None] | None = None

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        try:
            address = str(sock.getpeername()[0])
        except OSError:
            address = "unknown"
        try:
            return super().wrap_socket(sock, *args, **kwargs)
        except (ssl.SSLError, OSError) as exc:
            if self.on_failure is not None:
                self.on_failure(address, getattr(exc, "reason", None) or type(exc).__name__)
            raise


def _base(context: ssl.SSLContext, tls: TLSSettings) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)  # TLS 1.2 suites; TLS 1.3 suites are all AEAD already
    try:
        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
        if tls.ca_certificates is not None:
            context.load_verify_locations(str(tls.ca_certificates))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"node.tls: cannot load certificate, key or CA: {exc}") from None
    return context


def server_context(tls: TLSSettings, on_failure: Callable[[str, str], None] | None = None) -> ssl.SSLContext:
    """TLS context of the Storage SCP."""
    context = _base(_ReportingContext(ssl.PROTOCOL_TLS_SERVER), tls)
    if tls.require_client_certificate:
        if tls.ca_certificates is None:
            raise ConfigError("node.tls.ca_certificates: needed to verify client certificates")
        context.verify_mode = ssl.CERT_REQUIRED
    context.on_failure = on_failure  # type: ignore[attr-defined]
    return context


def client_context(tls: TLSSettings) -> ssl.SSLContext:
    """TLS context of the SCU that sends results (verifies the peer against the CA)."""
    context = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), tls)
    context.check_hostname = False  # DICOM peers are configured by address; the chain is verified
    context.verify_mode = ssl.CERT_REQUIRED if tls.ca_certificates is not None else ssl.CERT_NONE
    return context


def subject_of(certificate: dict[str, Any] | None) -> str | None:
    """``CN=...,O=...`` of a peer certificate as returned by ``SSLSocket.getpeercert()``."""
    if not certificate:
        return None
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C"}
    parts = [f"{short.get(k, k)}={v}" for rdn in certificate.get("subject", ()) for k, v in rdn]
    return ",".join(parts)
