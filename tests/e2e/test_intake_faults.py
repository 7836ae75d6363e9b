"""Accepting jobs when what the API depends on is gone, and under load: a committed job is
always answered 201 (the broker may be away), a failure before the commit answers 503 and
leaves nothing, every batch item gets its own outcome, and limits answer 429."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import psycopg
import pytest

from config.settings import settings_from
from sandbox.processes import Process, free_port
from sandbox.stack import Stack
from tests.e2e.test_wavespeed_webhook import signed_headers
from tests.support import wait_for
from workers import tenants
from workers.db import make_engine, make_session_factory, unit_of_work
from workers.sealing import Sealer

pytestmark = pytest.mark.integration

PROMPT = "slow push-in, hair moving in the wind"


@dataclass
class Deployment:
    """An API process of its own on the test stack (its workers and beat are the stack's)."""

    url: str
    key: str
    tenant_id: str
    process: Process

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


@contextmanager
def deployment(stack: Stack, name: str, **env: str) -> Iterator[Deployment]:
    engine = make_engine(stack.env["DATABASE_URL"], pool_size=1)
    with unit_of_work(make_session_factory(engine)) as session:
        sealer = Sealer.from_settings(settings_from(stack.env))
        tenant = tenants.create_tenant(session, f"{name}-{uuid.uuid4().hex[:6]}", sealer)
        _, key = tenants.create_key(session, tenant)
    engine.dispose()
    port = free_port()
    process = stack.start_api(name, port, env)
    try:
        yield Deployment(f"http://127.0.0.1:{port}", key, tenant.id, process)
    finally:
        process.stop()


def closed_port() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


def count_jobs(stack: Stack, tenant_id: str) -> int:
    dsn = stack.env["DATABASE_URL"].replace("+psycopg", "")
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM jobs WHERE tenant_id = %s", (tenant_id,))
        return int(row.fetchone()[0])  # type: ignore[index]


def upload(api: httpx.Client, portrait: bytes) -> str:
    answer = api.post("/v1/uploads", files={"file": ("p.png", portrait, "image/png")})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["upload_id"])


def test_with_the_broker_gone_a_committed_job_is_answered_201_and_still_runs(
    stack: Stack, portrait: bytes
) -> None:
    # An API whose broker refuses connections; the stack's beat relays the outbox later.
    broker = f"redis://{closed_port()}/0"
    with deployment(stack, "no-broker", REDIS_URL=broker) as cut, cut.client() as client:
        upload_id = upload(client, portrait)
        created = [
            client.post("/v1/generations", json={"upload_id": upload_id, "prompt": PROMPT})
            for _ in range(4)
        ]
    assert [c.status_code for c in created] == [201] * 4
    assert count_jobs(stack, cut.tenant_id) == 4  # one job per request, no more
    for job in created:
        job_id = job.json()["id"]
        wait_for(lambda j=job_id: _status(stack, j) == "completed", timeout=120)


def _status(stack: Stack, job_id: str) -> str:
    dsn = stack.env["DATABASE_URL"].replace("+psycopg", "")
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT status FROM jobs WHERE id = %s", (job_id,)).fetchone()
        return str(row[0]) if row else ""


def test_with_s3_gone_a_create_answers_503_and_leaves_nothing(
    stack: Stack, portrait: bytes
) -> None:
    env = {"S3_ENDPOINT_URL": f"http://{closed_port()}", "S3_CONNECT_TIMEOUT": "1"}
    with (
        deployment(stack, "no-s3", **env) as cut,
        cut.client() as client,
        _serve_once(portrait) as url,
    ):
        refused = client.post("/v1/generations", json={"image_url": url, "prompt": ""})
        answer = client.post("/v1/generations", json={"image_url": url, "prompt": PROMPT})
    assert refused.status_code == 422  # a refusal is still a refusal, S3 or not
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"].isdigit()
    assert answer.json()["code"] == "unavailable"
    assert count_jobs(stack, cut.tenant_id) == 0


def test_with_postgres_gone_requests_answer_503_quickly(stack: Stack) -> None:
    url = f"postgresql+psycopg://postgres@{closed_port()}/kling"
    with deployment(stack, "no-postgres", DATABASE_URL=url) as cut:
        started = time.monotonic()
        answer = httpx.post(
            f"{cut.url}/v1/generations",
            json={"image_url": "https://example.com/x.png", "prompt": PROMPT},
            headers={"Authorization": "Bearer kl_whatever"},
            timeout=60,
        )
        elapsed = time.monotonic() - started
    assert answer.status_code == 503 and answer.json()["code"] == "unavailable"
    assert elapsed < 30  # an upper bound against hanging, not a speed target


class SlowImage:
    """Serves the portrait, holding every answer until `release()`."""

    def __init__(self, image: bytes) -> None:
        self.image = image
        self.gate = threading.Event()
        self.requests = 0
        served = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served.requests += 1
                served.gate.wait(120)
                self.send_response(200)
                self.send_header("content-type", "image/png")
                self.send_header("content-length", str(len(served.image)))
                self.end_headers()
                self.wfile.write(served.image)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/portrait.png"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self) -> None:
        self.gate.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def _serve_once(image: bytes) -> Iterator[str]:
    slow = SlowImage(image)
    slow.release()
    try:
        yield slow.url
    finally:
        slow.close()


def test_every_batch_item_gets_its_own_outcome_even_a_5xx_one(
    stack: Stack, portrait: bytes
) -> None:
    env = {"S3_ENDPOINT_URL": f"http://{closed_port()}", "S3_CONNECT_TIMEOUT": "1"}
    with (
        deployment(stack, "batch-no-s3", **env) as cut,
        cut.client() as client,
        _serve_once(portrait) as url,
    ):
        answer = client.post(
            "/v1/generations/batch",
            json={"items": [{"prompt": ""}, {"image_url": url, "prompt": PROMPT}]},
        )
    assert answer.status_code == 200, answer.text
    items = answer.json()["items"]
    assert [i["status"] for i in items] == [422, 503]
    assert items[1]["problem"]["code"] == "unavailable"
    assert answer.json()["accepted"] == 0
    assert count_jobs(stack, cut.tenant_id) == 0


def test_a_batch_retried_with_its_idempotency_key_creates_nothing_twice(
    stack: Stack, portrait: bytes
) -> None:
    with deployment(stack, "batch-keys") as mine, mine.client() as client:
        upload_id = upload(client, portrait)
        items = [{"upload_id": upload_id, "prompt": f"{PROMPT}, take {n}"} for n in range(3)]
        items[2]["idempotency_key"] = "my-own-key"
        headers = {"Idempotency-Key": f"nightly-{uuid.uuid4().hex}"}
        first = client.post("/v1/generations/batch", json={"items": items}, headers=headers)
        again = client.post("/v1/generations/batch", json={"items": items}, headers=headers)
        items[1]["prompt"] = "another prompt under the same key"
        changed = client.post("/v1/generations/batch", json={"items": items}, headers=headers)
        alone = client.post(
            "/v1/generations/batch", json={"items": [items[2]]}, headers={"Idempotency-Key": "x"}
        )
    assert [i["status"] for i in first.json()["items"]] == [201, 201, 201]
    assert [i["status"] for i in again.json()["items"]] == [200, 200, 200]
    ids = [i["generation"]["id"] for i in first.json()["items"]]
    assert [i["generation"]["id"] for i in again.json()["items"]] == ids
    assert [i["status"] for i in changed.json()["items"]] == [200, 409, 200]
    assert changed.json()["items"][1]["problem"]["code"] == "idempotency_conflict"
    # An item's own key holds whatever batch it comes in.
    assert alone.json()["items"][0]["generation"]["id"] == ids[2]
    assert count_jobs(stack, mine.tenant_id) == 3


def test_a_key_over_its_rate_limit_gets_429_with_its_headers(stack: Stack) -> None:
    with deployment(stack, "rate", RATE_LIMIT="5/minute") as mine, mine.client() as client:
        answers = [client.get("/v1/generations") for _ in range(5)]
        over = client.get("/v1/generations")
        batch = client.post("/v1/generations/batch", json={"items": [{"prompt": "x"}] * 3})
    assert [a.status_code for a in answers] == [200] * 5
    assert answers[0].headers["ratelimit-limit"] == "5"
    assert [a.headers["ratelimit-remaining"] for a in answers] == ["4", "3", "2", "1", "0"]
    assert over.status_code == 429 and over.json()["code"] == "rate_limited"
    assert int(over.headers["retry-after"]) > 0
    assert batch.status_code == 429


def test_a_tenants_big_batches_neither_run_side_by_side_nor_hold_up_wavespeeds_webhook(
    stack: Stack, portrait: bytes
) -> None:
    slow = SlowImage(portrait)
    # Image fetches that wait longer than the whole test, so nothing gives up on its own.
    env = {
        "TENANT_MAX_BATCHES": "1",
        "TENANT_MAX_IMAGE_FETCHES": "60",
        "IMAGE_FETCH_TIMEOUT_SECONDS": "120",
    }
    try:
        with deployment(stack, "busy", **env) as busy, ThreadPoolExecutor(64) as pool:
            item = {"image_url": slow.url, "prompt": PROMPT}

            def batch(size: int) -> httpx.Response:
                with busy.client() as client:
                    return client.post("/v1/generations/batch", json={"items": [item] * size})

            def single() -> httpx.Response:
                with busy.client() as client:
                    return client.post("/v1/generations", json=item)

            running = pool.submit(batch, 8)
            wait_for(lambda: slow.requests >= 8, timeout=30)
            second = pool.submit(batch, 2).result(timeout=60)
            # Enough single creates to take every thread the API's producer routes share.
            singles = [pool.submit(single) for _ in range(48)]
            wait_for(lambda: slow.requests >= 40, timeout=30)
            body = json.dumps({"id": f"p-{uuid.uuid4().hex}", "status": "completed"}).encode()
            secret = stack.env["WAVESPEED_WEBHOOK_SECRET"]
            webhook = httpx.post(
                f"{busy.url}/v1/wavespeed/webhook", content=body,
                headers=signed_headers(secret, f"p-{uuid.uuid4().hex}", body), timeout=30,
            )  # fmt: skip
            held = not slow.gate.is_set() and not running.done()
            slow.release()
            assert running.result(timeout=60).status_code == 200
            assert all(s.result(timeout=120).status_code < 500 for s in singles)
    finally:
        slow.close()
    assert second.status_code == 429 and second.json()["code"] == "too_many_batches"
    # WaveSpeed was answered while every producer request was still stuck on its image.
    assert webhook.status_code == 204 and held
