"""What the console's API and pages share at the HTTP edge: the signed-in user of a request, CSRF
checks, forms, cookies, security headers and the mapping of ainode's errors to HTTP.

Every request that carries a body passes :class:`RequestGuard` first: without a valid session
(only the two sign-in forms need none) it is answered 401 or sent to the login page before a byte
of its body is read, and a body over its path's cap (:func:`body_cap`: 16 KiB for sign-in, 64 KiB
for a form or JSON, 64 MiB for the rule tester's DICOM upload) is refused with 413, from its
``Content-Length`` or as it streams in. Multipart uploads are parsed as they stream
(python-multipart) and only the first :data:`UPLOAD_KEEP_BYTES` of each file are kept, in memory:
the rule tester needs the header, and nothing unencrypted that may hold PHI touches disk
(Starlette's own form parser would spool a large file to a temporary file).
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

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
    RateLimitedError,
)

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2**20
"""The rule tester's DICOM upload."""
FORM_BODY_BYTES = 64 * 2**10
"""Any other form or JSON body: what a form needs, with room."""
LOGIN_BODY_BYTES = 16 * 2**10
"""The sign-in forms, read before anyone is known."""
UPLOAD_KEEP_BYTES = 8 * 2**20
"""What is kept of each uploaded file (the header a rule test reads; pixel data are dropped)."""
MAX_UPLOAD_FILES = 32
PUBLIC_BODIES = frozenset({"/login", "/api/login"})
"""The only paths whose body is read without a session."""
UPLOAD_PATHS = frozenset({"/routing/test", "/api/routing/test-upload"})
_USER = "ainode_user"
"""Where :class:`RequestGuard` keeps the signed-in user of a request (its ASGI scope's state)."""
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
        (BodyTooLarge, 413), (RateLimitedError, 429),
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
    known = request.scope.get("state", {}).get(_USER)
    if isinstance(known, CurrentUser):  # resolved by RequestGuard for this request already
        return known
    return authenticator(request).user_of(request.cookies.get(SESSION_COOKIE))


@dataclass
class Form:
    """A form's fields and uploaded files (file contents in memory)."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[bytes] = field(default_factory=list)


def body_cap(path: str) -> int:
    """The largest body a request to ``path`` may carry (bytes)."""
    if path in PUBLIC_BODIES:
        return LOGIN_BODY_BYTES
    return MAX_BODY_BYTES if path in UPLOAD_PATHS else FORM_BODY_BYTES


async def read_body(request: Request) -> bytes:
    """The request body, at most :func:`body_cap` of its path.

    Raises
    ------
    BodyTooLarge
        The body is larger.
    """
    cap = body_cap(request.url.path)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise BodyTooLarge(f"request body over {cap // 2**10} KiB")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(request: Request) -> Form:
    """An urlencoded or multipart form (see the module docstring); fields are at most
    :data:`FORM_BODY_BYTES` in all, at most :data:`MAX_UPLOAD_FILES` files are kept.

    Raises
    ------
    BodyTooLarge
        The body, or the fields, are over their caps.
    ConflictError
        A multipart body without a boundary, or too many files.
    """
    kind = request.headers.get("content-type", "")
    if not kind.startswith("multipart/form-data"):
        pairs = urllib.parse.parse_qsl((await read_body(request)).decode("utf-8", "replace"), keep_blank_values=True)
        return Form(fields=dict(pairs))
    _, options = parse_options_header(kind)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ConflictError("a multipart form without a boundary")
    form, part = Form(), _Part()
    field_bytes = 0

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part.header_name += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part.header_value += data[start:end]

    def on_header_end() -> None:
        if part.header_name.lower() == b"content-disposition":
            _, params = parse_options_header(part.header_value)
            part.name = params.get(b"name", b"").decode("utf-8", "replace")
            part.is_file = b"filename" in params
        part.header_name, part.header_value = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        nonlocal field_bytes
        room = (UPLOAD_KEEP_BYTES if part.is_file else FORM_BODY_BYTES) - len(part.data)
        if not part.is_file:
            field_bytes += end - start
            if field_bytes > FORM_BODY_BYTES:
                raise BodyTooLarge(f"form fields over {FORM_BODY_BYTES // 2**10} KiB")
        if room > 0:
            part.data += data[start : min(end, start + room)]

    def on_part_end() -> None:
        if part.is_file and part.data:
            if len(form.files) >= MAX_UPLOAD_FILES:
                raise ConflictError(f"at most {MAX_UPLOAD_FILES} files at once")
            form.files.append(bytes(part.data))
        elif not part.is_file and part.name:
            form.fields[part.name] = part.data.decode("utf-8", "replace")
        part.reset()

    callbacks = {
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    parser = MultipartParser(boundary, callbacks, max_size=body_cap(request.url.path))  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise ConflictError(f"the multipart form cannot be parsed: {type(exc).__name__}") from None
    return form


@dataclass
class _Part:
    """The multipart part being parsed."""

    name: str = ""
    is_file: bool = False
    data: bytearray = field(default_factory=bytearray)
    header_name: bytes = b""
    header_value: bytes = b""

    def reset(self) -> None:
        self.name, self.is_file, self.data = "", False, bytearray()


OWN_AUTHENTICATION = ("/dicomweb/",)
"""Paths whose application authenticates each request itself before reading its body
(:mod:`node.network.stow`), with its own size caps."""


class RequestGuard:
    """ASGI middleware: a body is read only from a signed-in user (or on a sign-in form), and never
    beyond its path's cap (see the module docstring)."""

    def __init__(self, app: Any, api_prefix: str = "/api") -> None:
        self.app, self.api_prefix = app, api_prefix

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith(OWN_AUTHENTICATION):  # STOW-RS: a bearer token checked before the body
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if path not in PUBLIC_BODIES:
            try:
                user = await run_in_threadpool(signed_in, request)
            except AinodeError as exc:  # no session: answered without reading the body
                await self._refuse(path, exc, scope, receive, send)
                return
            scope.setdefault("state", {})[_USER] = user  # the endpoint does not look it up again
        cap = body_cap(path)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            response: Response = JSONResponse({"detail": f"request body over {cap // 2**10} KiB"}, 413,
                                              headers={"Connection": "close"})  # fmt: skip
            await response(scope, receive, send)
            return
        received = 0

        async def capped() -> Any:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > cap:
                raise HTTPException(413, f"request body over {cap // 2**10} KiB")
            return message

        await self.app(scope, capped, send)

    async def _refuse(self, path: str, exc: AinodeError, scope: Any, receive: Any, send: Any) -> None:
        headers = {"Connection": "close"}
        if path.startswith(self.api_prefix):
            response: Response = JSONResponse({"detail": str(exc)}, 401, headers=headers)
        else:
            target = urllib.parse.quote(path)
            response = RedirectResponse(f"/login?next={target}&why=signin", 303, headers=headers)
        await response(scope, receive, send)


LOGIN_REASONS = {
    "signin": "sign in first",
    "expired": "your session expired; sign in again",
    "sso": "single sign-on did not complete; try again",
    "sso-expired": "the single sign-on attempt expired or did not start in this browser; try again",
    "no-role": "your single sign-on account has no ainode role",
    "local-user": "that name belongs to a local user; sign in with the password",
    "sso-ended": "your single sign-on account no longer grants this access; sign in again",
}
"""The only texts the login page shows for ``?why=`` (by code: never text from the query)."""


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


PageError = Callable[[Request, AinodeError, int], Response]
"""How a page answers one of ainode's errors (:func:`node.console.views.error_page`)."""


def install_common(app: FastAPI, page_error: PageError, api_prefix: str = "/api") -> None:
    """Security headers on every response; ainode's errors as HTTP statuses (JSON under the API,
    ``page_error`` otherwise: a page redirects to the login when the session is missing)."""

    app.add_middleware(RequestGuard, api_prefix=api_prefix)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        """FastAPI's 422 without the submitted values (a password must never be echoed)."""
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

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
            return page_error(request, exc, status)
        return JSONResponse({"detail": str(exc)}, status_code=status)
