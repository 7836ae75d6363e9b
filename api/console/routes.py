"""The operators' console at /console: server-rendered pages (Jinja2), htmx for the little
that is interactive, charts drawn as SVG on the server.

Operators sign in with their own token (`kling operators create`), never a tenant's key. The
session is an httponly, SameSite=Strict cookie whose value is stored only as a hash; every
action is a POST carrying the session's CSRF token, and is written to the audit log. Handlers
stay thin: the reads are `workers.console`'s, the actions the same services the API's
routes call.
"""

from __future__ import annotations

import secrets
import uuid
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import structlog
from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from api import creates
from api.console import charts
from api.deps import Res, Resources
from api.routes import _once  # the API's own idempotent create, shared rather than copied
from workers import bulk, callbacks, listing, operators
from workers import console as views
from workers.admission import PRIORITIES, PRIORITY_NAMES
from workers.db import unit_of_work
from workers.intake import Refusal, again
from workers.models import Job, Tenant
from workers.operators import SignedIn
from workers.pipeline import utcnow
from workers.states import JobState

log = structlog.get_logger(__name__)

HERE = Path(__file__).resolve().parent
COOKIE = "kling_console"
PAGE_SIZE = 50
# Presigned links to a job's image and video live as long as an operator looks at the page.
LINK_SECONDS = 900

templates = Jinja2Templates(directory=HERE / "templates")
templates.env.globals["priority_names"] = PRIORITY_NAMES
router = APIRouter(prefix="/console", include_in_schema=False)

# What an action's redirect may announce: fixed texts, so nothing a link carries is echoed.
NOTICES = {
    "cancelled": "The job is cancelled.",
    "retried": "A new job was made with the same inputs.",
    "restored": "The store is restarted.",
    "replayed": "The callback is sent again.",
    "enabled": "The callback URL takes deliveries again.",
    "not_restorable": "Only a job whose store failed can be restored.",
    "not_retryable": "The retry was refused; the audit log says why.",
}


class NotSignedIn(Exception):
    """No live operator session came with the request."""


def install(app: FastAPI) -> None:
    """Mount the console, its vendored static files and its sign-in redirect on `app`."""
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")
    app.add_exception_handler(NotSignedIn, _to_login)


async def _to_login(request: Request, exc: Exception) -> Response:
    if request.method == "GET":
        return RedirectResponse("/console/login", status_code=303)
    return HTMLResponse("sign in first", status_code=401)


def operator(request: Request, res: Res) -> SignedIn:
    """The operator of the request's console session; a bearer key, a tenant's or anyone's,
    is not looked at."""
    sid = request.cookies.get(COOKIE)
    if sid:
        with res.sessions() as db:
            found = operators.signed_in(db, sid, utcnow())
        if found is not None:
            return found
    raise NotSignedIn


Operator = Annotated[SignedIn, Depends(operator)]
Csrf = Annotated[str, Form(max_length=128)]


def _checked(who: SignedIn, csrf: str) -> None:
    if not operators.csrf_ok(who.csrf, csrf):
        raise HTTPException(403, "the form's CSRF token does not match this session")


def _page(request: Request, name: str, who: SignedIn | None, **context: Any) -> HTMLResponse:
    notice = NOTICES.get(request.query_params.get("done", ""))
    return templates.TemplateResponse(
        request, name, {"who": who, "notice": notice, "now": utcnow(), **context}
    )


def _audited(
    res: Resources, who: SignedIn, action: str, subject: str
) -> AbstractContextManager[dict[str, Any]]:
    log.info("console.action", operator=who.operator, action=action, subject=subject)
    return operators.audited(res.sessions, who.operator, action, subject)


# -- signing in ---------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> HTMLResponse:
    return _page(request, "login.html", None, failed=False)


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, res: Res, token: Annotated[str, Form(max_length=200)]) -> Response:
    with unit_of_work(res.sessions) as db:
        found = operators.authenticate(db, token.strip())
        if found is None:
            log.warning("console.login.refused")
            refused = _page(request, "login.html", None, failed=True)
            refused.status_code = 401
            return refused
        sid, _ = operators.start_session(db, found, utcnow())
        operators.audit(db, found.name, "login", None)
    response = RedirectResponse("/console", status_code=303)
    response.set_cookie(
        COOKIE, sid, max_age=int(operators.SESSION_TTL.total_seconds()), path="/console",
        httponly=True, samesite="strict", secure=request.url.scheme == "https",
    )  # fmt: skip
    return response


@router.post("/logout")
def logout(request: Request, res: Res, who: Operator, csrf: Csrf) -> Response:
    _checked(who, csrf)
    with unit_of_work(res.sessions) as db:
        operators.end_session(db, request.cookies.get(COOKIE, ""))
        operators.audit(db, who.operator, "logout", None)
    response = RedirectResponse("/console/login", status_code=303)
    response.delete_cookie(COOKIE, path="/console")
    return response


# -- pages --------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
def overview(request: Request, res: Res, who: Operator) -> HTMLResponse:
    with res.sessions() as db:
        seen = views.overview(db, res.broker, res.settings, utcnow())
    chart = charts.throughput(seen.per_minute, "Completions and failures per minute")
    return _page(request, "overview.html", who, o=seen, chart=chart)


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(
    request: Request,
    res: Res,
    who: Operator,
    tenant: Annotated[str, Query(max_length=200)] = "",
    status: Annotated[str, Query(max_length=16)] = "",
    error_code: Annotated[str, Query(max_length=64)] = "",
    priority: Annotated[str, Query(max_length=8)] = "",
    metadata: Annotated[str, Query(max_length=400)] = "",
    created_after: Annotated[str, Query(max_length=40)] = "",
    created_before: Annotated[str, Query(max_length=40)] = "",
    request_id: Annotated[str, Query(max_length=255)] = "",
    cursor: Annotated[str, Query(max_length=200)] = "",
) -> HTMLResponse:
    form = {
        "tenant": tenant, "status": status, "error_code": error_code, "priority": priority,
        "metadata": metadata, "created_after": created_after, "created_before": created_before,
        "request_id": request_id,
    }  # fmt: skip
    try:
        chosen = listing.JobFilter(
            statuses=(JobState(status).value,) if status else (),
            priorities=(PRIORITIES[priority],) if priority else (),  # type: ignore[index]
            created_after=_when(created_after), created_before=_when(created_before),
            metadata=_pairs(metadata), error_codes=(error_code.strip(),) if error_code else (),
            request_id=request_id.strip() or None,
        )  # fmt: skip
        after = listing.Cursor.decode(cursor) if cursor else None
    except (ValueError, KeyError):
        return _page(request, "jobs.html", who, form=form, rows=[], more=None, invalid=True)
    with res.sessions() as db:
        tenant_id = _tenant_id(db, tenant) if tenant else None
        rows, following = (
            listing.page(db, tenant_id, chosen, limit=PAGE_SIZE, after=after)
            if tenant_id is not None or not tenant
            else ([], None)
        )
        names = _names(db, {job.tenant_id for job in rows})
    more = urlencode({**form, "cursor": following.encode()}) if following else None
    return _page(
        request, "jobs.html", who, form=form, rows=rows, names=names, more=more, invalid=False
    )


def _when(value: str) -> datetime | None:
    # A datetime-local field has no zone: the console speaks UTC throughout.
    if not value:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _pairs(value: str) -> dict[str, str]:
    wanted = {}
    for pair in filter(None, (p.strip() for p in value.split(","))):
        key, sep, found = pair.partition(":")
        if not sep or not key:
            raise ValueError("metadata filters are key:value")
        wanted[key.strip()] = found.strip()
    return wanted


def _tenant_id(db: Any, name_or_id: str) -> str | None:
    found = db.get(Tenant, name_or_id.strip())
    if found is None:
        found = db.query(Tenant).filter(Tenant.name == name_or_id.strip()).one_or_none()
    return found.id if found is not None else None


def _names(db: Any, ids: set[str]) -> dict[str, str]:
    if not ids:
        return {}
    return {t.id: t.name for t in db.query(Tenant).filter(Tenant.id.in_(ids)).all()}


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: uuid.UUID, res: Res, who: Operator) -> HTMLResponse:
    with res.sessions() as db:
        view = views.job_view(db, job_id)
    if view is None:
        return _not_found(request, who, "no job with this id")
    job = view.job
    image = video = None
    if job.deleted_at is None:
        image = res.storage.presign_get(job.input_key, LINK_SECONDS)
        if job.s3_key:
            video = res.storage.presign_get(job.s3_key, LINK_SECONDS)
    return _page(
        request, "job.html", who, v=view, job=job, image=image, video=video,
        nonce=secrets.token_urlsafe(16), terminal=JobState(job.status).terminal,
    )  # fmt: skip


@router.get("/jobs/{job_id}/callbacks", response_class=HTMLResponse)
def job_callbacks(request: Request, job_id: uuid.UUID, res: Res, who: Operator) -> HTMLResponse:
    """The callbacks section alone, which the job page refreshes while it is open."""
    with res.sessions() as db:
        view = views.job_view(db, job_id)
    if view is None:
        return _not_found(request, who, "no job with this id")
    return _page(request, "_callbacks.html", who, v=view, job=view.job)


@router.get("/failures", response_class=HTMLResponse)
def failures_page(request: Request, res: Res, who: Operator) -> HTMLResponse:
    with res.sessions() as db:
        groups = views.failures(db, utcnow())
    drawn = {g.code: charts.bars(g.per_hour, f"{g.code} per hour, last 24 hours") for g in groups}
    return _page(request, "failures.html", who, groups=groups, drawn=drawn)


@router.get("/tenants", response_class=HTMLResponse)
def tenants_page(
    request: Request, res: Res, who: Operator,
    after: Annotated[str | None, Query(max_length=200)] = None,
) -> HTMLResponse:  # fmt: skip
    with res.sessions() as db:
        rows, last = views.tenant_rows(db, res.settings, utcnow(), after)
    more = urlencode({"after": last}) if last is not None else None
    return _page(request, "tenants.html", who, rows=rows, more=more)


@router.get("/tenants/{tenant_id}", response_class=HTMLResponse)
def tenant_page(request: Request, tenant_id: str, res: Res, who: Operator) -> HTMLResponse:
    with res.sessions() as db:
        view = views.tenant_view(db, tenant_id, res.settings, utcnow())
    if view is None:
        return _not_found(request, who, "no tenant with this id")
    return _page(request, "tenant.html", who, v=view)


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, res: Res, who: Operator) -> HTMLResponse:
    with res.sessions() as db:
        entries = operators.recent_audit(db, 100)
    return _page(request, "audit.html", who, entries=entries)


def _not_found(request: Request, who: SignedIn, what: str) -> HTMLResponse:
    response = _page(request, "not_found.html", who, what=what)
    response.status_code = 404
    return response


# -- actions ------------------------------------------------------------------------------


def _back(path: str, done: str) -> RedirectResponse:
    return RedirectResponse(f"{path}?done={done}", status_code=303)


def _exists(res: Resources, model: type[Job] | type[Tenant], key: Any) -> None:
    with res.sessions() as db:
        if db.get(model, key) is None:
            raise HTTPException(404, f"no {model.__tablename__[:-1]} with this id")


@router.post("/jobs/{job_id}/cancel")
def cancel(job_id: uuid.UUID, res: Res, who: Operator, csrf: Csrf) -> Response:
    _checked(who, csrf)
    _exists(res, Job, job_id)
    with _audited(res, who, "job.cancel", str(job_id)) as outcome:
        # A job already ended is answered as it is.
        outcome["status"] = res.pipeline.cancel(job_id).status
    return _back(f"/console/jobs/{job_id}", "cancelled")


@router.post("/jobs/{job_id}/restore")
def restore(job_id: uuid.UUID, res: Res, who: Operator, csrf: Csrf) -> Response:
    _checked(who, csrf)
    _exists(res, Job, job_id)
    with _audited(res, who, "job.restore", str(job_id)) as outcome:
        restored = outcome["restored"] = res.pipeline.restore(job_id)
    return _back(f"/console/jobs/{job_id}", "restored" if restored else "not_restorable")


@router.post("/jobs/{job_id}/retry")
def retry(
    job_id: uuid.UUID, res: Res, who: Operator, csrf: Csrf,
    nonce: Annotated[str, Form(min_length=8, max_length=64)],
) -> Response:  # fmt: skip
    """A new job from this one, keyed by the form it came from: the same form sent twice (a
    double click, a resubmitted page) makes one job."""
    _checked(who, csrf)
    with res.sessions() as db:
        original = db.get(Job, job_id)
        owner = db.get(Tenant, original.tenant_id) if original is not None else None
    if original is None or owner is None:
        raise HTTPException(404, "no job with this id")
    with _audited(res, who, "job.retry", str(job_id)) as outcome:
        try:
            request, image = again(original, res.storage)
            made, _ = _once(
                res, owner, f"retry:{job_id}", f"console:{nonce}",
                lambda keyed: creates.accepted(res.pipeline, owner, request, image, keyed),
            )  # fmt: skip
        except Refusal as exc:
            outcome["refused"] = exc.code
            return _back(f"/console/jobs/{job_id}", "not_retryable")
        outcome["new_job"] = str(made.id)
    return _back(f"/console/jobs/{made.id}", "retried")


@router.post("/deliveries/{delivery_id}/replay")
def replay(
    request: Request, delivery_id: uuid.UUID, res: Res, who: Operator, csrf: Csrf,
    job_id: Annotated[uuid.UUID, Form()],
) -> Response:  # fmt: skip
    _checked(who, csrf)
    with res.sessions() as db:
        owner = views.delivery_tenant(db, delivery_id)
    if owner is None:
        raise HTTPException(404, "no delivery with this id")
    with res.pipeline.work() as work:  # the replay and its audit entry commit together
        callbacks.replay(work, owner, delivery_id, utcnow())
        operators.audit(work.session, who.operator, "callback.replay", str(delivery_id),
                        job_id=str(job_id))  # fmt: skip
    if request.headers.get("hx-request"):
        return job_callbacks(request, job_id, res, who)
    return _back(f"/console/jobs/{job_id}", "replayed")


@router.post("/tenants/{tenant_id}/endpoints/enable")
def enable_endpoint(
    tenant_id: str, res: Res, who: Operator, csrf: Csrf,
    url: Annotated[str, Form(max_length=2048)],
) -> Response:  # fmt: skip
    """Deliver to a URL that answered 410 again: the tenant's own bulk action does it."""
    _checked(who, csrf)
    _exists(res, Tenant, tenant_id)
    with res.pipeline.work() as work:  # the action and its audit entry commit together
        action = bulk.create(work, tenant_id, bulk.ENABLE, {"url": url}, bulk.MAX_ITEMS)
        operators.audit(work.session, who.operator, "endpoint.enable", tenant_id, url=url,
                        bulk_action=str(action.id))  # fmt: skip
    return _back(f"/console/tenants/{tenant_id}", "enabled")


def _span(seconds: float | None) -> str:
    if seconds is None:
        return "now"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _utc(at: datetime | None) -> str:
    # Rows come back in the database session's time zone, which need not be UTC.
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if at else ""


templates.env.filters["span"] = _span
templates.env.filters["utc"] = _utc
