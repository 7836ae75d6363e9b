"""A small typed client of the HTTP API for Python producers, sync and async, on httpx.

from api.client import KlingClient, verify_webhook

with httpx.Client(timeout=60) as http:
    kling = KlingClient(http, "https://kling.example.com", api_key)
    job = kling.create(image_url="https://example.com/me.jpg", prompt="slow push-in")
    job = kling.wait(job["id"])
    kling.download(job["id"], Path("clip.mp4"))

# in your callback receiver:
event = verify_webhook(signing_secret, request_body, request_headers)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

TERMINAL = frozenset({"completed", "failed", "cancelled", "expired"})
Job = dict[str, Any]


class ApiError(Exception):
    """The API refused or failed a request; `problem` is its problem+json body."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(problem.get("detail") or problem.get("title") or f"HTTP {status}")
        self.status = status
        self.problem = problem
        self.code = problem.get("code")


class InvalidWebhook(ValueError):
    """A callback whose signature or timestamp does not verify."""


def verify_webhook(secret: str, body: bytes | str, headers: Mapping[str, str]) -> dict[str, Any]:
    """Verify a callback (Standard Webhooks: signature, 5-minute timestamp tolerance) and
    answer its event: `{"type": "generation.completed", "timestamp": ..., "data": job}`."""
    try:
        return dict(Webhook(secret).verify(body, dict(headers)))
    except WebhookVerificationError as exc:
        raise InvalidWebhook(str(exc)) from exc


def _answer(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            problem = response.json()
        except ValueError:
            problem = {"detail": response.text}
        raise ApiError(response.status_code, problem)
    return response.json()


def _list_params(**filters: Any) -> dict[str, Any]:
    params = {k: v for k, v in filters.items() if v is not None and k != "metadata"}
    if filters.get("metadata"):
        params["metadata"] = [f"{k}:{v}" for k, v in filters["metadata"].items()]
    return params


def _delays(timeout: float) -> Iterator[float]:
    """Waits between checks: half a second, growing to 10 s, until `timeout` is spent."""
    deadline, delay = time.monotonic() + timeout, 0.5
    while time.monotonic() < deadline:
        yield delay
        delay = min(delay * 1.5, 10.0)


class KlingClient:
    """Synchronous client over an `httpx.Client` the caller builds and owns."""

    def __init__(self, http: httpx.Client, base_url: str, api_key: str) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"}

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {**self._headers, **kwargs.pop("headers", {})}
        return _answer(self._http.request(method, self._base + path, headers=headers, **kwargs))

    def upload(self, path: Path) -> str:
        """Upload a local image; answers the `upload_id` to create a generation with."""
        with path.open("rb") as handle:
            return str(
                self._call("POST", "/v1/uploads", files={"file": (path.name, handle)})["upload_id"]
            )

    def create(self, *, idempotency_key: str | None = None, **body: Any) -> Job:
        """Create a generation (`image_url` or `upload_id`, `prompt`, ...). With an
        idempotency key, retrying after a network error cannot create a second job."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return dict(self._call("POST", "/v1/generations", json=body, headers=headers))

    def create_batch(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(self._call("POST", "/v1/generations/batch", json={"items": items}))

    def get(self, job_id: str) -> Job:
        return dict(self._call("GET", f"/v1/generations/{job_id}"))

    def list(self, **filters: Any) -> dict[str, Any]:
        """One page: filters `status`, `created_after`, `created_before`, `metadata` (dict),
        `limit`, `cursor` (the previous page's `next_cursor`)."""
        return dict(self._call("GET", "/v1/generations", params=_list_params(**filters)))

    def cancel(self, job_id: str) -> Job:
        return dict(self._call("POST", f"/v1/generations/{job_id}/cancel"))

    def retry(self, job_id: str, *, idempotency_key: str | None = None) -> Job:
        """A new job with the same inputs as a finished one, `retry_of` naming it."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return dict(self._call("POST", f"/v1/generations/{job_id}/retry", headers=headers))

    def wait(
        self, job_id: str, *, timeout: float = 1800, on_change: Callable[[Job], None] | None = None
    ) -> Job:
        """Poll the job with a growing interval until it ends (completed, failed, cancelled,
        expired)."""
        last = None
        for delay in _delays(timeout):
            job = self.get(job_id)
            if job["status"] != last and on_change:
                on_change(job)
            last = job["status"]
            if last in TERMINAL:
                return job
            time.sleep(delay)
        raise TimeoutError(f"generation {job_id} still {last} after {timeout:.0f}s")

    def download(self, job_id: str, out: Path) -> int:
        """Stream the stored MP4 to `out` (through the API's presigned redirect)."""
        response = self._http.get(
            f"{self._base}/v1/generations/{job_id}/video", headers=self._headers
        )
        if response.status_code != 307:
            _answer(response)
        out.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        with self._http.stream("GET", response.headers["location"]) as video, out.open("wb") as f:
            video.raise_for_status()
            for chunk in video.iter_bytes():
                size += f.write(chunk)
        return size


class AsyncKlingClient:
    """The same client for asyncio services, over an `httpx.AsyncClient`."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, api_key: str) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"}

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {**self._headers, **kwargs.pop("headers", {})}
        response = await self._http.request(method, self._base + path, headers=headers, **kwargs)
        return _answer(response)

    async def create(self, *, idempotency_key: str | None = None, **body: Any) -> Job:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return dict(await self._call("POST", "/v1/generations", json=body, headers=headers))

    async def create_batch(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(await self._call("POST", "/v1/generations/batch", json={"items": items}))

    async def get(self, job_id: str) -> Job:
        return dict(await self._call("GET", f"/v1/generations/{job_id}"))

    async def list(self, **filters: Any) -> dict[str, Any]:
        return dict(await self._call("GET", "/v1/generations", params=_list_params(**filters)))

    async def cancel(self, job_id: str) -> Job:
        return dict(await self._call("POST", f"/v1/generations/{job_id}/cancel"))

    async def wait(self, job_id: str, *, timeout: float = 1800) -> Job:
        last = None
        for delay in _delays(timeout):
            job = await self.get(job_id)
            last = job["status"]
            if last in TERMINAL:
                return job
            await asyncio.sleep(delay)
        raise TimeoutError(f"generation {job_id} still {last} after {timeout:.0f}s")

    async def download(self, job_id: str, out: Path) -> int:
        response = await self._http.get(
            f"{self._base}/v1/generations/{job_id}/video", headers=self._headers
        )
        if response.status_code != 307:
            _answer(response)
        out.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        async with self._http.stream("GET", response.headers["location"]) as video:
            video.raise_for_status()
            with out.open("wb") as f:
                async for chunk in video.aiter_bytes():
                    size += f.write(chunk)
        return size
