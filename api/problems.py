"""Errors as RFC 9457 problem+json, each with a stable `code` and the fields at fault."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy.exc
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from workers.intake import Refusal
from workers.sealing import SealingError
from workers.storage import StorageError

log = structlog.get_logger(__name__)

# Failures of what we depend on, not of what the caller sent: 503, try again shortly.
UNAVAILABLE = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,  # no pooled connection came free in time
    StorageError,
)
RETRY_AFTER_SECONDS = 5

MEDIA_TYPE = "application/problem+json"

# pydantic error types -> our stable rule codes
_RULES = {
    "missing": "required",
    "string_too_short": "too_short",
    "string_too_long": "too_long",
    "too_short": "too_short",
    "too_long": "too_long",
    "greater_than_equal": "out_of_range",
    "less_than_equal": "out_of_range",
    "literal_error": "not_allowed",
    "extra_forbidden": "unknown_field",
    "url_parsing": "invalid_url",
    "url_scheme": "invalid_url",
    "url_type": "invalid_url",
    "url_too_long": "too_long",
    "float_parsing": "not_a_number",
    "float_type": "not_a_number",
    "int_parsing": "not_a_number",
    "string_type": "not_a_string",
    "dict_type": "not_an_object",
    "list_type": "not_a_list",
    "model_attributes_type": "not_an_object",
    "json_invalid": "invalid_json",
    "uuid_parsing": "invalid_id",
    "datetime_from_date_parsing": "invalid_datetime",
    "datetime_parsing": "invalid_datetime",
    "string_pattern_mismatch": "not_allowed",
    "value_error": "invalid",
    "finite_number": "not_finite",
    "greater_than": "out_of_range",
    "timezone_aware": "needs_offset",
    # raised by our own validators (api/schemas.py) under the code they stand for
    "too_many_keys": "too_many_keys",
    "in_the_past": "in_the_past",
    "too_far": "too_far",
    "invalid_key": "invalid_key",
    "not_a_scalar": "not_a_scalar",
    "too_large": "too_large",
}


class FieldError(BaseModel):
    field: str
    code: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details, plus a stable `code` and the fields at fault."""

    type: str
    title: str
    status: int
    code: str
    detail: str
    errors: list[FieldError] = []


def problem(status: int, code: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": f"about:blank#{code}", "title": title, "status": status}
    body.update(code=code, detail=detail, **extra)
    return body


def _field(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def validation_problem(errors: Sequence[Any]) -> dict[str, Any]:
    fields = [
        {
            "field": _field(err.get("loc", ())),
            "code": _RULES.get(err.get("type", ""), "invalid"),
            "message": err.get("msg", "invalid"),
        }
        for err in errors
    ]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in fields)
    return problem(422, "validation_error", "The request is invalid", detail, errors=fields)


def refusal_problem(exc: Refusal) -> dict[str, Any]:
    error = {"field": exc.field, "code": exc.code, "message": exc.message}
    return problem(
        exc.status, exc.code, "The request was refused", f"{exc.field}: {exc.message}",
        errors=[error],
    )  # fmt: skip


def failure_problem(exc: Exception) -> dict[str, Any]:
    """The problem for a request we could not carry out: 503 when a dependency failed (Postgres,
    S3), 500 for anything else (a bug: logged with its traceback). Nothing was created."""
    if isinstance(exc, UNAVAILABLE):
        log.warning("request.unavailable", error=type(exc).__name__)
        return problem(
            503, "unavailable", "Temporarily unavailable",
            f"a service this request needs is unavailable ({type(exc).__name__}); nothing "
            f"was created, retry in {RETRY_AFTER_SECONDS} seconds",
        )  # fmt: skip
    log.error("request.failed", exc_info=exc)
    return problem(500, "internal_error", "Internal error", "nothing was created; retry later")


def respond(body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=body["status"], media_type=MEDIA_TYPE, headers=headers)


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return respond(validation_problem(exc.errors()))


async def _refusal(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Refusal)
    return respond(refusal_problem(exc), exc.headers)


async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Exception)
    return respond(failure_problem(exc), {"Retry-After": str(RETRY_AFTER_SECONDS)})


async def _http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(
        exc.status_code, f"http_{exc.status_code}"
    )
    body = problem(exc.status_code, code, str(exc.detail), str(exc.detail))
    return respond(body, dict(exc.headers or {}))


async def _sealing(_: Request, exc: Exception) -> JSONResponse:
    # The operator's problem, not the caller's: the details (no key in them) go to the log.
    log.error("secrets.unavailable", error=str(exc))
    detail = "this deployment cannot open stored signing secrets; its SECRET_KEYS needs fixing"
    return respond(
        problem(503, "signing_secret_unavailable", "Signing secrets are unavailable", detail)
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(Refusal, _refusal)
    app.add_exception_handler(StarletteHTTPException, _http)
    for kind in UNAVAILABLE:
        app.add_exception_handler(kind, _unavailable)
    app.add_exception_handler(SealingError, _sealing)
