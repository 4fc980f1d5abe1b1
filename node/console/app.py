"""The console's HTTP application (FastAPI, served by uvicorn on a thread of the node).

- ``GET /healthz``: the process answers (liveness).
- ``GET /readyz``: 200 when the node can take studies: the Storage SCP listens, the index answers,
  the store is writable and above its disk watermark, the algorithm process server is up; 503
  with the failing checks otherwise (readiness, for load balancers and Kubernetes).
- ``GET /metrics``: Prometheus text format (:mod:`node.console.metrics`).
- The web pages (:mod:`node.console.pages`) and the JSON API under ``/api``
  (:mod:`node.console.api`), behind a login (:mod:`node.console.auth`).

The monitoring endpoints need no login (probes and scrapers) and show no PHI: the checks name
components, the metrics carry states and counts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from node.console.metrics import LedgerCollector
from node.settings.console import ConsoleSettings

logger = logging.getLogger(__name__)

Check = Callable[[], str | None]
"""A readiness check: ``None`` when fine, else what is wrong (no PHI)."""


def create_app(
    collector: LedgerCollector,
    checks: dict[str, Check],
    console: Any = None,
    settings: ConsoleSettings | None = None,
    stow: Any = None,
) -> FastAPI:
    """The console application over ``collector`` (metrics) and readiness ``checks`` (name -> check);
    with a :class:`~node.console.service.ConsoleService` ``console``, the pages and the API too;
    with a :class:`~node.network.stow.StowApp` ``stow``, STOW-RS at ``/dicomweb/studies``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    app = FastAPI(
        title="ainode console", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None,
        description=(__import__("node.console.api", fromlist=["api"]).__doc__ or "").strip(),
    )  # fmt: skip
    if console is not None:
        from node.console import api, pages
        from node.console.auth import Authenticator
        from node.console.oidc import OidcLogin
        from node.console.views import error_page
        from node.console.web import install_common

        settings = settings or ConsoleSettings()
        app.state.console = console
        app.state.auth = Authenticator(console.index, settings, console.ctx.data.audit)
        app.state.secure_cookies = settings.secure_cookies
        app.state.oidc = OidcLogin(settings.oidc) if settings.oidc is not None else None
        if app.state.oidc is not None:
            app.state.auth.sso_check = app.state.oidc.still_granted
        install_common(app, error_page)
        api.install(app)
        pages.install(app)

    if stow is not None:
        app.mount("/dicomweb", stow)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        failing = {}
        for name, check in checks.items():
            try:
                problem = check()
            except Exception as exc:  # a check that cannot run is a failing check
                problem = f"{type(exc).__name__}: {exc}"
            if problem:
                failing[name] = problem
        body = {"status": "not ready" if failing else "ready", "failing": failing}
        return JSONResponse(body, status_code=503 if failing else 200)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


class ConsoleServer:
    """uvicorn serving ``app`` on ``host:port`` from a daemon thread (stopped with the node), over
    HTTPS when ``tls`` (certificate chain and key, PEM) is given; ``X-Forwarded-For`` is taken as
    the client's address only from ``trusted_proxies``."""

    def __init__(self, app: Any, host: str, port: int, tls: Any = None, trusted_proxies: Sequence[str] = ()) -> None:
        import uvicorn

        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
            ssl_certfile=str(tls.certificate) if tls else None, ssl_keyfile=str(tls.private_key) if tls else None,
            # X-Forwarded-For is believed only from configured proxies (uvicorn trusts loopback by default)
            proxy_headers=bool(trusted_proxies), forwarded_allow_ips=list(trusted_proxies) or None,
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="ainode-console", daemon=True)

    def start(self) -> None:
        """Serve in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving (open requests finish first)."""
        self._server.should_exit = True
        self._thread.join(timeout=10)
