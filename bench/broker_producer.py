"""A producer on the broker, for the chaos run: Celery's own `send_task` of `generation.request`
onto the stack's Redis, with a `reply` it collects as it arrives, and the producer's part of
at-least-once: a request whose message was lost before it was taken (a FLUSHALL) has no
outcome at `GET /v1/requests/{id}`, and is sent again under the same `request_id`.

Its checks: every request has an outcome, no request became two jobs, and every accepted
request's end came back as a reply, once per event id.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import psycopg
import redis
from celery import Celery

REPLY_QUEUE = "chaos-replies"
ENDED = ["generation.completed", "generation.failed", "generation.cancelled",
         "generation.expired", "generation.refused"]  # fmt: skip


@dataclass
class BrokerProducer:
    redis_url: str
    api: httpx.Client
    api_key: str
    upload_id: str
    callback_url: str
    count: int
    sent: int = 0
    resent: int = 0
    # request id -> {event type: webhook ids}
    replies: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def request_ids(self) -> list[str]:
        return [f"chaos-{n}" for n in range(self.count)]

    def start(self, over_seconds: float) -> list[threading.Thread]:
        """Send every request, spread over `over_seconds`, and collect replies meanwhile."""
        threads = [
            threading.Thread(target=self._send_all, args=(over_seconds,), daemon=True),
            threading.Thread(target=self._collect, daemon=True),
        ]
        for thread in threads:
            thread.start()
        return threads

    def stop(self) -> None:
        self._stop.set()

    def _celery(self) -> Celery:
        app = Celery("chaos-producer", broker=self.redis_url)
        app.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
        return app

    def _send(self, app: Celery, request_id: str) -> None:
        kwargs = {
            "api_key": self.api_key, "request_id": request_id, "upload_id": self.upload_id,
            "prompt": f"orbit, request {request_id}", "duration": 5,
            "webhook_url": self.callback_url,
            "reply": {"task": "chaos.video_ready", "queue": REPLY_QUEUE, "events": ENDED},
        }  # fmt: skip
        app.send_task("generation.request", kwargs=kwargs, queue="requests")

    def _send_all(self, over_seconds: float) -> None:
        app = self._celery()
        for request_id in self.request_ids():
            try:
                self._send(app, request_id)
                self.sent += 1
            except Exception as exc:  # Redis restarting: the resend pass after the chaos sends it
                print(f"send of {request_id} failed: {exc!r}", flush=True)
            time.sleep(over_seconds / max(1, self.count))
        app.close()

    def _collect(self) -> None:
        """Take replies off their queue as they come (so a FLUSHALL finds none waiting)."""
        while not self._stop.is_set():
            try:
                client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
                while not self._stop.is_set():
                    popped = cast(list[bytes] | None, client.blpop([REPLY_QUEUE], timeout=1))
                    if popped:
                        self._record(json.loads(popped[1]))
            except redis.RedisError:
                time.sleep(0.5)

    def _record(self, message: dict[str, Any]) -> None:
        _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        request_id = kwargs["data"].get("request_id")
        by_type = self.replies.setdefault(request_id, {})
        by_type.setdefault(kwargs["type"], set()).add(message["headers"]["webhook-id"])

    def outcomes(self) -> dict[str, dict[str, Any] | None]:
        found: dict[str, dict[str, Any] | None] = {}
        for request_id in self.request_ids():
            answer = self.api.get(f"/v1/requests/{request_id}")
            found[request_id] = answer.json() if answer.status_code == 200 else None
        return found

    def resend_missing(self, timeout: float) -> None:
        """Send again, under the same id, every request that has no outcome yet."""
        deadline = time.monotonic() + timeout
        app = self._celery()
        while time.monotonic() < deadline:
            missing = [r for r, found in self.outcomes().items() if found is None]
            if not missing:
                break
            for request_id in missing:
                self._send(app, request_id)
                self.resent += 1
            time.sleep(5)
        app.close()

    def job_ids(self) -> list[str]:
        return [str(o["job_id"]) for o in self.outcomes().values() if o and o.get("job_id")]


def jobs_per_request(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT request_id, count(*) FROM jobs WHERE request_id IS NOT NULL GROUP BY request_id"
        ).fetchall()
    return {request_id: int(n) for request_id, n in rows}
