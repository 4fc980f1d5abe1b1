"""DICOM TLS (PS3.15 B.12, BCP 195): TLS 1.2 minimum, 1.3 preferred, ECDHE with AES-GCM or ChaCha20.

The server context requires and verifies client certificates against the configured CA when
mutual TLS is on; the client context verifies the peer's certificate chain against the same CA
and presents the node's own certificate.
"""

from __future__ import annotations

import ssl
from typing import Any

from node.errors import ConfigError
from node.settings.config import TLSSettings

BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


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


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """TLS context of the Storage SCP (the handshake itself runs in
    :class:`node.network.transport.GuardedAssociationServer`, which reports failures)."""
    context = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), tls)
    if tls.require_client_certificate:
        if tls.ca_certificates is None:
            raise ConfigError("node.tls.ca_certificates: needed to verify client certificates")
        context.verify_mode = ssl.CERT_REQUIRED
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
