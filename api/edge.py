"""What a request must pass before the app reads its body: a live API key on the `/v1` routes
that take one, and a body within its route's limit (refused from `Content-Length`, cut off as
soon as a streamed body grows past it). Pure ASGI middleware: nothing is buffered."""

from __future__ import annotations

from collections.abc import Mapping

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import problems
from api.deps import TENANT_STATE, Resources
from workers import tenants
from workers.models import Tenant

log = structlog.get_logger(__name__)

UNAUTHORIZED = "missing or invalid API key"


class BodyTooLarge(HTTPException):
    """Raised by the capped `receive` when a body grows past its limit while it is read; an
    HTTPException, so that FastAPI's body parsing lets it through to its handler."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over this route's limit of {limit} bytes")
        self.limit = limit


def install(
    app: FastAPI, *, default_limit: int, limits: Mapping[str, int], open_paths: set[str]
) -> None:
    """Authentication outside the body limit (the last added runs first): a caller without a
    key learns nothing, not even the limits."""
    app.add_exception_handler(BodyTooLarge, _body_too_large)
    app.add_middleware(LimitBody, default=default_limit, limits=dict(limits))
    app.add_middleware(Authenticate, open_paths=frozenset(open_paths))


class Authenticate:
    """Finds the tenant of every `/v1` request's bearer key (but on `open_paths`, which prove
    themselves otherwise) before the app runs; answers 401 without a live key. The tenant goes
    into the request's state, where the `tenant` dependency takes it."""

    def __init__(self, app: ASGIApp, open_paths: frozenset[str]) -> None:
        self.app = app
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/") or path in self.open_paths:
            await self.app(scope, receive, send)
            return
        try:
            tenant = await _tenant_of(scope)
        except SQLAlchemyError as exc:  # the key cannot be checked now; it may well be good
            log.warning("api.auth.unavailable", error=type(exc).__name__)
            body = problems.problem(
                503, "unavailable", "The service is unavailable", "API keys cannot be checked now"
            )
            await _refuse(scope, receive, send, body, {"Retry-After": "5"})
            return
        if tenant is None:
            body = problems.problem(401, "unauthorized", UNAUTHORIZED, UNAUTHORIZED)
            await _refuse(scope, receive, send, body, {"WWW-Authenticate": "Bearer"})
            return
        scope.setdefault("state", {})[TENANT_STATE] = tenant
        structlog.contextvars.bind_contextvars(tenant_id=tenant.id)
        await self.app(scope, receive, send)


async def _tenant_of(scope: Scope) -> Tenant | None:
    scheme, token = get_authorization_scheme_param(Headers(scope=scope).get("authorization"))
    if scheme.lower() != "bearer" or not token:
        return None
    resources: Resources = scope["app"].state.resources

    def lookup() -> Tenant | None:
        with resources.sessions() as db:
            return tenants.authenticate(db, token)

    # A database round trip: off the event loop, as a sync dependency would run.
    return await run_in_threadpool(lookup)


class LimitBody:
    """Refuses a body over its route's limit (`limits` by path, else `default`) with 413:
    from `Content-Length` before a byte is read, or as soon as a streamed one grows past it."""

    def __init__(self, app: ASGIApp, default: int, limits: dict[str, int]) -> None:
        self.app = app
        self.default = default
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(scope, receive, send, _too_large(limit))
            return
        await self.app(scope, _capped(receive, limit), send)


def _capped(receive: Receive, limit: int) -> Receive:
    received = 0

    async def capped() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
        return message

    return capped


def _content_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    # isdigit() alone takes "²"; the servers refuse such a header, but int() must never raise.
    return int(value) if value is not None and value.isascii() and value.isdigit() else None


def _too_large(limit: int) -> dict[str, object]:
    detail = f"the request body is over this route's limit of {limit} bytes"
    return problems.problem(
        413, "body_too_large", "The request body is too large", detail, limit_bytes=limit
    )


async def _refuse(
    scope: Scope, receive: Receive, send: Send, body: dict[str, object],
    headers: dict[str, str] | None = None,
) -> None:  # fmt: skip
    """Answer without reading the body; the connection closes after the answer, or the server
    would read and discard whatever body is still coming."""
    headers = {**(headers or {}), **_closing(scope)}
    await problems.respond(body, headers)(scope, receive, send)


def _closing(scope: Scope) -> dict[str, str]:
    announced = Headers(scope=scope)
    if "transfer-encoding" in announced or (_content_length(scope) or 0) > 0:
        return {"Connection": "close"}
    return {}


async def _body_too_large(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BodyTooLarge)
    return problems.respond(_too_large(exc.limit), {"Connection": "close"})
