"""The console's web pages: server-rendered HTML (Jinja2 templates in ``templates/``, no script),
one form per action, every action confirmed on its own page before it is taken.

Pages need a session (otherwise: the login page, then back); buttons for actions the user's role
may not take are not shown, and the actions refuse them anyway (403). Every form carries the
session's CSRF token; the login form a double-submit token of its own.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from node.console import fetching, oidc
from node.console.auth import (
    CSRF_FIELD,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    CurrentUser,
    new_token,
    tokens_equal,
)
from node.console.models import models_page
from node.console.views import render
from node.console.web import (
    LOGIN_REASONS,
    Form,
    address,
    authenticator,
    console,
    csrf_checked,
    read_form,
    set_cookie,
    signed_in,
)
from node.errors import AuthenticationError, ConflictError, RateLimitedError
from node.storage.reports import Listing

router = APIRouter(include_in_schema=False)


async def _post(request: Request) -> tuple[CurrentUser, Form]:
    """The signed-in user of a form post and its form, once its CSRF token checked out (the
    session is checked before the body is read)."""
    user = await run_in_threadpool(signed_in, request)
    form = await read_form(request)
    return csrf_checked(request, user, form), form


def _confirm_page(request: Request, user: CurrentUser, question: str, action: str, form: Form) -> HTMLResponse:
    return render(request, "confirm.html", title="Confirm", user=user, question=question, action=action,
                  fields={k: v for k, v in form.fields.items() if k not in (CSRF_FIELD, "confirm")})  # fmt: skip


def _safe_next(target: str | None) -> str:
    return target if target and target.startswith("/") and not target.startswith("//") else "/"


# -- login ---------------------------------------------------------------------------------------


@router.get("/login")
def login_page(request: Request, next: str = "/", why: str = "") -> Response:
    token = new_token()
    response = render(request, "login.html", title="Sign in", user=None, next=_safe_next(next), login_csrf=token,
                      error=LOGIN_REASONS.get(why), oidc_label=oidc.label(request))  # fmt: skip
    set_cookie(response, request, LOGIN_CSRF_COOKIE, token, 600)
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    form = await read_form(request)
    target = _safe_next(form.fields.get("next"))
    if not tokens_equal(request.cookies.get(LOGIN_CSRF_COOKIE), form.fields.get(CSRF_FIELD)):
        return render(request, "message.html", 403, title="Not done", user=None,
                      error="the sign-in form expired or did not come from this console; reload it")  # fmt: skip
    auth = authenticator(request)
    try:
        token, _user = await run_in_threadpool(
            auth.login, form.fields.get("name", ""), form.fields.get("password", ""), address(request)
        )
    except (AuthenticationError, RateLimitedError) as exc:
        fresh = new_token()
        status = 429 if isinstance(exc, RateLimitedError) else 401
        page = render(request, "login.html", status, title="Sign in", user=None, next=target, login_csrf=fresh,
                      error=str(exc), oidc_label=oidc.label(request))  # fmt: skip
        set_cookie(page, request, LOGIN_CSRF_COOKIE, fresh, 600)
        return page
    response = RedirectResponse(target, status_code=303)
    set_cookie(response, request, SESSION_COOKIE, token, int(auth.settings.session_max_s))
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    user, _form = await _post(request)
    authenticator(request).logout(user, address(request))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# -- reads ---------------------------------------------------------------------------------------


@router.get("/")
def dashboard(request: Request) -> Response:
    user = signed_in(request)
    return render(request, "dashboard.html", title="Dashboard", user=user, d=console(request).dashboard())


_PAGE_ROWS = 50
Page = Annotated[int, Query(ge=1, le=10**6)]
"""A page number, bounded as the API bounds its offsets (a larger one is a 422, not a 500)."""


def _listing(
    request: Request, kind: str, fetch: Callable[..., list[Any]], state: str, route: str, algorithm: str, page: int
) -> Response:
    """A page of the studies or the jobs (``kind``, listed by ``fetch``), filtered by state, route
    and algorithm."""
    user = signed_in(request)
    page = max(1, page)
    rows = fetch(
        Listing(state or None, route or None, algorithm or None, limit=_PAGE_ROWS, offset=(page - 1) * _PAGE_ROWS)
    )
    context: dict[str, Any] = {kind: rows, "user": user, "page": page}
    context["filters"] = {"state": state, "route": route, "algorithm": algorithm}
    return render(request, f"{kind}.html", title=kind.title(), **context)


@router.get("/studies")
def studies(request: Request, state: str = "", route: str = "", algorithm: str = "", page: Page = 1) -> Response:
    return _listing(request, "studies", console(request).studies, state, route, algorithm, page)


@router.get("/studies/{study_key}")
def study(request: Request, study_key: str) -> Response:
    user = signed_in(request)
    return render(
        request, "study.html", title=f"Study {study_key[:12]}", user=user, s=console(request).study(study_key)
    )


@router.get("/jobs")
def jobs(request: Request, state: str = "", route: str = "", algorithm: str = "", page: Page = 1) -> Response:
    return _listing(request, "jobs", console(request).jobs, state, route, algorithm, page)


@router.get("/jobs/{job_id}")
def job(request: Request, job_id: int) -> Response:
    user = signed_in(request)
    return render(request, "job.html", title=f"Job {job_id}", user=user, j=console(request).job(job_id))


@router.get("/routing")
def routing(request: Request) -> Response:
    user = signed_in(request)
    service = console(request)
    return render(request, "routing.html", title="Routing", user=user, r=service.routing(), series=service.series())


@router.get("/models")
def models(request: Request) -> Response:
    user = signed_in(request)
    ctx = console(request).ctx
    return render(request, "models.html", title="Models", user=user, **models_page(ctx.data.index, ctx.settings()))


@router.get("/audit")
def audit(request: Request, q: str = "", event: str = "", page: Page = 1) -> Response:
    user = signed_in(request)
    trail = console(request).audit(user, q[:200], event[:100], max(1, page))
    return render(request, "audit.html", title="Audit trail", user=user, a=trail, q=q, event=event)


@router.get("/audit/export")
def audit_export(request: Request, format: str = "json") -> Response:
    user = signed_in(request)
    body, media_type = console(request).audit_export(user, address(request), "xml" if format == "xml" else "json")
    disposition = f'attachment; filename="ainode-audit.{"xml" if format == "xml" else "json"}"'
    return Response(body, media_type=media_type, headers={"Content-Disposition": disposition})


@router.get("/keys")
def keys(request: Request) -> Response:
    user = signed_in(request)
    return render(request, "keys.html", title="Keys", user=user, k=console(request).keys())


@router.get("/lookup")
def lookup_page(request: Request) -> Response:
    user = signed_in(request)
    user.require("lookup")
    return render(request, "lookup.html", title="Lookup", user=user, matches=None, attribute="AccessionNumber")


@router.get("/fetch")
def fetch_page(request: Request) -> Response:
    user = signed_in(request)
    user.require("fetch")
    return render(request, "fetch.html", title="Fetch and analyse", user=user, sources=console(request).sources())


# -- actions -------------------------------------------------------------------------------------


@router.post("/fetch")
async def fetch(request: Request) -> Response:
    user, form = await _post(request)
    user.require("fetch")
    fields = form.fields
    done = await run_in_threadpool(
        fetching.fetch_and_analyse, console(request).ctx, user, address(request), fields.get("source", ""),
        fields.get("attribute", ""), fields.get("value", ""),
    )  # fmt: skip
    return render(request, "fetch.html", title="Fetch and analyse", user=user, sources=console(request).sources(),
                  message=done)  # fmt: skip


@router.post("/jobs/{job_id}/retry")
async def retry(request: Request, job_id: int) -> Response:
    user, form = await _post(request)
    user.require("retry")
    if form.fields.get("confirm") != "yes":
        return _confirm_page(request, user, f"Queue job {job_id} again?", f"/jobs/{job_id}/retry", form)
    done = console(request).retry_job(user, address(request), job_id)
    return render(request, "job.html", title=f"Job {job_id}", user=user, j=console(request).job(job_id),
                  message=done.message)  # fmt: skip


@router.post("/studies/{study_key}/rerun")
async def rerun(request: Request, study_key: str) -> Response:
    user, form = await _post(request)
    user.require("rerun")
    if form.fields.get("confirm") != "yes":
        question = f"Analyse study {study_key[:12]} again? Its new results will replace (withdraw) the current ones."
        return _confirm_page(request, user, question, f"/studies/{study_key}/rerun", form)
    done = console(request).rerun_study(user, address(request), study_key)
    return render(request, "study.html", title=f"Study {study_key[:12]}", user=user,
                  s=console(request).study(study_key), message=done.message)  # fmt: skip


@router.post("/studies/{study_key}/purge")
async def purge(request: Request, study_key: str) -> Response:
    user, form = await _post(request)
    user.require("purge")
    if form.fields.get("confirm") != "yes":
        question = f"Delete everything held for study {study_key[:12]} now (originals, map, results)?"
        return _confirm_page(request, user, question, f"/studies/{study_key}/purge", form)
    done = console(request).purge_study(user, address(request), study_key)
    return render(request, "message.html", title="Purged", user=user, message=done.message)


@router.post("/routing/test")
async def test_rules(request: Request) -> Response:
    user, form = await _post(request)
    user.require("test_rules")
    service = console(request)
    if form.files:
        datasets: list[Dataset] = []
        for content in form.files:
            try:
                datasets.append(dcmread(io.BytesIO(content), stop_before_pixels=True))
            except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError) as exc:
                raise ConflictError(f"an uploaded file is not DICOM: {type(exc).__name__}") from None
        result = service.test_rules_on_upload(datasets, form.fields.get("calling_ae_title") or "STORESCU")
    elif form.fields.get("series_key"):
        result = service.test_rules_on_series(form.fields["series_key"])
    else:
        raise ConflictError("choose a stored series or upload a DICOM file")
    return render(request, "routing.html", title="Routing", user=user, r=service.routing(), series=service.series(),
                  explanation=result.explanation, chosen=form.fields.get("series_key"))  # fmt: skip


@router.post("/routing/reload")
async def reload(request: Request) -> Response:
    user, form = await _post(request)
    user.require("reload")
    if form.fields.get("confirm") != "yes":
        return _confirm_page(request, user, "Validate and reload the configuration file?", "/routing/reload", form)
    service = console(request)
    try:
        message, error = service.reload(user, address(request)).message, None
    except ConflictError as exc:
        message, error = None, str(exc)
    return render(request, "routing.html", 200 if error is None else 409, title="Routing", user=user,
                  r=service.routing(), series=service.series(), message=message, error=error)  # fmt: skip


@router.post("/keys/rotate")
async def rotate(request: Request) -> Response:
    user, form = await _post(request)
    user.require("rotate_keys")
    if form.fields.get("confirm") != "yes":
        question = "Rotate the master key? Every object's data key is re-wrapped; unused keys are retired."
        return _confirm_page(request, user, question, "/keys/rotate", form)
    done = console(request).rotate_keys(user, address(request))
    return render(request, "keys.html", title="Keys", user=user, k=console(request).keys(), message=done.message)


@router.post("/lookup")
async def lookup(request: Request) -> Response:
    user, form = await _post(request)
    user.require("lookup")
    attribute = form.fields.get("attribute", "AccessionNumber")
    if attribute not in ("AccessionNumber", "PatientID"):
        raise ConflictError("look up by AccessionNumber or PatientID")
    value = form.fields.get("value", "")[:64]
    matches = console(request).lookup(user, address(request), attribute, value)
    return render(request, "lookup.html", title="Lookup", user=user, matches=matches, attribute=attribute)


def install(app: FastAPI) -> None:
    """Mount the pages (and the stylesheet) on ``app``."""
    from fastapi.staticfiles import StaticFiles

    app.include_router(router)
    oidc.install(app, app.state.secure_cookies)
    app.mount("/static", StaticFiles(packages=[("node.console", "static")]), name="static")
