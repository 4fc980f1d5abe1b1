"""Issue 15: the console over HTTPS (``console.tls``: Secure cookies) with single sign-on through an
OpenID Connect provider (authorization code + PKCE, ID token checked), roles from its claims."""

from __future__ import annotations

import ssl
import urllib.parse

import httpx
import pytest

from .console import start_console_node
from .oidc_provider import oidc_provider
from .peers import free_port, wait_until
from .pki import make_pki

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _sign_in(client: httpx.Client, next_path: str = "/jobs") -> httpx.Response:
    """Follow the redirects of a single sign-on: console -> provider -> console's callback."""
    to_provider = client.get(f"/login/oidc?next={urllib.parse.quote(next_path)}")
    assert to_provider.status_code == 303, to_provider.text
    back = httpx.get(to_provider.headers["location"])
    assert back.status_code == 303, back.text
    callback = urllib.parse.urlsplit(back.headers["location"])
    return client.get(f"{callback.path}?{callback.query}")


def test_single_sign_on_over_https_with_roles_from_the_provider(tmp_path, monkeypatch):
    pki = make_pki(tmp_path / "pki")
    with oidc_provider() as provider:
        monkeypatch.setenv("AINODE_OIDC_CLIENT_SECRET", provider.client_secret)  # the node inherits it
        port = free_port()
        cn = start_console_node(
            tmp_path, port=port,
            tls={"certificate": str(pki.server.certificate), "private_key": str(pki.server.key)},
            oidc={"issuer": provider.issuer, "client_id": provider.client_id,
                  "roles": {"admin": ["ainode-admins"], "operator": ["radiology-it"]},
                  "redirect_uri": f"https://127.0.0.1:{port}/login/oidc/callback", "recheck_s": 2},
        )  # fmt: skip
        try:
            assert cn.url.startswith("https://")
            trust = ssl.create_default_context(cafile=str(pki.ca))
            client = httpx.Client(base_url=cn.url, verify=trust)
            assert "Sign in with single sign-on" in client.get("/login").text

            provider.user = {"sub": "u-17", "preferred_username": "dana", "groups": ["staff", "radiology-it"]}
            signed_in = _sign_in(client)
            assert signed_in.status_code == 303 and signed_in.headers["location"] == "/jobs"
            cookie = signed_in.headers["set-cookie"]
            assert "ainode_session=" in cookie and "Secure" in cookie and "HttpOnly" in cookie
            assert "SameSite=strict" in cookie or "samesite=strict" in cookie.lower()
            me = client.get("/api/me").json()
            assert (me["name"], me["role"]) == ("dana", "operator") and "reidentify" not in me["permissions"]
            assert "dana" in cn.cli("users", "list").stdout and "single sign-on" in cn.cli("users", "list").stdout

            # the provider grants no ainode role: refused, no session
            stranger = httpx.Client(base_url=cn.url, verify=trust)
            provider.user = {"sub": "u-18", "preferred_username": "eve", "groups": ["staff"]}
            refused = _sign_in(stranger)
            assert refused.status_code == 303 and refused.headers["location"].startswith("/login?")
            assert "why=no-role" in refused.headers["location"]
            assert "no ainode role" in stranger.get(refused.headers["location"]).text
            assert stranger.get("/api/me").status_code == 401

            # an ID token whose nonce is not the one this sign-in sent is refused
            provider.user = {"sub": "u-17", "preferred_username": "dana", "groups": ["ainode-admins"]}
            provider.nonce_override = "replayed-nonce"
            replayed = _sign_in(httpx.Client(base_url=cn.url, verify=trust))
            assert replayed.headers["location"].startswith("/login?"), replayed.headers
            provider.nonce_override = None

            # a local user cannot be taken over through the provider; local logins still work over HTTPS
            provider.user = {"sub": "x", "preferred_username": "admin", "groups": ["ainode-admins"]}
            takeover = _sign_in(httpx.Client(base_url=cn.url, verify=trust))
            assert "why=local-user" in takeover.headers["location"]
            local = httpx.Client(base_url=cn.url, verify=trust)
            assert (
                local.post("/api/login", json={"name": "admin", "password": "admin-password-1234"}).status_code == 200
            )
            trail = cn.client("admin").get("/api/audit", params={"q": "console login"}).json()["records"]
            assert {p["user_id"] for r in trail for p in r["participants"]} >= {"dana", "admin"}
        finally:
            cn.node.stop()
            cn.pacs.stop()


def test_single_sign_on_is_bound_to_the_browser_and_roles_are_checked_again(tmp_path, monkeypatch):
    with oidc_provider() as provider:
        monkeypatch.setenv("AINODE_OIDC_CLIENT_SECRET", provider.client_secret)
        port = free_port()
        cn = start_console_node(
            tmp_path, port=port,
            oidc={"issuer": provider.issuer, "client_id": provider.client_id, "roles": {"admin": ["ainode-admins"]},
                  "redirect_uri": f"http://127.0.0.1:{port}/login/oidc/callback", "recheck_s": 1.5},
        )  # fmt: skip
        try:
            # redirect_uri comes from the configuration, whatever Host the request names
            client = httpx.Client(base_url=cn.url)
            to_provider = client.get("/login/oidc", headers={"Host": "evil.example:443"})
            sent = urllib.parse.parse_qs(urllib.parse.urlsplit(to_provider.headers["location"]).query)
            assert sent["redirect_uri"] == [f"http://127.0.0.1:{port}/login/oidc/callback"]

            # login CSRF: the attacker starts a sign-in as themself and hands the callback link to a
            # victim, whose browser never started it: refused, no session
            provider.user = {"sub": "u-66", "preferred_username": "mallory", "groups": ["ainode-admins"]}
            attacker = httpx.Client(base_url=cn.url)
            started = attacker.get("/login/oidc")
            back = httpx.get(started.headers["location"])
            callback = urllib.parse.urlsplit(back.headers["location"])
            victim = httpx.Client(base_url=cn.url)
            answered = victim.get(f"{callback.path}?{callback.query}")
            assert answered.status_code == 303 and "why=sso-expired" in answered.headers["location"]
            assert victim.get("/api/me").status_code == 401
            # ... while the attacker's own browser (which holds the state cookie) completes it
            assert attacker.get(f"{callback.path}?{callback.query}").headers["location"] == "/"
            assert attacker.get("/api/me").status_code == 200

            # an administrator removed from the group at the provider loses the session at the re-check
            provider.user = {"sub": "u-17", "preferred_username": "dana", "groups": ["ainode-admins"]}
            dana = httpx.Client(base_url=cn.url)
            assert _sign_in(dana, "/").status_code == 303
            assert dana.get("/api/me").json()["role"] == "admin"
            provider.user = {"sub": "u-17", "preferred_username": "dana", "groups": ["staff"]}
            assert wait_until(lambda: dana.get("/api/me").status_code == 401, 10, 0.5)
            assert provider.refreshed >= 1
            trail = cn.cli("audit", "show").stdout
            assert "single sign-on no longer grants the role" in trail
        finally:
            cn.node.stop()
            cn.pacs.stop()
