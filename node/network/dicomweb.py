"""The DICOMweb client side (PS3.18): STOW-RS of result objects to an archive, through
``dicomweb-client`` over a ``requests`` session that carries the configured authentication.

Authentication (:class:`node.settings.config.HttpAuth`): HTTP basic, a bearer token, or OAuth
2.0 client credentials through Authlib (its session fetches a token, caches it per token
endpoint and client, and fetches a new one when it expires). Secrets are read from the
environment at each use, never from the configuration file; a missing one is a clear error.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset

from node.errors import ConfigError, DeliveryError
from node.settings.config import HttpAuth

logger = logging.getLogger(__name__)

_OAUTH_SESSIONS: dict[tuple[str, str, str], Any] = {}
_OAUTH_LOCK = threading.Lock()


def _secret(variable: str | None) -> str:
    value = os.environ.get(variable or "")
    if not value:
        raise ConfigError(f"environment variable {variable} (named by an auth setting) is not set")
    return value


def http_session(auth: HttpAuth, ca_certificates: Path | None = None) -> requests.Session:
    """A ``requests`` session that authenticates as ``auth`` says and verifies TLS against
    ``ca_certificates`` (else the system's CAs).

    Raises
    ------
    ConfigError
        A secret's environment variable is not set.
    DeliveryError
        The OAuth token endpoint refused the client credentials.
    """
    session: requests.Session
    if auth.type == "oauth2":
        session = _oauth_session(auth, ca_certificates)
    else:
        session = requests.Session()
        if auth.type == "basic":
            session.auth = (auth.username or "", _secret(auth.password_env))
        elif auth.type == "bearer":
            session.headers["Authorization"] = f"Bearer {_secret(auth.token_env)}"
    session.verify = str(ca_certificates) if ca_certificates else True
    return session


def _oauth_session(auth: HttpAuth, ca_certificates: Path | None) -> requests.Session:
    """The cached OAuth 2.0 client-credentials session of ``auth`` (a token fetched on first use;
    Authlib fetches a new one when it has expired)."""
    from authlib.integrations.base_client.errors import OAuthError
    from authlib.integrations.requests_client import OAuth2Session

    secret = _secret(auth.client_secret_env)
    key = (auth.token_url or "", auth.client_id or "", auth.scope or "")
    with _OAUTH_LOCK:
        session = _OAUTH_SESSIONS.get(key)
        if session is None or session.client_secret != secret:
            session = OAuth2Session(auth.client_id, secret, scope=auth.scope, token_endpoint=auth.token_url,
                                    grant_type="client_credentials")  # fmt: skip
            session.verify = str(ca_certificates) if ca_certificates else True
            try:
                session.fetch_token(auth.token_url, grant_type="client_credentials")
            except (OAuthError, requests.RequestException) as exc:
                raise DeliveryError(f"OAuth token endpoint refused the client credentials: {exc}"[:300]) from None
            _OAUTH_SESSIONS[key] = session
        return session


@dataclass
class StowOutcome:
    """What a STOW-RS request stored: the SOP Instance UIDs stored and, for those it did not,
    the failure reason (PS3.18 Failed SOP Sequence, Failure Reason). In memory only."""

    stored: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def web_client(url: str, session: requests.Session, timeout_s: float) -> DICOMwebClient:
    """A ``dicomweb-client`` for the DICOMweb service ``url`` that makes each request once.

    dicomweb-client otherwise repeats a request that failed (a connection refused, HTTP 408, 429,
    503, 504) four more times, backing off 2, 4, 8 and 16 s: 30 s inside one attempt, unseen by the
    node's own policy (``delivery.max_attempts``, ``backoff_s``; a retrieve's next try), which then
    waits on top of it.
    """
    client = DICOMwebClient(url, session=session, timeout=timeout_s)
    client.set_http_retry_params(retry=False)
    return client


def stow(url: str, session: requests.Session, objects: list[Dataset], timeout_s: float) -> StowOutcome:
    """Store ``objects`` at the DICOMweb service ``url`` (one multipart/related request).

    Raises
    ------
    DeliveryError
        The service answered an HTTP error (its status is the reason) or could not be reached.
    """
    client = web_client(url, session, timeout_s)
    try:
        response = client.store_instances(objects)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        reason = exc.response.reason if exc.response is not None else ""
        raise DeliveryError(f"STOW-RS refused: HTTP {status} {reason}".strip()) from None
    except requests.RequestException as exc:
        raise DeliveryError(f"STOW-RS: {url} cannot be reached ({type(exc).__name__})") from None
    outcome = StowOutcome()
    for item in response.get("ReferencedSOPSequence", []):
        outcome.stored.append(str(item.get("ReferencedSOPInstanceUID", "")))
    for item in response.get("FailedSOPSequence", []):
        reason = item.get("FailureReason")
        outcome.failed[str(item.get("ReferencedSOPInstanceUID", ""))] = f"0x{int(reason):04X}" if reason else "?"
    return outcome
