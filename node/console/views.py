"""How the console's pages look: the Jinja2 templates (``templates/``, autoescaped) with their
filters, and the page that answers an error. Used by the pages and, for errors, by the HTTP edge
(:func:`node.console.web.install_common` is given :func:`error_page`)."""

from __future__ import annotations

import datetime as dt
import urllib.parse
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape

from node.console.web import signed_in
from node.errors import AinodeError, AuthenticationError

_env = Environment(loader=PackageLoader("node.console", "templates"), autoescape=select_autoescape(["html"]))


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "—"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


_env.filters["when"] = _when
_env.filters["size"] = _size


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    """``template`` rendered with ``context`` (and the request's user, when signed in)."""
    html = _env.get_template(template).render(request=request, **context)
    return HTMLResponse(html, status_code=status)


def error_page(request: Request, exc: AinodeError, status: int) -> Response:
    """How a page answers one of ainode's errors: the login page when the session is missing,
    otherwise the error with the page it came from."""
    if isinstance(exc, AuthenticationError):
        target = urllib.parse.quote(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
        return RedirectResponse(f"/login?next={target}&why={exc.reason}", status_code=303)
    try:
        user = signed_in(request)
    except AinodeError:
        user = None
    return render(request, "message.html", status, title="Not done", user=user, error=str(exc))
