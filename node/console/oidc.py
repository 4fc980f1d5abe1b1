"""Optional single sign-on through the site's OpenID Connect provider (``console.oidc``).

OpenID Connect Core 1.0, authorization code flow with PKCE (RFC 7636, S256): the provider's
endpoints from its discovery document; the ID token's signature checked against the provider's
published keys (joserfc), and its issuer, audience, expiry and nonce; the user's role from a
claim (``role_claim``) mapped through ``roles`` (the highest granted role applies; a user granted
none is refused). A signed-in OIDC user is a console user without a password: the role is taken
afresh at every login. The client secret comes from the environment (``client_secret_env``).
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from node.console.auth import SESSION_COOKIE, new_token
from node.errors import AuthenticationError, ConfigError
from node.settings.models import OidcSettings
from node.storage.tables import Role

PENDING_S = 600.0
ROLE_ORDER = (Role.ADMIN, Role.OPERATOR, Role.VIEWER)


@dataclass(frozen=True)
class _Pending:
    nonce: str
    verifier: str
    next: str
    created: float


class OidcLogin:
    """The relying party of one provider (see the module docstring).

    Parameters
    ----------
    settings
        The ``console.oidc`` section.
    """

    def __init__(self, settings: OidcSettings) -> None:
        self.settings = settings
        self._metadata: dict[str, Any] | None = None
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    def metadata(self) -> dict[str, Any]:
        """The provider's discovery document (fetched once).

        Raises
        ------
        AuthenticationError
            The provider cannot be reached or names another issuer.
        """
        if self._metadata is None:
            url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                document = httpx.get(url, timeout=10).raise_for_status().json()
            except (httpx.HTTPError, ValueError) as exc:
                raise AuthenticationError(f"single sign-on unavailable: {type(exc).__name__}") from None
            if document.get("issuer") != self.settings.issuer:
                raise AuthenticationError("single sign-on unavailable: the provider names another issuer")
            self._metadata = document
        return self._metadata

    def start(self, redirect_uri: str, next_path: str) -> tuple[str, str]:
        """The provider's authorization URL for a new sign-in, and its ``state``."""
        state, nonce, verifier = new_token(), new_token(), new_token()
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        now = time.time()
        with self._lock:
            self._pending = {k: p for k, p in self._pending.items() if now - p.created < PENDING_S}
            self._pending[state] = _Pending(nonce, verifier, next_path, now)
        query = {
            "response_type": "code", "client_id": self.settings.client_id, "redirect_uri": redirect_uri,
            "scope": " ".join(self.settings.scopes), "state": state, "nonce": nonce,
            "code_challenge": challenge, "code_challenge_method": "S256",
        }  # fmt: skip
        return f"{self.metadata()['authorization_endpoint']}?{urllib.parse.urlencode(query)}", state

    def finish(self, redirect_uri: str, state: str, code: str) -> tuple[str, Role, str]:
        """Exchange ``code`` for tokens and check the ID token; returns the user name, role and
        where to go next.

        Raises
        ------
        AuthenticationError
            Unknown or expired ``state``, a refused exchange, an invalid ID token, or no role.
        """
        with self._lock:
            pending = self._pending.pop(state, None)
        if pending is None or time.time() - pending.created > PENDING_S:
            raise AuthenticationError("the single sign-on attempt expired or did not start here; try again")
        secret = os.environ.get(self.settings.client_secret_env)
        if not secret:
            raise ConfigError(f"console.oidc: the client secret is not in ${self.settings.client_secret_env}")
        metadata = self.metadata()
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "code_verifier": pending.verifier}  # fmt: skip
        try:
            tokens = httpx.post(metadata["token_endpoint"], data=form, auth=(self.settings.client_id, secret),
                                timeout=10).raise_for_status().json()  # fmt: skip
            keys = KeySet.import_key_set(httpx.get(metadata["jwks_uri"], timeout=10).raise_for_status().json())
            token = jwt.decode(tokens["id_token"], keys)
            jwt.JWTClaimsRegistry(
                leeway=60, iss={"essential": True, "value": self.settings.issuer},
                aud={"essential": True, "value": self.settings.client_id},
                nonce={"essential": True, "value": pending.nonce}, exp={"essential": True},
            ).validate(token.claims)  # fmt: skip
        except (httpx.HTTPError, ValueError, KeyError, JoseError) as exc:
            raise AuthenticationError(f"single sign-on refused: {type(exc).__name__}: {exc}") from None
        claims = token.claims
        name = str(claims.get(self.settings.username_claim) or claims["sub"])[:64]
        return name, self.role_of(claims), pending.next

    def role_of(self, claims: dict[str, Any]) -> Role:
        """The highest role the claims grant.

        Raises
        ------
        AuthenticationError
            None is granted.
        """
        held = claims.get(self.settings.role_claim) or []
        values = {held} if isinstance(held, str) else {str(v) for v in held}
        for role in ROLE_ORDER:
            if values & set(self.settings.roles.get(role.value, [])):
                return role
        raise AuthenticationError("your single sign-on account has no ainode role")


def label(request: Request) -> str | None:
    """The sign-in button's label when OIDC is configured."""
    login: OidcLogin | None = getattr(request.app.state, "oidc", None)
    return login.settings.label if login is not None else None


def _redirect_uri(request: Request) -> str:
    return str(request.url_for("oidc_callback"))


def install(app: FastAPI) -> None:
    """The two routes of the flow: ``/login/oidc`` (to the provider) and its callback."""

    @app.get("/login/oidc", include_in_schema=False)
    def oidc_start(request: Request, next: str = "/") -> Response:
        login: OidcLogin | None = getattr(request.app.state, "oidc", None)
        if login is None:
            raise AuthenticationError("single sign-on is not configured")
        target = next if next.startswith("/") and not next.startswith("//") else "/"
        url, _state = login.start(_redirect_uri(request), target)
        return RedirectResponse(url, status_code=303)

    @app.get("/login/oidc/callback", name="oidc_callback", include_in_schema=False)
    def oidc_callback(request: Request, state: str = "", code: str = "") -> Response:
        from node.console.web import address, authenticator, set_cookie

        login: OidcLogin | None = getattr(request.app.state, "oidc", None)
        if login is None:
            raise AuthenticationError("single sign-on is not configured")
        name, role, target = login.finish(_redirect_uri(request), state, code)
        auth = authenticator(request)
        user = auth.index.user(name)
        if user is None:
            auth.index.add_user(name, role, None)
        elif user.password_hash is not None:
            raise AuthenticationError(f"{name!r} is a local user; sign in with the password")
        elif user.role != role:
            auth.index.update_user(name, role=role)
        user = auth.index.user(name)
        assert user is not None
        token, _current = auth.start_session(user, address(request))
        response = RedirectResponse(target, status_code=303)
        set_cookie(response, request, SESSION_COOKIE, token, int(auth.settings.session_max_s))
        return response
