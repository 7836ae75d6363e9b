"""Errors as RFC 9457 problem+json, each with a stable `code` and the fields at fault."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from workers.intake import Refusal

MEDIA_TYPE = "application/problem+json"

# pydantic error types -> our stable rule codes
_RULES = {
    "missing": "required",
    "string_too_short": "too_short",
    "string_too_long": "too_long",
    "greater_than_equal": "out_of_range",
    "less_than_equal": "out_of_range",
    "literal_error": "not_allowed",
    "extra_forbidden": "unknown_field",
    "url_parsing": "invalid_url",
    "url_scheme": "invalid_url",
    "url_type": "invalid_url",
    "float_parsing": "not_a_number",
    "float_type": "not_a_number",
    "string_type": "not_a_string",
    "dict_type": "not_an_object",
    "json_invalid": "invalid_json",
    "value_error": "invalid",
}


def problem(status: int, code: str, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": f"about:blank#{code}", "title": title, "status": status, "code": code}
    body.update(detail=detail, **extra)
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE)


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "field": _field(tuple(err.get("loc", ()))),
            "code": _RULES.get(err.get("type", ""), "invalid"),
            "message": err.get("msg", "invalid"),
        }
        for err in exc.errors()
    ]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem(422, "validation_error", "The request is invalid", detail, errors=errors)


async def _refusal(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Refusal)
    error = {"field": exc.field, "code": exc.code, "message": exc.message}
    return problem(
        exc.status, exc.code, "The request was refused", f"{exc.field}: {exc.message}",
        errors=[error],
    )  # fmt: skip


async def _http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(
        exc.status_code, f"http_{exc.status_code}"
    )
    response = problem(exc.status_code, code, str(exc.detail), str(exc.detail))
    response.headers.update(exc.headers or {})
    return response


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(Refusal, _refusal)
    app.add_exception_handler(StarletteHTTPException, _http)
