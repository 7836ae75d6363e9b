"""One job is one trace, from the producer's create to our callback: an API and a worker of
their own, exporting over OTLP/HTTP to a sink (`sandbox.otlp`) as a deployment would to its
collector, on a database and a Redis database of their own so the stack's own worker takes
none of their messages. In the first test the submit message is lost on the way (Redis
flushed), so the job reaches the worker only through the outbox relay; in the second the job
comes over the broker (`generation.request`) in the trace its message's headers name."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy.engine import make_url

from config import Settings
from config.settings import settings_from
from sandbox.otlp import Sink, Span
from sandbox.otlp import serve as serve_sink
from sandbox.processes import free_port
from sandbox.receiver import Receiver
from sandbox.receiver import serve as serve_receiver
from sandbox.stack import Stack
from tests.support import wait_for
from workers import tenants
from workers.celery_app import create_celery
from workers.db import make_engine, make_session_factory, unit_of_work
from workers.dispatch import RECONCILE
from workers.sealing import Sealer

pytestmark = pytest.mark.integration

PRODUCER_TRACE = uuid.uuid4().hex
PRODUCER_SPAN = uuid.uuid4().hex[:16]
TASKS = ("submit", "poll", "store", "notify")


@pytest.fixture
def sink() -> Iterator[Sink]:
    with serve_sink(Sink()) as sink:
        yield sink


@pytest.fixture
def traced(stack: Stack, database_url: str, sink: Sink) -> Iterator[dict[str, Any]]:
    """An API and a worker exporting to `sink`, on a database and Redis database of their
    own; answers their environment, the API's URL and a producer's API key."""
    redis_url = make_url(stack.env["REDIS_URL"]).set(database="7").render_as_string(False)
    redis.Redis.from_url(redis_url).flushdb()
    port = free_port()
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    engine = make_engine(database_url, pool_size=1)
    sealer = Sealer.from_settings(settings_from(stack.env))
    with unit_of_work(make_session_factory(engine)) as session:
        tenant = tenants.create_tenant(session, f"traced-{uuid.uuid4().hex[:6]}", sealer)
        _, token = tenants.create_key(session, tenant)
    engine.dispose()
    stack.start_api("api-traced", port, env)
    try:
        yield {"env": env, "api_url": f"http://127.0.0.1:{port}", "token": token}
    finally:
        for process in [p for p in stack.apps if p.name in ("api-traced", "worker-traced")]:
            process.stop()
            stack.apps.remove(process)


def test_one_job_is_one_trace_from_the_producers_create_to_our_callback(
    stack: Stack, traced: dict[str, Any], sink: Sink, portrait: bytes
) -> None:
    env = traced["env"]
    producer = {"Authorization": f"Bearer {traced['token']}"}
    with (
        httpx.Client(base_url=traced["api_url"], headers=producer, timeout=60) as api,
        serve_receiver(Receiver()) as receiver,
    ):
        upload = api.post("/v1/uploads", files={"file": ("p.png", portrait, "image/png")})
        assert upload.status_code == 201, upload.text
        body = {
            "upload_id": upload.json()["upload_id"],
            "prompt": "slow push-in on the face",
            "webhook_url": receiver.url,
        }
        traceparent = f"00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01"
        created = api.post("/v1/generations", json=body, headers={"traceparent": traceparent})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]

        # The message the create published is lost: only the outbox relay can bring it.
        redis.Redis.from_url(env["REDIS_URL"]).flushdb()
        stack.start_worker("worker-traced", concurrency=1, env=env)
        relay_until_taken(env, api, job_id)
        job = wait_for(lambda: finished(api, job_id), timeout=120, interval=0.5)
        assert job["status"] == "completed", job
        callback = wait_for(lambda: receiver.received, timeout=60)[0]

    spans = wait_for(lambda: complete_trace(sink), timeout=60, interval=0.5)
    services = {s.service for s in spans}
    assert services == {"kling-api", "kling-worker"}, services

    # The create joined the producer's trace: its server span is the child of theirs.
    (create,) = [s for s in spans if s.kind == "server" and s.name == "POST /v1/generations"]
    assert create.parent_id == PRODUCER_SPAN

    # The relay, working for any number of jobs in a trace of its own, published this job's
    # submit in the job's trace, under the create.
    relayed = [s for s in spans if s.name == "publish generation.submit"]
    assert any(s.service == "kling-worker" and s.parent_id == create.span_id for s in relayed)
    assert sink.named("outbox.relay") and all(
        s.trace_id != PRODUCER_TRACE for s in sink.named("outbox.relay")
    )

    # Each task of the chain ran in the trace, under a publish span of it.
    by_id = {s.span_id: s for s in spans}
    for task in TASKS:
        runs = [s for s in spans if s.name == f"run/generation.{task}"]
        assert runs, f"no run of generation.{task} in the job's trace"
        assert all(by_id[s.parent_id or ""].name.startswith("publish ") for s in runs), task

    # WaveSpeed's API, the CDN download and S3 upload, and the database, each seen by the
    # worker inside the trace.
    worker = [s for s in spans if s.service == "kling-worker"]
    urls = [str(s.attributes.get("http.url") or s.attributes.get("url.full")) for s in worker]
    base = stack.env["WAVESPEED_BASE_URL"]
    assert any(url.startswith(f"{base}/api/v3/") for url in urls), urls
    assert any(s.name == "s3.copy_output" for s in worker)
    assert any(s.attributes.get("rpc.service") == "S3" for s in worker)
    for service in services:
        assert any(
            s.service == service and s.attributes.get("db.system") == "postgresql" for s in spans
        ), service

    # The callback POST is in the trace, and the receiver was told so.
    (post,) = [s for s in spans if s.name == "callback.post"]
    assert callback.headers["traceparent"].split("-")[1] == PRODUCER_TRACE
    # (httpx's instrumentation puts its client span's id there, a child of the POST's.)
    sent_from = callback.headers["traceparent"].split("-")[2]
    assert sent_from == post.span_id or by_id[sent_from].parent_id == post.span_id


def test_a_broker_request_joins_the_trace_its_message_headers_name(
    stack: Stack, traced: dict[str, Any], sink: Sink, portrait: bytes
) -> None:
    env = traced["env"]
    producer = {"Authorization": f"Bearer {traced['token']}"}
    with httpx.Client(base_url=traced["api_url"], headers=producer, timeout=60) as api:
        upload = api.post("/v1/uploads", files={"file": ("p.png", portrait, "image/png")})
    assert upload.status_code == 201, upload.text
    stack.start_worker("worker-traced", concurrency=1, env=env)
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    request = {
        "api_key": traced["token"],
        "request_id": f"order-{uuid.uuid4().hex[:8]}",
        "upload_id": upload.json()["upload_id"],
        "prompt": "slow pan right",
    }
    # What a producer's own OpenTelemetry Celery instrumentation puts in the headers.
    create_celery(Settings(redis_url=env["REDIS_URL"])).send_task(
        "generation.request", kwargs=request, queue="requests",
        headers={"traceparent": f"00-{trace_id}-{span_id}-01"},
    )  # fmt: skip

    def submitted() -> list[Span] | None:
        spans = sink.trace(trace_id)
        return spans if any(s.name == "run/generation.submit" for s in spans) else None

    spans = wait_for(submitted, timeout=90, interval=0.5)
    (taken,) = [s for s in spans if s.name == "run/generation.request"]
    assert taken.parent_id == span_id
    assert any(s.name == "publish generation.submit" for s in spans)


def relay_until_taken(env: dict[str, str], api: httpx.Client, job_id: str) -> None:
    """Ask the traced worker for reconciler ticks (no beat runs for it) until the relay has
    published the lost submit and the job left `queued`."""
    celery = create_celery(Settings(redis_url=env["REDIS_URL"]))

    def taken() -> bool:
        if api.get(f"/v1/generations/{job_id}").json()["status"] != "queued":
            return True
        celery.send_task(RECONCILE, queue="maintenance")
        return False

    wait_for(taken, timeout=60, interval=2.0)


def finished(api: httpx.Client, job_id: str) -> dict[str, Any] | None:
    job = api.get(f"/v1/generations/{job_id}").json()
    return job if job["status"] in ("completed", "failed", "cancelled") else None


def complete_trace(sink: Sink) -> list[Span] | None:
    """The job's trace once its last span, the callback POST, has been exported."""
    spans = sink.trace(PRODUCER_TRACE)
    return spans if any(s.name == "callback.post" for s in spans) else None
