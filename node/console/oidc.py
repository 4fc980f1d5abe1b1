"""Optional single sign-on through the site's OpenID Connect provider (``console.oidc``).

The flow is Authlib's Starlette client (OpenID Connect Core 1.0, authorization code flow with
PKCE S256): the provider's endpoints from its discovery document, ``state`` and ``nonce``, the
ID token's signature against the provider's published keys and its issuer, audience, expiry and
nonce. ainode adds only what is its own: the user's role from a claim (``role_claim``) mapped
through ``roles`` (the highest granted role applies; a user granted none is refused) — a signed-in
OIDC user is a console user without a password — and:

- **Bound to the browser**: Authlib keeps a sign-in's state, nonce and PKCE verifier in the
  browser's signed session cookie (Starlette's ``SessionMiddleware``, SameSite=Lax so that it
  comes back on the provider's redirect; its key is new in every process), so a callback link
  made in another browser cannot sign a victim in (login CSRF, RFC 6749 10.12); nothing waits in
  the server's memory.
- **The redirect URI** is ``redirect_uri`` from the configuration, never built from a request.
- **Roles re-checked**: every ``recheck_s`` a background thread asks the provider again with each
  session's refresh token (RFC 6749 6) and checks the new ID token; a session whose role is no
  longer granted, whose refresh is refused, that has no refresh token, or that could not be
  re-checked for two intervals (the provider unreachable) ends at its next request.

The client secret comes from the environment (``client_secret_env``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
from authlib.common.errors import AuthlibBaseError
from authlib.integrations.starlette_client import OAuth
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from joserfc.errors import JoseError
from starlette.middleware.sessions import SessionMiddleware

from node.console.auth import SESSION_COOKIE, check_user_name
from node.console.web import address, authenticator, set_cookie
from node.errors import AuthenticationError, ConfigError
from node.settings.console import OidcSettings
from node.storage.tables import Role

logger = logging.getLogger(__name__)

PENDING_S = 600
STATE_COOKIE = "ainode_oidc"
ROLE_ORDER = (Role.ADMIN, Role.OPERATOR, Role.VIEWER)
_FLOW_ERRORS = (AuthlibBaseError, JoseError, httpx.HTTPError, ValueError, KeyError)


@dataclass
class _Grant:
    """What a signed-in OIDC session needs for its re-checks."""

    role: Role
    refresh_token: str | None
    checked: float
    revoked: bool = False


class OidcLogin:
    """The relying party of one provider (see the module docstring).

    Parameters
    ----------
    settings
        The ``console.oidc`` section.
    """

    def __init__(self, settings: OidcSettings) -> None:
        self.settings = settings
        self.client: Any = OAuth().register(
            "sso", client_id=settings.client_id, client_secret=None,
            server_metadata_url=settings.issuer.rstrip("/") + "/.well-known/openid-configuration",
            client_kwargs={"scope": " ".join(settings.scopes), "code_challenge_method": "S256"},
        )  # fmt: skip
        self._grants: dict[str, _Grant] = {}
        self._lock = threading.Lock()
        self._checker: threading.Thread | None = None

    async def _ready(self) -> None:
        """The client secret from the environment, and a discovery document of our issuer.

        Raises
        ------
        ConfigError
            The secret is not set.
        AuthenticationError
            The provider cannot be reached or names another issuer.
        """
        secret = os.environ.get(self.settings.client_secret_env)
        if not secret:
            raise ConfigError(f"console.oidc: the client secret is not in ${self.settings.client_secret_env}")
        self.client.client_secret = secret
        try:
            metadata = await self.client.load_server_metadata()
        except _FLOW_ERRORS as exc:
            raise AuthenticationError(f"single sign-on unavailable: {type(exc).__name__}", "sso") from None
        if metadata.get("issuer") != self.settings.issuer:
            raise AuthenticationError("single sign-on unavailable: the provider names another issuer", "sso")

    async def start(self, request: Request, next_path: str) -> str:
        """The provider's authorization URL for a new sign-in (its state kept in the browser's session)."""
        await self._ready()
        found = await self.client.create_authorization_url(self.settings.redirect_uri)
        await self.client.save_authorize_data(request, redirect_uri=self.settings.redirect_uri, **found)
        request.session["next"] = next_path
        return str(found["url"])

    async def finish(self, request: Request) -> tuple[str, Role, str, str | None]:
        """Complete the sign-in this browser started; returns the user name, role, where to go
        next and the refresh token (if the provider gave one).

        Raises
        ------
        AuthenticationError
            Not started in this browser (or expired), a refused exchange, an invalid ID token, or no role.
        """
        await self._ready()
        try:
            token = await self.client.authorize_access_token(request)
        except AuthlibBaseError as exc:
            if getattr(exc, "error", "") == "mismatching_state":
                raise AuthenticationError("the single sign-on attempt did not start in this browser",
                                          "sso-expired") from None  # fmt: skip
            raise AuthenticationError(f"single sign-on refused: {type(exc).__name__}: {exc}", "sso") from None
        except _FLOW_ERRORS as exc:
            raise AuthenticationError(f"single sign-on refused: {type(exc).__name__}: {exc}", "sso") from None
        claims = token.get("userinfo")
        if not claims:
            raise AuthenticationError("single sign-on refused: no ID token", "sso")
        name = str(claims.get(self.settings.username_claim) or claims["sub"])[:64]
        next_path = str(request.session.pop("next", "/"))
        refresh = token.get("refresh_token")
        return name, self.role_of(claims), next_path, str(refresh) if refresh else None

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

    # -- re-checks -------------------------------------------------------------------------------

    def granted(self, token_digest: str, role: Role, refresh_token: str | None) -> None:
        """Remember a new session's role and refresh token for its re-checks."""
        with self._lock:
            self._grants[token_digest] = _Grant(role, refresh_token, time.monotonic())
            if self._checker is None:
                self._checker = threading.Thread(target=self._recheck_loop, name="ainode-oidc-recheck", daemon=True)
                self._checker.start()

    def still_granted(self, token_digest: str) -> bool:
        """Whether the session ``token_digest`` of a single sign-on user may go on (see the module docstring)."""
        with self._lock:
            grant = self._grants.get(token_digest)
            if grant is None or grant.revoked or time.monotonic() - grant.checked > 2 * self.settings.recheck_s:
                self._grants.pop(token_digest, None)
                return False
            return True

    def _recheck_loop(self) -> None:
        while True:
            time.sleep(min(self.settings.recheck_s / 4, 5.0))
            now = time.monotonic()
            with self._lock:
                due = [g for g in self._grants.values() if not g.revoked and now - g.checked >= self.settings.recheck_s]
            for grant in due:
                try:
                    grant.revoked = not asyncio.run(self._recheck(grant))
                except (AuthenticationError, ConfigError) as exc:
                    logger.warning("single sign-on re-check failed: %s", exc)
                    grant.revoked = True
                if grant.revoked:
                    logger.info("a single sign-on session ends: its role is no longer granted")
                else:
                    grant.checked = time.monotonic()

    async def _recheck(self, grant: _Grant) -> bool:
        """Refresh ``grant``'s tokens and check that the new ID token still grants its role."""
        if grant.refresh_token is None:
            return False
        await self._ready()
        try:
            token = await self.client.fetch_access_token(grant_type="refresh_token", refresh_token=grant.refresh_token)
            claims = await self.client.parse_id_token(token, nonce=None)
        except _FLOW_ERRORS as exc:
            raise AuthenticationError(f"refresh refused: {type(exc).__name__}", "sso-ended") from None
        if not claims or self.role_of(claims) != grant.role:
            return False
        grant.refresh_token = str(token.get("refresh_token") or grant.refresh_token)
        return True


def label(request: Request) -> str | None:
    """The sign-in button's label when OIDC is configured."""
    login: OidcLogin | None = getattr(request.app.state, "oidc", None)
    return login.settings.label if login is not None else None


def install(app: FastAPI, secure_cookies: bool) -> None:
    """The browser-bound session for the flow's state, and the two routes: ``/login/oidc`` (to the
    provider) and its callback."""
    app.add_middleware(SessionMiddleware, secret_key=secrets.token_urlsafe(32), session_cookie=STATE_COOKIE,
                       max_age=PENDING_S, same_site="lax", https_only=secure_cookies)  # fmt: skip

    @app.get("/login/oidc", include_in_schema=False)
    async def oidc_start(request: Request, next: str = "/") -> Response:
        login: OidcLogin | None = getattr(request.app.state, "oidc", None)
        if login is None:
            raise AuthenticationError("single sign-on is not configured", "sso")
        target = next if next.startswith("/") and not next.startswith("//") else "/"
        return RedirectResponse(await login.start(request, target), status_code=303)

    @app.get("/login/oidc/callback", name="oidc_callback", include_in_schema=False)
    async def oidc_callback(request: Request) -> Response:
        login: OidcLogin | None = getattr(request.app.state, "oidc", None)
        if login is None:
            raise AuthenticationError("single sign-on is not configured", "sso")
        name, role, target, refresh = await login.finish(request)
        try:
            check_user_name(name)
        except ConfigError:
            raise AuthenticationError("the provider's user name is not one ainode accepts", "sso") from None
        auth = authenticator(request)

        def sign_in() -> tuple[str, str]:
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
            return token, current.token_digest

        token, digest = await run_in_threadpool(sign_in)
        login.granted(digest, role, refresh)
        response = RedirectResponse(target, status_code=303)
        set_cookie(response, request, SESSION_COOKIE, token, int(auth.settings.session_max_s))
        return response
