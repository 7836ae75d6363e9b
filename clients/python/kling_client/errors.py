"""The API's refusals and failures as exceptions, each carrying its problem+json body."""

from __future__ import annotations

from typing import Any

import httpx

from kling_client.types import FieldError


class KlingError(Exception):
    """The API refused or failed a call (RFC 9457 problem): `status`, its stable `code`,
    `detail`, the fields at fault in `errors`, and the whole `problem`."""

    def __init__(
        self,
        status: int | None,
        code: str,
        detail: str,
        *,
        errors: list[FieldError] | None = None,
        problem: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.errors: list[FieldError] = errors or []
        self.problem: dict[str, Any] = problem or {}
        self.retry_after = retry_after


class BadRequest(KlingError):
    """400."""


class AuthenticationError(KlingError):
    """401: no key, or a key that is unknown or revoked."""


class PaymentRequired(KlingError):
    """402: the tenant's monthly budget would be exceeded."""


class PermissionDenied(KlingError):
    """403."""


class NotFound(KlingError):
    """404: no such generation (of yours), upload, request or action."""


class Conflict(KlingError):
    """409: the resource is not in a state for this, or an `Idempotency-Key` was used for
    another request."""


class PayloadTooLarge(KlingError):
    """413."""


class InvalidRequest(KlingError):
    """422: the request breaks a rule; `errors` names each field and its code."""


class RateLimited(KlingError):
    """429: too many calls, waiters or queued jobs; `retry_after` says when to come back."""


class ServerError(KlingError):
    """5xx: the API could not carry the call out."""


class Unavailable(ServerError):
    """503: a service the API depends on is away; nothing was created."""


class KlingConnectionError(KlingError):
    """No answer from the API (connection refused, timed out, cut): `status` is None. For a
    create without an idempotency key, the job may or may not exist."""


_BY_STATUS: dict[int, type[KlingError]] = {
    400: BadRequest, 401: AuthenticationError, 402: PaymentRequired, 403: PermissionDenied,
    404: NotFound, 409: Conflict, 413: PayloadTooLarge, 422: InvalidRequest, 429: RateLimited,
    503: Unavailable,
}  # fmt: skip


def retry_after(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds (only the delta form: the API sends no dates)."""
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def error_of(response: httpx.Response) -> KlingError:
    """The exception for an error answer, from its problem body when it has one (a proxy's
    error page has none: then the code is `http_<status>`)."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    problem: dict[str, Any] = body if isinstance(body, dict) else {}
    code = str(problem.get("code") or f"http_{status}")
    detail = str(
        problem.get("detail") or problem.get("title") or response.text[:200].strip()
        or response.reason_phrase or f"HTTP {status}"
    )  # fmt: skip
    kind = _BY_STATUS.get(status) or (ServerError if status >= 500 else KlingError)
    errors = problem.get("errors")
    return kind(
        status, code, detail, errors=errors if isinstance(errors, list) else [],
        problem=problem, retry_after=retry_after(response),
    )  # fmt: skip


def connection_error(exc: httpx.TransportError) -> KlingConnectionError:
    return KlingConnectionError(None, "connection_error", f"{type(exc).__name__}: {exc}")
