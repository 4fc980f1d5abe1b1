"""The ``console:`` section: the web console and JSON API, their login, single sign-on and HTTPS."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from node.settings.types import Port


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConsoleTLS(_Model):
    """HTTPS for the console (served by uvicorn): the server certificate chain and its key (PEM)."""

    certificate: Path
    private_key: Path


ConsoleRole = Literal["admin", "operator", "viewer"]


class OidcSettings(_Model):
    """Optional sign-in through the site's OpenID Connect provider (authorization code flow with
    PKCE). The client secret comes from the environment variable ``client_secret_env``."""

    issuer: Annotated[str, Field(pattern=r"^https?://")] = Field(
        description="the provider's issuer URL (its /.well-known/openid-configuration is read)"
    )
    client_id: str
    client_secret_env: str = "AINODE_OIDC_CLIENT_SECRET"
    scopes: list[str] = ["openid", "profile", "email"]
    username_claim: str = "preferred_username"
    role_claim: str = Field(default="groups", description="claim holding the user's groups or roles")
    roles: dict[ConsoleRole, list[str]] = Field(
        description="console role -> claim values that grant it (the highest granted role applies; none: refused)"
    )
    label: str = "Sign in with single sign-on"
    redirect_uri: Annotated[str, Field(pattern=r"^https?://[^/]+/login/oidc/callback$")] = Field(
        description="the console's callback as registered with the provider, e.g. "
        "https://ainode.example.org/login/oidc/callback (never taken from a request's Host header)"
    )
    recheck_s: Annotated[float, Field(gt=0)] = Field(
        default=300.0, description="how often a signed-in user's role is checked again at the provider (refresh "
        "token); a session that cannot be re-checked ends then"
    )  # fmt: skip

    @model_validator(mode="after")
    def _https(self) -> OidcSettings:
        host = self.issuer.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
        if self.issuer.startswith("http://") and host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("issuer: must be https:// (plain http only for a provider on loopback)")
        return self


class ConsoleSettings(_Model):
    """The console: web pages and JSON API behind a login, ``/metrics``, ``/healthz``, ``/readyz``
    (off without a port). Bound to loopback by default; anywhere else it needs HTTPS (``tls``)
    or an HTTPS proxy in front of it (``tls_terminated_by_proxy``)."""

    host: str = Field(default="127.0.0.1", description="address to bind; loopback unless a proxy or scraper needs more")
    port: Port | None = Field(default=None, description="TCP port of the console (e.g. 8080); none: not served")
    tls: ConsoleTLS | None = None
    tls_terminated_by_proxy: bool = Field(
        default=False,
        description="reached only through an HTTPS reverse proxy (Ingress): plain HTTP here, Secure cookies",
    )
    session_idle_s: Annotated[float, Field(gt=0)] = 1800.0
    session_max_s: Annotated[float, Field(gt=0)] = 43200.0
    max_failed_logins: Annotated[int, Field(ge=1, le=100)] = 5
    lockout_s: Annotated[float, Field(ge=0)] = 900.0
    max_concurrent_logins: Annotated[int, Field(ge=1, le=64)] = Field(
        default=2, description="password verifications at once (argon2id takes 64 MiB each); more wait, then 429"
    )
    max_failures_per_address: Annotated[int, Field(ge=1)] = Field(
        default=20, description="failed sign-ins from one address within lockout_s before it is refused (429)"
    )
    trusted_proxies: list[str] = Field(
        default=[], description="addresses of reverse proxies whose X-Forwarded-For is believed (none: no proxy)"
    )
    oidc: OidcSettings | None = None

    @model_validator(mode="after")
    def _not_in_clear(self) -> ConsoleSettings:
        loopback = self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")
        if self.port is not None and not loopback and self.tls is None and not self.tls_terminated_by_proxy:
            raise ValueError(
                f"host: {self.host!r} would serve the console's login in clear; set console.tls, or "
                "tls_terminated_by_proxy: true behind an HTTPS proxy, or bind to 127.0.0.1"
            )
        return self

    @property
    def secure_cookies(self) -> bool:
        """Whether browsers reach the console over HTTPS (cookies are then marked Secure)."""
        return self.tls is not None or self.tls_terminated_by_proxy
