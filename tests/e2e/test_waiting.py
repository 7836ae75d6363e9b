"""Waiting without polling, on the running stack: `Prefer: wait=N` and the SSE stream, woken by
the database's notifications, holding no thread and no connection while they wait."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import SimulatorAdmin, wait_for

pytestmark = pytest.mark.integration

PROMPT = "slow push-in, hair moving in the wind"


@pytest.fixture
def upload_id(api: httpx.Client, portrait: bytes) -> str:
    answer = api.post("/v1/uploads", files={"file": ("p.png", portrait, "image/png")})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["upload_id"])


@pytest.fixture
def slow(simulator: SimulatorAdmin) -> Iterator[SimulatorAdmin]:
    """Predictions that take a minute: a job stays `processing` until the test moves it."""
    simulator.set_faults(inference_seconds=[60, 60])
    yield simulator


def create(api: httpx.Client, upload_id: str) -> dict[str, Any]:
    answer = api.post("/v1/generations", json={"upload_id": upload_id, "prompt": PROMPT})
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def processing(api: httpx.Client, upload_id: str) -> str:
    job_id = str(create(api, upload_id)["id"])
    wait_for(lambda: api.get(f"/v1/generations/{job_id}").json()["status"] == "processing")
    return job_id


class Canceller(threading.Thread):
    """Cancels the job `after` seconds from now; `done` is when the cancel was answered."""

    def __init__(self, api: httpx.Client, job_id: str, after: float) -> None:
        super().__init__()
        self.api, self.job_id, self.after, self.done = api, job_id, after, 0.0
        self.start()

    def run(self) -> None:
        time.sleep(self.after)
        self.api.post(f"/v1/generations/{self.job_id}/cancel").raise_for_status()
        self.done = time.monotonic()


def cancel_later(api: httpx.Client, job_id: str, after: float) -> Canceller:
    return Canceller(api, job_id, after)


def test_a_wait_answers_when_the_job_changes_not_when_it_runs_out(
    api: httpx.Client, upload_id: str, slow: SimulatorAdmin
) -> None:
    job_id = processing(api, upload_id)
    canceller = cancel_later(api, job_id, 1.0)
    started = time.monotonic()
    answer = api.get(
        f"/v1/generations/{job_id}",
        headers={"Prefer": "wait=30", "If-None-Match": 'W/"processing"'},
    )
    took = time.monotonic() - started
    canceller.join()
    assert answer.status_code == 200
    assert answer.json()["status"] == "cancelled"
    assert answer.headers["ETag"] == 'W/"cancelled"'
    assert answer.headers["Preference-Applied"] == "wait=30"
    assert 0.9 <= took < 10, took


def test_a_wait_that_runs_out_answers_the_job_as_it_is(
    api: httpx.Client, upload_id: str, slow: SimulatorAdmin
) -> None:
    job_id = processing(api, upload_id)
    started = time.monotonic()
    unchanged = api.get(f"/v1/generations/{job_id}", headers={"Prefer": "wait=1"})
    assert unchanged.status_code == 200 and unchanged.json()["status"] == "processing"
    assert time.monotonic() - started >= 0.9
    # Naming the state you have: an unchanged job is a 304, changed, it answers at once.
    same = api.get(
        f"/v1/generations/{job_id}",
        headers={"Prefer": "wait=1", "If-None-Match": unchanged.headers["ETag"]},
    )
    assert same.status_code == 304 and same.headers["ETag"] == 'W/"processing"'
    started = time.monotonic()
    stale = api.get(
        f"/v1/generations/{job_id}", headers={"Prefer": "wait=30", "If-None-Match": 'W/"queued"'}
    )
    assert stale.status_code == 200 and stale.json()["status"] == "processing"
    assert time.monotonic() - started < 5
    api.post(f"/v1/generations/{job_id}/cancel").raise_for_status()


def test_waits_are_refused_clearly(api: httpx.Client, upload_id: str) -> None:
    job_id = create(api, upload_id)["id"]
    bad = api.get(f"/v1/generations/{job_id}", headers={"Prefer": "wait=soon"})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "Prefer"
    other = api.get(
        f"/v1/generations/{job_id}", headers={"Prefer": "wait=1", "Authorization": "Bearer nope"}
    )
    assert other.status_code == 401
    missing = api.get(
        "/v1/generations/00000000-0000-4000-8000-000000000000", headers={"Prefer": "wait=5"}
    )
    assert missing.status_code == 404
    stream = api.get(f"/v1/generations/{job_id}/events/stream", headers={"Last-Event-ID": "x"})
    assert stream.status_code == 422 and stream.json()["errors"][0]["field"] == "Last-Event-ID"


def test_many_waiters_hold_no_thread_and_no_connection(
    api: httpx.Client, stack_info: dict[str, Any], upload_id: str, slow: SimulatorAdmin
) -> None:
    """More waiters than the API has threads (40) and database connections (10): had any
    wait held either, the waits would queue behind one another or fail for want of one."""
    job_id = processing(api, upload_id)
    headers = {**api.headers, "Prefer": "wait=30", "If-None-Match": 'W/"processing"'}

    async def wait_one(client: httpx.AsyncClient) -> tuple[httpx.Response, float]:
        answer = await client.get(f"/v1/generations/{job_id}", headers=headers)
        return answer, time.monotonic()

    async def wait_all() -> list[tuple[httpx.Response, float]]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(
            base_url=stack_info["api_url"], timeout=60, limits=limits
        ) as client:
            return await asyncio.gather(*(wait_one(client) for _ in range(120)))

    canceller = cancel_later(api, job_id, 3.0)
    answers = asyncio.run(wait_all())
    canceller.join()
    assert {a.status_code for a, _ in answers} == {200}
    assert {a.json()["status"] for a, _ in answers} == {"cancelled"}
    # Woken by the change, not by a turn at a thread: the last answer soon after the cancel.
    assert max(at for _, at in answers) - canceller.done < 5


def events_of(response: httpx.Response) -> Iterator[tuple[int, dict[str, Any]]]:
    """(id, data) of each `state` event of a Server-Sent Events body."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if fields.get("event") == "state":
                yield int(fields["id"]), json.loads(fields["data"])
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value


def test_the_event_stream_follows_a_job_to_its_end_and_resumes(
    api: httpx.Client, upload_id: str
) -> None:
    job_id = create(api, upload_id)["id"]
    with api.stream("GET", f"/v1/generations/{job_id}/events/stream") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        seen = list(events_of(stream))  # the stream ends by itself at the job's end
    states = [data["to"] for _, data in seen]
    assert states == ["queued", "submitting", "processing", "storing", "completed"]
    assert seen[-1][1]["generation"]["status"] == "completed"
    ids = [event_id for event_id, _ in seen]
    assert ids == sorted(ids)
    resumed = api.get(
        f"/v1/generations/{job_id}/events/stream", headers={"Last-Event-ID": str(ids[1])}
    )
    assert [data["to"] for _, data in events_of(resumed)] == states[2:]


def test_the_feed_has_every_event_once_in_order(api: httpx.Client, upload_id: str) -> None:
    first = api.get("/v1/events", params={"limit": 500}).json()
    mark = first["next_cursor"]
    job_id = create(api, upload_id)["id"]
    cancelled = create(api, upload_id)["id"]
    api.post(f"/v1/generations/{cancelled}/cancel").raise_for_status()
    wait_for(lambda: api.get(f"/v1/generations/{job_id}").json()["status"] == "completed")

    def rest() -> list[dict[str, Any]]:
        params = {"after": mark} if mark else {}
        return list(api.get("/v1/events", params=params).json()["data"])

    events = wait_for(lambda: (found := rest()) and len(found) >= 3 and found)
    by_job = [(e["data"]["id"], e["type"]) for e in events]
    assert (cancelled, "generation.cancelled") in by_job
    assert by_job.index((job_id, "generation.processing")) < by_job.index(
        (job_id, "generation.completed")
    )
    assert len({e["id"] for e in events}) == len(events)
    since = {"after": mark} if mark else {}
    only = api.get("/v1/events", params={"types": "generation.cancelled", **since}).json()
    assert {e["type"] for e in only["data"]} == {"generation.cancelled"}
    assert cancelled in {e["data"]["id"] for e in only["data"]}
    unknown = api.get("/v1/events", params={"after": "msg_" + "0" * 32})
    assert unknown.status_code == 422 and unknown.json()["errors"][0]["field"] == "after"
