"""Small helpers for tests: the simulator's admin API, a recording dispatcher, settings."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
from PIL import Image

from config.settings import settings_from
from sandbox.stack import Stack
from workers.dispatch import ROUTES
from workers.runtime import build_s3_client


@dataclass
class RecordingDispatcher:
    """Collects the tasks the pipeline asks for, so a test can run them one by one."""

    sent: list[tuple[str, uuid.UUID, float | None, dict[str, Any]]] = field(default_factory=list)

    def __call__(
        self, task: str, job_id: uuid.UUID, *, countdown: float | None = None, **kwargs: Any
    ) -> None:
        self.sent.append((task, job_id, countdown, kwargs))

    def take(self) -> list[tuple[str, uuid.UUID, float | None, dict[str, Any]]]:
        """The messages so far, which then count as consumed (or, for a test, lost)."""
        sent, self.sent = self.sent, []
        return sent

    def waiting(self, queue: str) -> int:
        """Like a broker's queue length: messages not yet taken, without a countdown."""
        return sum(
            1 for task, _, countdown, _ in self.sent if ROUTES[task] == queue and not countdown
        )


class SimulatorAdmin:
    """The simulator's `/_sim/` admin API."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._http = httpx.Client(base_url=base_url, timeout=30)

    def close(self) -> None:
        self._http.close()

    def set_faults(self, **faults: Any) -> None:
        self._http.put("/_sim/faults", json=faults).raise_for_status()

    def reset_faults(self) -> None:
        self._http.delete("/_sim/faults").raise_for_status()

    def ledger(self) -> dict[str, Any]:
        return dict(self._http.get("/_sim/ledger").raise_for_status().json())

    def prediction(self, prediction_id: str) -> dict[str, Any]:
        for entry in self.ledger()["predictions"]:
            if entry["id"] == prediction_id:
                return dict(entry)
        raise LookupError(prediction_id)


def wait_for(check: Callable[[], Any], *, timeout: float = 60, interval: float = 0.2) -> Any:
    """Wait for a condition the system under test reaches on its own; fail with a clear error."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout}s")
        time.sleep(interval)


def image_bytes(width: int, height: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 60)).save(buffer, format=fmt)
    return buffer.getvalue()


def stored_counts(stack: Stack) -> tuple[int, int, int]:
    """Jobs, outbox rows and objects under `inputs/`."""
    with psycopg.connect(stack.env["DATABASE_URL"].replace("+psycopg", "")) as conn:
        jobs = conn.execute("SELECT count(*) FROM jobs").fetchone()
        outbox = conn.execute("SELECT count(*) FROM outbox").fetchone()
    assert jobs is not None and outbox is not None
    settings = settings_from(stack.env)
    s3 = build_s3_client(settings)
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(
            Bucket=settings.s3_bucket, Prefix="inputs/"
        )
        objects = sum(page.get("KeyCount", 0) for page in pages)
    finally:
        s3.close()
    return int(jobs[0]), int(outbox[0]), objects
