"""An OpenID Connect provider for the console's single sign-on tests, on loopback: discovery,
authorization endpoint (the user is already signed in: ``user`` holds their claims), token endpoint
(client secret, PKCE S256 checked; refresh-token grants answered with the user's current
claims; client-credentials grants give access tokens it can check), JWKS; ID tokens signed
RS256 with joserfc. No pytest here."""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Form, HTTPException, Request
from fastapi.responses import RedirectResponse
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from .peers import free_port, wait_for_port


@dataclass
class Provider:
    """The provider's state: its issuer URL, client, signing key and the signed-in user's claims."""

    issuer: str
    client_id: str = "ainode-console"
    client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    user: dict[str, Any] = field(default_factory=dict)
    key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True))
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    refresh_tokens: set[str] = field(default_factory=set)
    refreshed: int = 0
    """How many refresh-token grants were answered (the console's role re-checks)."""
    nonce_override: str | None = None
    """Sign the next token with this nonce instead of the request's (a replayed or forged token)."""
    access_tokens: dict[str, float] = field(default_factory=dict)
    """Access tokens issued to clients (client-credentials grant) -> when each expires."""
    token_lifetime_s: int = 300

    def valid(self, token: str) -> bool:
        """Whether ``token`` is an access token this provider issued and has not expired."""
        return self.access_tokens.get(token, 0) > time.time()


def _app(provider: Provider) -> FastAPI:
    app = FastAPI()

    @app.get("/.well-known/openid-configuration")
    def discovery() -> dict[str, Any]:
        base = provider.issuer
        return {"issuer": base, "authorization_endpoint": f"{base}/authorize", "token_endpoint": f"{base}/token",
                "jwks_uri": f"{base}/jwks", "response_types_supported": ["code"],
                "id_token_signing_alg_values_supported": ["RS256"]}  # fmt: skip

    @app.get("/authorize")
    def authorize(request: Request) -> RedirectResponse:
        q = request.query_params
        if q.get("client_id") != provider.client_id or q.get("code_challenge_method") != "S256":
            raise HTTPException(400, "bad client or no PKCE")
        code = secrets.token_urlsafe(16)
        provider.codes[code] = {
            "nonce": q["nonce"],
            "challenge": q["code_challenge"],
            "redirect_uri": q["redirect_uri"],
        }
        query = urllib.parse.urlencode({"code": code, "state": q["state"]})
        return RedirectResponse(f"{q['redirect_uri']}?{query}", status_code=303)

    @app.post("/token")
    def token(request: Request, grant_type: str = Form(), code: str = Form(""), redirect_uri: str = Form(""),
              code_verifier: str = Form(""), refresh_token: str = Form("")) -> dict[str, Any]:  # fmt: skip
        expected = "Basic " + base64.b64encode(f"{provider.client_id}:{provider.client_secret}".encode()).decode()
        if request.headers.get("authorization") != expected:
            raise HTTPException(401, "client authentication failed")
        now = int(time.time())
        if grant_type == "client_credentials":  # a machine client (a DICOMweb destination's auth)
            issued = secrets.token_urlsafe(16)
            provider.access_tokens[issued] = time.time() + provider.token_lifetime_s
            return {"access_token": issued, "token_type": "Bearer", "expires_in": provider.token_lifetime_s}
        if grant_type == "refresh_token":  # the user's claims as they are now at the provider
            if refresh_token not in provider.refresh_tokens:
                raise HTTPException(400, "invalid_grant")
            provider.refreshed += 1
            claims = {"iss": provider.issuer, "aud": provider.client_id, "iat": now, "exp": now + 300, **provider.user}
            id_token = jwt.encode({"alg": "RS256", "kid": "k1"}, claims, provider.key)
            return {"access_token": secrets.token_urlsafe(16), "token_type": "Bearer", "id_token": id_token,
                    "refresh_token": refresh_token}  # fmt: skip
        grant = provider.codes.pop(code, None)
        if grant is None or grant_type != "authorization_code" or grant["redirect_uri"] != redirect_uri:
            raise HTTPException(400, "invalid_grant")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(code_verifier.encode()).digest()).rstrip(b"=").decode()
        if challenge != grant["challenge"]:
            raise HTTPException(400, "PKCE verification failed")
        claims = {"iss": provider.issuer, "aud": provider.client_id, "iat": now, "exp": now + 300,
                  "nonce": provider.nonce_override or grant["nonce"], **provider.user}  # fmt: skip
        id_token = jwt.encode({"alg": "RS256", "kid": "k1"}, claims, provider.key)
        refresh = secrets.token_urlsafe(16)
        provider.refresh_tokens.add(refresh)
        return {"access_token": secrets.token_urlsafe(16), "token_type": "Bearer", "id_token": id_token,
                "refresh_token": refresh}  # fmt: skip

    @app.get("/jwks")
    def jwks() -> dict[str, Any]:
        return KeySet([provider.key]).as_dict(private=False)

    return app


@contextmanager
def oidc_provider() -> Iterator[Provider]:
    """A running provider on a free loopback port."""
    port = free_port()
    provider = Provider(issuer=f"http://127.0.0.1:{port}")
    server = uvicorn.Server(uvicorn.Config(_app(provider), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port, 30)
    try:
        yield provider
    finally:
        server.should_exit = True
        thread.join(10)
