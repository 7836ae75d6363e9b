"""WaveSpeed's REST API: submit, result, history and media upload, and nothing else.

Every failure becomes one of our exception types, classified the way the pipeline acts on it:
`retryable` (nothing was created upstream, try again later), `ambiguous` (the submit may have
been accepted; look it up before paying again) or neither (permanent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from workers import metrics
from workers.errors import classify
from workers.retry import parse_retry_after
from workers.urlguard import NoCookies

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "timeout", "deleted"})


class WaveSpeedError(Exception):
    """A call to WaveSpeed that did not give us what we asked for."""

    retryable = False
    ambiguous = False
    outcome = "rejected"  # the label of `kling_wavespeed_requests`

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_code: int | str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_code = error_code
        self.retry_after = retry_after


class WaveSpeedRejected(WaveSpeedError):
    """400/401/403 and friends: the same request will fail again."""


class WaveSpeedUnavailable(WaveSpeedError):
    """429, 5xx, or the request never left: nothing was created, retrying is safe."""

    retryable = True
    outcome = "unavailable"


class WaveSpeedAmbiguous(WaveSpeedError):
    """The request was sent but no answer came back: WaveSpeed may have accepted it."""

    ambiguous = True
    outcome = "ambiguous"


@dataclass(frozen=True)
class Prediction:
    id: str
    status: str
    outputs: list[str] = field(default_factory=list)
    error: str = ""
    code: int | None = None
    created_at: datetime | None = None
    inference_ms: int | None = None
    input: dict[str, Any] = field(default_factory=dict)
    # `has_nsfw_contents`: one flag per output (WaveSpeed sends null when it did not check).
    nsfw: list[bool | None] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Prediction:
        timings = data.get("timings") or {}
        code = data.get("code")
        return cls(
            id=str(data["id"]),
            status=str(data.get("status") or "created"),
            outputs=[str(o) for o in data.get("outputs") or []],
            error=str(data.get("error") or ""),
            code=int(code) if isinstance(code, int | str) and str(code).isdigit() else None,
            created_at=_parse_time(data.get("created_at")),
            inference_ms=timings.get("inference"),
            input=dict(data.get("input") or {}),
            nsfw=[None if f is None else bool(f) for f in data.get("has_nsfw_contents") or []],
        )


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# Answers to a POST that may come after WaveSpeed created the prediction: its own error after
# the insert (500), or a gateway's that lost the origin's answer (502, 504). 429 and 503 say
# the request was turned away; 4xx that it was refused.
MAY_HAVE_CREATED = frozenset({500, 502, 504})


def _retry_after(response: httpx.Response) -> float | None:
    return parse_retry_after(response.headers.get("retry-after"))


def _error_for(response: httpx.Response) -> WaveSpeedError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    message = str(body.get("message") or response.reason_phrase or "error")
    kwargs: dict[str, Any] = {
        "status_code": response.status_code,
        "error_code": body.get("error_code") or body.get("code"),
        "retry_after": _retry_after(response),
    }
    text = f"WaveSpeed answered HTTP {response.status_code}: {message}"
    if classify(status_code=response.status_code).retryable:
        return WaveSpeedUnavailable(text, **kwargs)
    return WaveSpeedRejected(text, **kwargs)


class WaveSpeedClient:
    """A thin typed client over an `httpx.Client` the caller builds and owns."""

    def __init__(self, http: httpx.Client, base_url: str, api_key: str) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"}

    @metrics.wavespeed_call("submit")
    def submit(
        self, model: str, inputs: dict[str, Any], *, webhook: str | None = None
    ) -> Prediction:
        """POST once. Never retried here: WaveSpeed has no idempotency key and bills each one."""
        params = {"webhook": webhook} if webhook else None
        data = self._call("POST", f"/api/v3/{model}", json=inputs, params=params, may_create=True)
        return Prediction.from_data(data)

    @metrics.wavespeed_call("result")
    def result(self, prediction_id: str) -> Prediction:
        return Prediction.from_data(
            self._call("GET", f"/api/v3/predictions/{prediction_id}/result")
        )

    @metrics.wavespeed_call("history")
    def history(
        self,
        *,
        model: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        page: int = 1,
        page_size: int = 100,
    ) -> list[Prediction]:
        """One page of the account's predictions of the last 7 days, newest first."""
        body: dict[str, Any] = {"page": page, "page_size": page_size}
        if model:
            body["model"] = model
        if created_after:
            body["created_after"] = created_after.isoformat()
        if created_before:
            body["created_before"] = created_before.isoformat()
        data = self._call("POST", "/api/v3/predictions", json=body)
        items = data.get("items", []) if isinstance(data, dict) else data
        return [Prediction.from_data(item) for item in items or []]

    @metrics.wavespeed_call("delete")
    def delete(self, prediction_ids: Sequence[str]) -> int:
        """Delete predictions, WaveSpeed's one documented way to stop one (a running task may
        still finish); answers how many it deleted."""
        data = self._call("POST", "/api/v3/predictions/delete", json={"ids": list(prediction_ids)})
        return int(data.get("deleted_count") or 0) if isinstance(data, dict) else 0

    @metrics.wavespeed_call("upload")
    def upload(self, filename: str, content: bytes, content_type: str) -> str:
        """Upload media through a ticket and a PUT; answers the URL WaveSpeed can read it at.
        Creates nothing billed, and the image passed our checks at intake, so every failure is
        `WaveSpeedUnavailable` (an expired or refused PUT to WaveSpeed's storage says nothing
        about the job's input): the submit tries again within its attempts cap."""
        try:
            return self._upload(filename, content, content_type)
        except WaveSpeedError as exc:
            raise WaveSpeedUnavailable(
                f"media upload: {exc.message}", status_code=exc.status_code,
                error_code=exc.error_code, retry_after=exc.retry_after,
            ) from exc  # fmt: skip

    def _upload(self, filename: str, content: bytes, content_type: str) -> str:
        ticket = self._call(
            "POST",
            "/api/v3/media/uploads",
            json={"filename": filename, "size": len(content), "content_type": content_type},
        )
        upload = ticket.get("upload") if isinstance(ticket, dict) else None
        if not isinstance(upload, dict) or not upload.get("url") or not ticket.get("download_url"):
            raise WaveSpeedUnavailable("WaveSpeed answered an upload ticket without its URLs")
        # The PUT goes to WaveSpeed's storage, with the ticket's headers and not our key.
        response = self._send(
            upload.get("method", "PUT"),
            upload["url"],
            content=content,
            headers=upload.get("headers"),
        )
        if not response.is_success:
            raise _error_for(response)
        return str(ticket["download_url"])

    def _call(self, method: str, path: str, *, may_create: bool = False, **kwargs: Any) -> Any:
        response = self._send(
            method, self._base + path, headers=self._headers, may_create=may_create, **kwargs
        )
        if not response.is_success:
            error = _error_for(response)
            if may_create and response.status_code in MAY_HAVE_CREATED:
                raise WaveSpeedAmbiguous(error.message, status_code=response.status_code)
            raise error
        try:
            envelope = response.json()
        except ValueError as exc:
            message = f"WaveSpeed answered non-JSON: {exc}"
            if may_create:  # a success we cannot read: whatever it created is unknown
                raise WaveSpeedAmbiguous(message, status_code=response.status_code) from exc
            raise WaveSpeedUnavailable(message) from exc
        if int(envelope.get("code", 200)) != 200:
            raise WaveSpeedRejected(
                f"WaveSpeed answered code {envelope.get('code')}: {envelope.get('message')}",
                status_code=response.status_code,
                error_code=envelope.get("code"),
            )
        return envelope.get("data")

    def _send(
        self, method: str, url: str, *, may_create: bool = False, **kwargs: Any
    ) -> httpx.Response:
        try:
            return self._http.request(method, url, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # The request never reached WaveSpeed: nothing can have been created.
            raise WaveSpeedUnavailable(f"WaveSpeed unreachable: {exc!r}") from exc
        except httpx.TransportError as exc:
            if may_create:
                raise WaveSpeedAmbiguous(f"no answer from WaveSpeed: {exc!r}") from exc
            raise WaveSpeedUnavailable(f"no answer from WaveSpeed: {exc!r}") from exc


def make_http_client(connect_timeout: float, read_timeout: float) -> httpx.Client:
    """The httpx client a process shares for WaveSpeed calls and output downloads, with
    explicit timeouts. It keeps no cookies: the API authenticates with its key, and an output
    CDN's cookie would otherwise go with every later download (and parsing jars costs a
    little on every answer)."""
    timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
    limits = httpx.Limits(max_connections=20)
    return httpx.Client(timeout=timeout, limits=limits, cookies=NoCookies())
