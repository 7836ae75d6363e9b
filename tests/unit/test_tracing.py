"""The job's trace across the broker, with an in-memory exporter: what the outbox relay (or
anyone working for many jobs) publishes joins the job's trace, a task of the job's chain keeps
its own span as the parent, the context rides in the message headers, a callback names the
trace; and with tracing off none of it happens."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from celery import Celery, signals
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from config import tracing
from workers import callbacks
from workers.dispatch import SUBMIT, CeleryDispatcher, Message, publish

JOB_TRACE = "0af7651916cd43dd8448eb211c80319c"
JOB_SPAN = "b7ad6b7169203331"
JOB = f"00-{JOB_TRACE}-{JOB_SPAN}-01"


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """Tracing on for the test, into memory (the process's global provider is left alone)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "tracer", provider.get_tracer("kling"))
    monkeypatch.setattr(tracing, "_enabled", True)
    return exporter


@pytest.fixture
def sent() -> Iterator[list[dict[str, Any]]]:
    """The headers of every message published, as the broker gets them."""
    published: list[dict[str, Any]] = []

    def grab(headers: dict[str, Any] | None = None, **_: Any) -> None:
        published.append(dict(headers or {}))

    signals.before_task_publish.connect(grab, weak=False)
    yield published
    signals.before_task_publish.disconnect(grab)


@pytest.fixture
def dispatch() -> CeleryDispatcher:
    return CeleryDispatcher(Celery("test", broker="memory://"), retry=False)


def ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


def test_a_relayed_message_is_published_in_its_jobs_trace_not_the_relays(
    exporter: InMemorySpanExporter, sent: list[dict[str, Any]], dispatch: CeleryDispatcher
) -> None:
    with tracing.span("outbox.relay"):
        publish(dispatch, [Message(SUBMIT, uuid.uuid4(), traceparent=JOB)])
    spans = {s.name: s for s in exporter.get_finished_spans()}
    published = spans[f"publish {SUBMIT}"]
    assert published.parent is not None
    assert ids(published)[0] == JOB_TRACE
    assert format(published.parent.span_id, "016x") == JOB_SPAN
    assert ids(spans["outbox.relay"])[0] != JOB_TRACE
    # The task's run is the publish span's child: its context is in the message.
    (headers,) = sent
    assert headers["traceparent"] == f"00-{JOB_TRACE}-{ids(published)[1]}-01"


def test_a_task_of_the_jobs_chain_stays_the_parent_of_what_it_publishes(
    exporter: InMemorySpanExporter, sent: list[dict[str, Any]], dispatch: CeleryDispatcher
) -> None:
    with tracing.within(JOB), tracing.span("run/generation.poll"):
        publish(dispatch, [Message(SUBMIT, uuid.uuid4(), traceparent=JOB)])
    spans = {s.name: s for s in exporter.get_finished_spans()}
    published, run = spans[f"publish {SUBMIT}"], spans["run/generation.poll"]
    assert published.parent is not None
    assert format(published.parent.span_id, "016x") == ids(run)[1]


def test_a_callback_attempt_sends_the_traceparent_of_its_jobs_trace(
    exporter: InMemorySpanExporter,
) -> None:
    seen: list[dict[str, str]] = []

    def post(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        seen.append(headers)
        return httpx.Response(204)

    attempt = callbacks.Attempt(
        uuid.uuid4(), uuid.uuid4(), "https://x.test/h", "https://x.test:443", b"{}",
        {"webhook-id": "msg_1"}, datetime.now(UTC), traceparent=JOB,
    )  # fmt: skip
    with tracing.within(attempt.traceparent), tracing.span("callback.post"):
        assert callbacks._attempt(post, attempt)[0] == 204
    (post_span,) = exporter.get_finished_spans()
    assert seen[0]["traceparent"] == f"00-{JOB_TRACE}-{ids(post_span)[1]}-01"
    assert seen[0]["webhook-id"] == "msg_1"


def test_with_tracing_off_nothing_is_traced_or_sent(
    sent: list[dict[str, Any]], dispatch: CeleryDispatcher
) -> None:
    assert not tracing.enabled()
    with tracing.within(JOB), tracing.span("outbox.relay") as span:
        assert not span.is_recording()
        assert tracing.current_traceparent() is None
        publish(dispatch, [Message(SUBMIT, uuid.uuid4(), traceparent=JOB)])
    (headers,) = sent
    assert "traceparent" not in headers
