"""The API's calls as data, shared by the sync and the async client: each builder answers
what to send, and whether sending it twice is harmless."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kling_client.types import StateChange

# The API holds a wait at most this long (LONG_POLL_MAX_SECONDS), whatever is asked.
LONG_POLL_SECONDS = 60
# A wait answered sooner than this with nothing new was not held: pause before the next.
MIN_WAIT_SECONDS = 1.0
# Read timeout of a waiting call beyond the wait itself.
WAIT_MARGIN_SECONDS = 30.0
# A stream carries a comment every 15 s: this long without a byte is a dead connection.
STREAM_READ_SECONDS = 60.0


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    params: tuple[tuple[str, str], ...] | None = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes]] | None = None
    # Safe to send again whatever became of an earlier try.
    replayable: bool = False
    # Statuses answered to the caller rather than raised (304 of a wait, 307 of a video).
    passes: tuple[int, ...] = ()
    read_timeout: float | None = None


def settings(base_url: str | None, api_key: str | None) -> tuple[str, str]:
    """The API's URL and key, from the arguments or `KLING_API_URL` / `KLING_API_KEY`."""
    url = base_url or os.environ.get("KLING_API_URL")
    key = api_key or os.environ.get("KLING_API_KEY")
    if not url or not key:
        raise ValueError("give base_url and api_key, or set KLING_API_URL and KLING_API_KEY")
    return url.rstrip("/"), key


def _keyed(key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": key} if key else {}


def create(fields: Mapping[str, Any], key: str | None) -> Call:
    return Call("POST", "/v1/generations", json=dict(fields), headers=_keyed(key),
                replayable=key is not None)  # fmt: skip


def dry_run(fields: Mapping[str, Any]) -> Call:
    # A dry run stores nothing: as safe to repeat as a read.
    body = {**fields, "dry_run": True}
    return Call("POST", "/v1/generations", json=body, replayable=True)


def batch(items: Iterable[Mapping[str, Any]], key: str | None) -> Call:
    body = {"items": [dict(item) for item in items]}
    return Call("POST", "/v1/generations/batch", json=body, headers=_keyed(key),
                replayable=key is not None)  # fmt: skip


def get(job_id: str, wait: float | None, since: str | None) -> Call:
    headers = {}
    seconds = 0
    if wait:
        seconds = max(1, min(int(wait), LONG_POLL_SECONDS))
        headers["Prefer"] = f"wait={seconds}"
    if since:
        headers["If-None-Match"] = f'W/"{since}"'
    return Call(
        "GET", f"/v1/generations/{job_id}", headers=headers, replayable=True, passes=(304,),
        read_timeout=seconds + WAIT_MARGIN_SECONDS if seconds else None,
    )  # fmt: skip


def _when(value: datetime | str | None) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else value


def listing(
    status: str | None,
    created_after: datetime | str | None,
    created_before: datetime | str | None,
    metadata: Mapping[str, Any] | None,
    request_id: str | None,
    limit: int | None,
    cursor: str | None,
) -> Call:
    given = {
        "status": status, "created_after": _when(created_after),
        "created_before": _when(created_before), "request_id": request_id,
        "limit": str(limit) if limit else None, "cursor": cursor,
    }  # fmt: skip
    params = [(name, value) for name, value in given.items() if value is not None]
    params += [("metadata", f"{k}:{v}") for k, v in (metadata or {}).items()]
    return Call("GET", "/v1/generations", params=tuple(params), replayable=True)


def feed(after: str | None, types: Iterable[str] | None, limit: int | None) -> Call:
    params = [("after", after)] if after else []
    params += [("types", kind) for kind in types or ()]
    if limit:
        params.append(("limit", str(limit)))
    return Call("GET", "/v1/events", params=tuple(params), replayable=True)


def history(job_id: str) -> Call:
    return Call("GET", f"/v1/generations/{job_id}/events", replayable=True)


def cancel(job_id: str) -> Call:
    # Cancelling twice leaves the job as the first cancel did.
    return Call("POST", f"/v1/generations/{job_id}/cancel", replayable=True)


def retry(job_id: str, key: str | None) -> Call:
    return Call("POST", f"/v1/generations/{job_id}/retry", headers=_keyed(key),
                replayable=key is not None)  # fmt: skip


def delete(job_id: str) -> Call:
    return Call("DELETE", f"/v1/generations/{job_id}", replayable=True)


def restore(job_id: str) -> Call:
    return Call("POST", f"/v1/generations/{job_id}/restore")


def video(job_id: str) -> Call:
    return Call("GET", f"/v1/generations/{job_id}/video", replayable=True, passes=(307,))


def upload(name: str, data: bytes) -> Call:
    return Call("POST", "/v1/uploads", files={"file": (name, data)})


def get_request(request_id: str) -> Call:
    return Call("GET", f"/v1/requests/{request_id}", replayable=True)


def webhook_secret() -> Call:
    return Call("GET", "/v1/webhook-secret", replayable=True)


def rotate_webhook_secret() -> Call:
    return Call("POST", "/v1/webhook-secret/rotate")


def replay_delivery(delivery_id: str) -> Call:
    return Call("POST", f"/v1/webhook-deliveries/{delivery_id}/replay")


def bulk(kind: str, body: Mapping[str, Any]) -> Call:
    path = {
        "cancel": "/v1/generations/cancel",
        "replay": "/v1/webhook-deliveries/replay",
        "enable": "/v1/webhook-endpoints/enable",
    }[kind]
    return Call("POST", path, json=dict(body))


def bulk_action(action_id: str) -> Call:
    return Call("GET", f"/v1/bulk-actions/{action_id}", replayable=True)


def stream_headers(last_event_id: int | None) -> dict[str, str]:
    return {"Accept": "text/event-stream"} | (
        {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    )


class EventParser:
    """Server-Sent Events, fed line by line; answers each complete `state` event."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._kind = "message"

    def feed(self, line: str) -> StateChange | None:
        if line.startswith(":"):  # a keep-alive comment
            return None
        if line:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._kind = value
            return None
        data, kind = "\n".join(self._data), self._kind
        self._data, self._kind = [], "message"
        if kind != "state" or not data:
            return None
        change: StateChange = json.loads(data)
        return change

    def parse(self, lines: Iterable[str]) -> Iterator[StateChange]:
        for line in lines:
            change = self.feed(line)
            if change is not None:
                yield change
