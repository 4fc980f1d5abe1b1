"""A throw-away PKI for DICOM TLS tests: a CA, a server and client certificates, and a rogue CA.

RSA keys: DCMTK's BCP 195 profile offers only ECDHE-RSA suites for TLS 1.2."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Identity:
    """A certificate and its key as PEM files."""

    certificate: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """CA certificate plus identities signed by it, and one signed by a CA nobody trusts."""

    ca: Path
    server: Identity
    client: Identity
    rogue_client: Identity


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ainode-test")]
    )


def _ca(cn: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue(folder: Path, name: str, cn: str, ca: tuple[x509.Certificate, rsa.RSAPrivateKey], server: bool) -> Identity:
    ca_cert, ca_key = ca
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    identity = Identity(folder / f"{name}.crt", folder / f"{name}.key")
    identity.certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    identity.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    identity.key.chmod(0o600)
    return identity


def make_pki(folder: Path) -> Pki:
    """Write a test PKI into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca("ainode test CA")
    rogue = _ca("rogue CA")
    (folder / "ca.crt").write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    return Pki(
        ca=folder / "ca.crt",
        server=_issue(folder, "server", "ainode", ca, server=True),
        client=_issue(folder, "client", "modality1", ca, server=True),
        rogue_client=_issue(folder, "rogue", "modality1", rogue, server=False),
    )
