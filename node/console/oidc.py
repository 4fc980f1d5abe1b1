"""Optional single sign-on through the site's OpenID Connect provider (``console.oidc``).

OpenID Connect Core 1.0, authorization code flow with PKCE (RFC 7636, S256): the provider's
endpoints from its discovery document; the ID token's signature checked against the provider's
published keys (joserfc), and its issuer, audience, expiry and nonce; the user's role from a
claim (``role_claim``) mapped through ``roles`` (the highest granted role applies; a user granted
none is refused). A signed-in OIDC user is a console user without a password.

- **Bound to the browser**: the ``state`` of a sign-in is also set in an HttpOnly cookie
  (SameSite=Lax: sent on the provider's redirect back), and the callback is refused unless the
  browser presents it, so a callback link made by someone else cannot sign a victim in as them
  (login CSRF, RFC 6749 10.12). At most :data:`MAX_PENDING` sign-ins wait at once (oldest first out).
- **The redirect URI** is ``redirect_uri`` from the configuration, never built from a request.
- **Roles re-checked**: every ``recheck_s`` a session's role is asked of the provider again with
  the refresh token (RFC 6749 6); a user whose groups no longer grant that role, or whose refresh
  is refused, has the session ended; with no refresh token the session ends at the first re-check.

The client secret comes from the environment (``client_secret_env``).
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from node.console.auth import SESSION_COOKIE, check_user_name, new_token, tokens_equal
from node.errors import AuthenticationError, ConfigError
from node.settings.models import OidcSettings
from node.storage.tables import Role

PENDING_S = 600.0
MAX_PENDING = 1000
STATE_COOKIE = "ainode_oidc_state"
ROLE_ORDER = (Role.ADMIN, Role.OPERATOR, Role.VIEWER)


@dataclass(frozen=True)
class _Pending:
    nonce: str
    verifier: str
    next: str
    created: float


@dataclass
class _Grant:
    """What a signed-in OIDC session needs for its re-check."""

    role: Role
    refresh_token: str | None
    checked: float


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
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._grants: dict[str, _Grant] = {}
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
                raise AuthenticationError(f"single sign-on unavailable: {type(exc).__name__}", "sso") from None
            if document.get("issuer") != self.settings.issuer:
                raise AuthenticationError("single sign-on unavailable: the provider names another issuer", "sso")
            self._metadata = document
        return self._metadata

    def start(self, next_path: str) -> tuple[str, str]:
        """The provider's authorization URL for a new sign-in, and its ``state`` (to be set in the
        browser's :data:`STATE_COOKIE`)."""
        state, nonce, verifier = new_token(), new_token(), new_token()
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        now = time.time()
        with self._lock:
            while self._pending and (len(self._pending) >= MAX_PENDING or self._oldest_expired(now)):
                self._pending.popitem(last=False)
            self._pending[state] = _Pending(nonce, verifier, next_path, now)
        query = {
            "response_type": "code", "client_id": self.settings.client_id, "redirect_uri": self.settings.redirect_uri,
            "scope": " ".join(self.settings.scopes), "state": state, "nonce": nonce,
            "code_challenge": challenge, "code_challenge_method": "S256",
        }  # fmt: skip
        return f"{self.metadata()['authorization_endpoint']}?{urllib.parse.urlencode(query)}", state

    def _oldest_expired(self, now: float) -> bool:
        return now - next(iter(self._pending.values())).created > PENDING_S

    def finish(self, state: str, browser_state: str | None, code: str) -> tuple[str, Role, str, str | None]:
        """Exchange ``code`` for tokens and check the ID token; returns the user name, role, where
        to go next and the refresh token (if the provider gave one).

        Raises
        ------
        AuthenticationError
            ``state`` unknown, expired or not the one this browser started (``browser_state``),
            a refused exchange, an invalid ID token, or no role.
        """
        with self._lock:
            pending = self._pending.pop(state, None) if tokens_equal(state, browser_state) else None
        if pending is None or time.time() - pending.created > PENDING_S:
            raise AuthenticationError("the single sign-on attempt expired or did not start in this browser",
                                      "sso-expired")  # fmt: skip
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.settings.redirect_uri,
                "code_verifier": pending.verifier}  # fmt: skip
        tokens, claims = self._tokens(form, pending.nonce)
        name = str(claims.get(self.settings.username_claim) or claims["sub"])[:64]
        refresh = tokens.get("refresh_token")
        return name, self.role_of(claims), pending.next, str(refresh) if refresh else None

    def _tokens(self, form: dict[str, str], nonce: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The token endpoint's answer to ``form`` and the checked claims of its ID token."""
        secret = os.environ.get(self.settings.client_secret_env)
        if not secret:
            raise ConfigError(f"console.oidc: the client secret is not in ${self.settings.client_secret_env}")
        metadata = self.metadata()
        try:
            tokens = httpx.post(metadata["token_endpoint"], data=form, auth=(self.settings.client_id, secret),
                                timeout=10).raise_for_status().json()  # fmt: skip
            keys = KeySet.import_key_set(httpx.get(metadata["jwks_uri"], timeout=10).raise_for_status().json())
            token = jwt.decode(tokens["id_token"], keys)
            expected: dict[str, Any] = {
                "iss": {"essential": True, "value": self.settings.issuer},
                "aud": {"essential": True, "value": self.settings.client_id}, "exp": {"essential": True},
            }  # fmt: skip
            if nonce is not None:
                expected["nonce"] = {"essential": True, "value": nonce}
            jwt.JWTClaimsRegistry(leeway=60, **expected).validate(token.claims)
        except (httpx.HTTPError, ValueError, KeyError, JoseError) as exc:
            raise AuthenticationError(f"single sign-on refused: {type(exc).__name__}: {exc}", "sso") from None
        return tokens, token.claims

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
        raise AuthenticationError("your single sign-on account has no ainode role", "no-role")

    def granted(self, token_digest: str, role: Role, refresh_token: str | None) -> None:
        """Remember a new session's role and refresh token for its re-checks."""
        with self._lock:
            self._grants[token_digest] = _Grant(role, refresh_token, time.monotonic())

    def still_granted(self, token_digest: str) -> bool:
        """Whether the session ``token_digest`` of a single sign-on user may go on: true until its
        re-check is due, then whether the provider's refreshed claims still grant its role."""
        with self._lock:
            grant = self._grants.get(token_digest)
        if grant is None:
            return False  # signed in before this process started: sign in again
        if time.monotonic() - grant.checked < self.settings.recheck_s:
            return True
        if grant.refresh_token is None:
            return self._forget(token_digest)
        try:
            tokens, claims = self._tokens({"grant_type": "refresh_token", "refresh_token": grant.refresh_token}, None)
            if self.role_of(claims) != grant.role:
                return self._forget(token_digest)
        except (AuthenticationError, ConfigError):
            return self._forget(token_digest)
        with self._lock:
            grant.checked = time.monotonic()
            grant.refresh_token = str(tokens.get("refresh_token") or grant.refresh_token)
        return True

    def _forget(self, token_digest: str) -> bool:
        with self._lock:
            self._grants.pop(token_digest, None)
        return False


def label(request: Request) -> str | None:
    """The sign-in button's label when OIDC is configured."""
    login: OidcLogin | None = getattr(request.app.state, "oidc", None)
    return login.settings.label if login is not None else None


def install(app: FastAPI) -> None:
    """The two routes of the flow: ``/login/oidc`` (to the provider) and its callback."""

    @app.get("/login/oidc", include_in_schema=False)
    def oidc_start(request: Request, next: str = "/") -> Response:
        from node.console.web import set_cookie

        login: OidcLogin | None = getattr(request.app.state, "oidc", None)
        if login is None:
            raise AuthenticationError("single sign-on is not configured", "sso")
        target = next if next.startswith("/") and not next.startswith("//") else "/"
        url, state = login.start(target)
        response = RedirectResponse(url, status_code=303)
        set_cookie(response, request, STATE_COOKIE, state, int(PENDING_S), samesite="lax")
        return response

    @app.get("/login/oidc/callback", name="oidc_callback", include_in_schema=False)
    def oidc_callback(request: Request, state: str = "", code: str = "") -> Response:
        from node.console.web import address, authenticator, set_cookie

        login: OidcLogin | None = getattr(request.app.state, "oidc", None)
        if login is None:
            raise AuthenticationError("single sign-on is not configured", "sso")
        name, role, target, refresh = login.finish(state[:128], request.cookies.get(STATE_COOKIE), code[:4096])
        try:
            check_user_name(name)
        except ConfigError:
            raise AuthenticationError("the provider's user name is not one ainode accepts", "sso") from None
        auth = authenticator(request)
        user = auth.index.user(name)
        if user is None:
            auth.index.add_user(name, role, None)
        elif user.password_hash is not None:
            raise AuthenticationError(f"{name!r} is a local user; sign in with the password", "local-user")
        elif user.role != role:
            auth.index.update_user(name, role=role)
        user = auth.index.user(name)
        assert user is not None
        token, current = auth.start_session(user, address(request))
        login.granted(current.token_digest, role, refresh)
        response = RedirectResponse(target, status_code=303)
        set_cookie(response, request, SESSION_COOKIE, token, int(auth.settings.session_max_s))
        response.delete_cookie(STATE_COOKIE, path="/")
        return response
