"""Non-2xx answers in WaveSpeed's shape, and the handlers that render them."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sandbox.wavespeed.payloads import error_body


class ApiError(Exception):
    """An HTTP error answer: status, a message naming what is wrong, WaveSpeed error code."""

    def __init__(
        self,
        status: int,
        message: str,
        error_code: int | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code if error_code is not None else status
        self.headers = headers or {}


def rate_limited(message: str, retry_after_seconds: int) -> ApiError:
    """A 429; WaveSpeed's limits reset each minute, so `Retry-After` is always sent."""
    headers = {"Retry-After": str(max(1, retry_after_seconds))}
    return ApiError(429, message, 429, headers=headers)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    body = error_body(exc.status, exc.message, exc.error_code)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    body = error_body(exc.status_code, str(exc.detail), exc.status_code)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query"))
    message = f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request"
    return JSONResponse(error_body(400, message, 1401), status_code=400)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error the app raises answer in WaveSpeed's `{message, error_code}` shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


class CutShortFilter(logging.Filter):
    """Hides uvicorn's complaint about a response left unfinished: the simulator does that on
    purpose (dropped submit answers, truncated outputs) and records those faults itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing response" not in record.getMessage()
