"""A small typed client of the HTTP API, used by the `kling` CLI."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

TERMINAL = frozenset({"completed", "failed", "cancelled"})


class ApiError(Exception):
    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(problem.get("detail") or problem.get("title") or f"HTTP {status}")
        self.status = status
        self.problem = problem


class KlingClient:
    def __init__(self, http: httpx.Client, base_url: str, api_key: str) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"}

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, self._base + path, headers=self._headers, **kwargs)
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"detail": response.text}
            raise ApiError(response.status_code, problem)
        return response.json()

    def upload(self, path: Path) -> str:
        with path.open("rb") as handle:
            answer = self._request("POST", "/v1/uploads", files={"file": (path.name, handle)})
        return str(answer["upload_id"])

    def create(self, **body: Any) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/generations", json=body))

    def get(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/generations/{job_id}"))

    def wait(
        self,
        job_id: str,
        *,
        timeout: float = 1800,
        on_change: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll the job with a gently growing interval until it is terminal."""
        deadline, delay, last = time.monotonic() + timeout, 0.5, None
        while True:
            job = self.get(job_id)
            if job["status"] != last and on_change:
                on_change(job)
            last = job["status"]
            if last in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"generation {job_id} still {last} after {timeout:.0f}s")
            time.sleep(delay)
            delay = min(delay * 1.5, 5.0)

    def download(self, job_id: str, out: Path) -> int:
        """Stream the stored MP4 to `out` through the API's presigned redirect."""
        response = self._http.get(
            f"{self._base}/v1/generations/{job_id}/video", headers=self._headers
        )
        if response.status_code != 307:
            raise ApiError(response.status_code, {"detail": response.text})
        out.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        with self._http.stream("GET", response.headers["location"]) as video, out.open("wb") as f:
            video.raise_for_status()
            for chunk in video.iter_bytes():
                size += f.write(chunk)
        return size
