"""The console's JSON API, under ``/api``: everything the pages do, behind the same login.

Sign in with ``POST /api/login`` (the session cookie is set; the response carries the CSRF token),
then send the cookie with every request and the CSRF token in the ``X-CSRF-Token`` header of every
POST. Actions take ``{"confirm": true}``. The OpenAPI document is ``GET /api/openapi.json``
(signed in). Errors: 401 no session, 403 the role may not (or no CSRF token), 404 unknown,
409 the action does not apply now (the message says why), 413 too large.
"""

from __future__ import annotations

import io
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from node.console import schemas
from node.console.auth import PERMISSIONS, SESSION_COOKIE, CurrentUser
from node.console.service import ConsoleService
from node.console.web import address, authenticator, console, csrf_checked, read_body, set_cookie, signed_in
from node.errors import ConflictError
from node.storage.reports import Listing

router = APIRouter(prefix="/api", tags=["console"])


def api_user(request: Request) -> CurrentUser:
    """The signed-in user; unsafe methods need the ``X-CSRF-Token`` header."""
    return csrf_checked(request, signed_in(request))


User = Annotated[CurrentUser, Depends(api_user)]
Service = Annotated[ConsoleService, Depends(console)]
Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0, le=10**9)]
Epoch = Annotated[float | None, Query(ge=0, le=1e11, description="seconds since the epoch")]


def _confirmed(body: schemas.Confirm) -> None:
    if not body.confirm:
        raise ConflictError('not confirmed: send {"confirm": true}')


def _me(user: CurrentUser) -> schemas.Me:
    allowed = [action for action in PERMISSIONS if user.can(action)]
    return schemas.Me(name=user.name, role=user.role, permissions=allowed, csrf_token=user.csrf_token)


@router.post("/login", response_model=schemas.Me, summary="Sign in with a user name and password")
def login(body: schemas.Login, request: Request, response: Response) -> schemas.Me:
    auth = authenticator(request)
    token, user = auth.login(body.name, body.password, address(request))
    set_cookie(response, request, SESSION_COOKIE, token, int(auth.settings.session_max_s))
    return _me(user)


@router.post("/logout", response_model=schemas.Message, summary="End the session")
def logout(user: User, request: Request, response: Response) -> schemas.Message:
    authenticator(request).logout(user, address(request))
    response.delete_cookie(SESSION_COOKIE, path="/")
    return schemas.Message(message="signed out")


@router.get("/me", response_model=schemas.Me, summary="The signed-in user, role and permissions")
def me(user: User) -> schemas.Me:
    return _me(user)


@router.get("/dashboard", response_model=schemas.Dashboard)
def dashboard(user: User, service: Service) -> schemas.Dashboard:
    return service.dashboard()


@router.get("/studies", response_model=list[schemas.StudySummary])
def studies(
    user: User, service: Service, state: str | None = None, route: str | None = None, algorithm: str | None = None,
    since: Epoch = None, until: Epoch = None, limit: Limit = 100, offset: Offset = 0,
) -> list[schemas.StudySummary]:  # fmt: skip
    return service.studies(Listing(state, route, algorithm, since, until, limit, offset))


@router.get("/studies/{study_key}", response_model=schemas.StudyDetail)
def study(study_key: str, user: User, service: Service) -> schemas.StudyDetail:
    return service.study(study_key)


@router.post("/studies/{study_key}/rerun", response_model=schemas.Message, summary="Analyse the study again")
def rerun(study_key: str, body: schemas.Confirm, user: User, service: Service, request: Request) -> schemas.Message:
    user.require("rerun")
    _confirmed(body)
    return service.rerun_study(user, address(request), study_key)


@router.post("/studies/{study_key}/purge", response_model=schemas.Message, summary="Delete the study's data now")
def purge(study_key: str, body: schemas.Confirm, user: User, service: Service, request: Request) -> schemas.Message:
    user.require("purge")
    _confirmed(body)
    return service.purge_study(user, address(request), study_key)


@router.get("/series", response_model=list[schemas.SeriesSummary], summary="Stored series (for the rule tester)")
def series(user: User, service: Service, limit: Limit = 200) -> list[schemas.SeriesSummary]:
    return service.series(limit=limit)


@router.get("/jobs", response_model=list[schemas.JobSummary])
def jobs(
    user: User, service: Service, state: str | None = None, route: str | None = None, algorithm: str | None = None,
    since: Epoch = None, until: Epoch = None, limit: Limit = 100, offset: Offset = 0,
) -> list[schemas.JobSummary]:  # fmt: skip
    return service.jobs(Listing(state, route, algorithm, since, until, limit, offset))


@router.get("/jobs/{job_id}", response_model=schemas.JobDetail)
def job(job_id: int, user: User, service: Service) -> schemas.JobDetail:
    return service.job(job_id)


@router.post("/jobs/{job_id}/retry", response_model=schemas.Message, summary="Queue a dead-lettered job again")
def retry(job_id: int, body: schemas.Confirm, user: User, service: Service, request: Request) -> schemas.Message:
    user.require("retry")
    _confirmed(body)
    return service.retry_job(user, address(request), job_id)


@router.get("/routing", response_model=schemas.Routing)
def routing(user: User, service: Service) -> schemas.Routing:
    return service.routing()


@router.post("/routing/test", response_model=schemas.Explanation, summary="Test the rules on a stored series")
def test_stored(body: schemas.RuleTest, user: User, service: Service) -> schemas.Explanation:
    user.require("test_rules")
    return service.test_rules_on_series(body.series_key)


@router.post(
    "/routing/test-upload",
    response_model=schemas.Explanation,
    summary="Test the rules on an uploaded DICOM file (body: application/dicom; held in memory only)",
)
async def test_upload(
    request: Request, calling_ae_title: Annotated[str, Query(min_length=1, max_length=16)] = "STORESCU"
) -> schemas.Explanation:
    user = api_user(request)
    user.require("test_rules")
    body = await read_body(request)
    try:
        ds = dcmread(io.BytesIO(body), stop_before_pixels=True, force=False)
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError) as exc:
        raise ConflictError(f"not a DICOM file: {type(exc).__name__}") from None
    return console(request).test_rules_on_upload([ds], calling_ae_title)


@router.post("/routing/reload", response_model=schemas.Message, summary="Validate and reload the configuration")
def reload(body: schemas.Confirm, user: User, service: Service, request: Request) -> schemas.Message:
    user.require("reload")
    _confirmed(body)
    return service.reload(user, address(request))


@router.get("/audit", response_model=schemas.AuditPage)
def audit(
    user: User, service: Service, q: Annotated[str, Query(max_length=200)] = "",
    event: Annotated[str, Query(max_length=100)] = "", page: Annotated[int, Query(ge=1, le=10**6)] = 1,
    per_page: Annotated[int, Query(ge=1, le=500)] = 50,
) -> schemas.AuditPage:  # fmt: skip
    return service.audit(user, q, event, page, per_page)


@router.get("/audit/export", summary="The audit trail as JSON or DICOM audit messages (XML)")
def audit_export(user: User, service: Service, request: Request, format: Literal["json", "xml"] = "json") -> Response:
    body, media_type = service.audit_export(user, address(request), format)
    disposition = f'attachment; filename="ainode-audit.{format}"'
    return Response(body, media_type=media_type, headers={"Content-Disposition": disposition})


@router.get("/keys", response_model=schemas.Keys)
def keys(user: User, service: Service) -> schemas.Keys:
    return service.keys()


@router.post("/keys/rotate", response_model=schemas.Message, summary="Rotate the master key (in the background)")
def rotate(body: schemas.Confirm, user: User, service: Service, request: Request) -> schemas.Message:
    user.require("rotate_keys")
    _confirmed(body)
    return service.rotate_keys(user, address(request))


@router.post(
    "/lookup", response_model=list[schemas.LookupMatch], summary="Find studies by Accession Number or Patient ID"
)
def lookup(body: schemas.LookupQuery, user: User, service: Service, request: Request) -> list[schemas.LookupMatch]:
    user.require("lookup")
    return service.lookup(user, address(request), body.attribute, body.value)


def install(app: FastAPI) -> None:
    """Mount the API on ``app`` with its OpenAPI document behind the login."""
    app.include_router(router)

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi(user: User) -> Any:
        return JSONResponse(app.openapi())
