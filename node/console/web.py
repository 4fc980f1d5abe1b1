"""What the console's API and pages share at the HTTP edge: the signed-in user of a request, CSRF
checks, forms read in memory, cookies, security headers and the mapping of ainode's errors to HTTP.

Forms (and uploads) are read whole into memory, at most :data:`MAX_BODY_BYTES`, and parsed with
the standard library: Starlette's multipart parser would spool an uploaded DICOM file of more
than 1 MB to a plaintext temporary file, and nothing unencrypted that may hold PHI touches disk.
"""

from __future__ import annotations

import email.parser
import email.policy
import logging
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from node.console.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    Authenticator,
    CurrentUser,
    check_csrf,
)
from node.console.service import ConsoleService
from node.errors import (
    AccessDeniedError,
    AinodeError,
    AuthenticationError,
    ConflictError,
    NotFoundError,
)

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2**20
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class BodyTooLarge(AinodeError):
    """A request body over :data:`MAX_BODY_BYTES` (HTTP 413)."""


def status_of(exc: AinodeError) -> int:
    """The HTTP status that answers ``exc`` (anything else ainode refuses: 409)."""
    for kind, status in (
        (AuthenticationError, 401), (AccessDeniedError, 403), (NotFoundError, 404), (ConflictError, 409),
        (BodyTooLarge, 413),
    ):  # fmt: skip
        if isinstance(exc, kind):
            return status
    return 409


def console(request: Request) -> ConsoleService:
    """The console service of the application serving ``request``."""
    service: ConsoleService = request.app.state.console
    return service


def authenticator(request: Request) -> Authenticator:
    """The authenticator of the application serving ``request``."""
    auth: Authenticator = request.app.state.auth
    return auth


def address(request: Request) -> str:
    """The client's address, for the audit trail."""
    return request.client.host if request.client else "unknown"


def signed_in(request: Request) -> CurrentUser:
    """The user of the request's session cookie.

    Raises
    ------
    AuthenticationError
        No valid session.
    """
    return authenticator(request).user_of(request.cookies.get(SESSION_COOKIE))


@dataclass
class Form:
    """A form's fields and uploaded files (file contents in memory)."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[bytes] = field(default_factory=list)


async def read_body(request: Request) -> bytes:
    """The request body, at most :data:`MAX_BODY_BYTES`.

    Raises
    ------
    BodyTooLarge
        The body is larger.
    """
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge(f"request body over {MAX_BODY_BYTES // 2**20} MiB")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(request: Request) -> Form:
    """An urlencoded or multipart form, parsed in memory (see the module docstring)."""
    body = await read_body(request)
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + kind.encode("latin-1") + b"\r\n\r\n" + body
        )
        form = Form()
        for part in message.iter_parts() if message.is_multipart() else []:
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            payload = payload if isinstance(payload, bytes) else b""
            if part.get_filename() is not None:
                if payload:
                    form.files.append(payload)
            elif isinstance(name, str):
                form.fields[name] = payload.decode("utf-8", "replace")
        return form
    pairs = urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    return Form(fields=dict(pairs))


def csrf_checked(request: Request, user: CurrentUser, form: Form | None = None) -> CurrentUser:
    """``user``, once an unsafe request carried the session's CSRF token (header or form field).

    Raises
    ------
    AccessDeniedError
        No valid CSRF token.
    """
    if request.method not in SAFE_METHODS:
        presented = request.headers.get(CSRF_HEADER) or (form.fields.get(CSRF_FIELD) if form else None)
        check_csrf(user, presented)
    return user


def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int | None) -> None:
    """Set an HttpOnly, SameSite=Strict cookie, Secure when the console is reached over HTTPS."""
    response.set_cookie(
        name, value, max_age=max_age, path="/", httponly=True, samesite="strict",
        secure=request.app.state.secure_cookies,
    )  # fmt: skip


def install_common(app: FastAPI, api_prefix: str = "/api") -> None:
    """Security headers on every response; ainode's errors as HTTP statuses (JSON under the API,
    pages otherwise: a page redirects to the login when the session is missing)."""

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(AinodeError)
    async def ainode_error(request: Request, exc: AinodeError) -> Response:
        status = status_of(exc)
        if not request.url.path.startswith(api_prefix):
            from node.console.pages import error_page  # the pages render their own errors

            return error_page(request, exc, status)
        return JSONResponse({"detail": str(exc)}, status_code=status)
