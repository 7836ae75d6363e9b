"""OpenTelemetry traces, set up once per process: on when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
(spans go there over OTLP/HTTP, batched), off otherwise.

Off, no provider is installed, no library is instrumented, and the helpers here return before
touching OpenTelemetry (`bench.throughput` measures on against off). On, the maintained
instrumentations trace FastAPI, Celery's task runs, httpx, botocore and redis; SQLAlchemy is
traced per engine (`instrument_engine`, called by `workers.db.make_engine`).

A job's trace crosses the outbox: its messages may be published long after the request that
created it, by a relay or a reconciler working for many jobs at once. So the creating context
is stored with the job (`jobs.traceparent`) and every publish made on the job's behalf is a
`publish <task>` span of that trace (`publishing`), whose context travels in the message
headers; Celery's own publish spans are switched off (see `_instrument_celery`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context, propagate, trace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter
    from sqlalchemy import Engine

ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACEPARENT = "traceparent"

tracer = trace.get_tracer("kling")
_enabled = False


def enabled() -> bool:
    """Whether this process exports spans."""
    return _enabled


def setup(service: str, *, exporter: SpanExporter | None = None) -> bool:
    """Install the tracer provider and instrument the libraries, if an OTLP endpoint is set
    (or `exporter` is given, e.g. an in-memory one). Answers whether tracing is on; a
    second call changes nothing. `service` names the process (`kling-<service>`) unless
    `OTEL_SERVICE_NAME` does."""
    global _enabled
    if _enabled:
        return True
    if exporter is None:
        if not os.environ.get(ENDPOINT):
            return False
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; ours only fills in.
    named = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: f"kling-{service}"}
    provider = TracerProvider(resource=Resource.create(named))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _instrument_libraries()
    _enabled = True
    return True


def _instrument_libraries() -> None:
    from opentelemetry.instrumentation.botocore import BotocoreInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    HTTPXClientInstrumentor().instrument(request_hook=_scrubbed_url)
    BotocoreInstrumentor().instrument()
    RedisInstrumentor().instrument()
    _instrument_celery()


def _scrubbed_url(span: trace.Span, request: Any) -> None:
    """The URL a span records, scrubbed as log lines are: presigned S3 queries (the
    instrumentation redacts only v2 signatures) and callback URLs whose path is a token."""
    from config.logging import scrub

    recorded = getattr(span, "attributes", None) or {}
    for key in ("http.url", "url.full"):
        if key in recorded:
            span.set_attribute(key, scrub(str(request.url)))


def _instrument_celery() -> None:
    """Task runs become spans whose parent is the context in their message headers. Celery's
    publish spans are disconnected: for a task sent by name that the sending process has not
    registered (the API sends every task that way) the instrumentation starts a span and
    makes it current but never ends it, so everything after it in that thread would nest
    under a span that is never exported. `publishing` makes our own instead."""
    from celery import signals
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    instrumentor = CeleryInstrumentor()
    instrumentor.instrument()
    signals.before_task_publish.disconnect(instrumentor._trace_before_publish)
    signals.after_task_publish.disconnect(instrumentor._trace_after_publish)


def instrument_app(app: Any) -> None:
    """Server spans for a FastAPI app; their parent is a caller's `traceparent`, if sent."""
    if _enabled:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        # The ASGI send/receive spans (one per body chunk) say nothing the server span does not.
        FastAPIInstrumentor.instrument_app(
            app, excluded_urls="healthz,readyz,metrics", exclude_spans=["receive", "send"]
        )


def instrument_engine(engine: Engine) -> None:
    """Spans for every statement and connection of `engine`. The instrumentor's own
    `instrument(engine=...)` takes one engine per process; ours build several."""
    if not _enabled:
        return
    from opentelemetry.instrumentation.sqlalchemy import engine as traced
    from opentelemetry.metrics import get_meter

    usage = get_meter("kling.db").create_up_down_counter("db.client.connections.usage")
    traced.EngineTracer(trace.get_tracer("opentelemetry.instrumentation.sqlalchemy"), engine, usage)


def current_traceparent() -> str | None:
    """The W3C `traceparent` of the current span (None when tracing is off or no span is)."""
    if not _enabled:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get(TRACEPARENT)


@contextmanager
def within(traceparent: str | None) -> Iterator[None]:
    """Make the span `traceparent` names the current one for the block, unless it is None
    or the current span is in its trace already (a task of the job's chain keeps its own)."""
    if not (_enabled and traceparent):
        yield
        return
    wanted = propagate.extract({TRACEPARENT: traceparent})
    here = trace.get_current_span().get_span_context()
    if (
        here.is_valid
        and here.trace_id == trace.get_current_span(wanted).get_span_context().trace_id
    ):
        yield
        return
    token = context.attach(wanted)
    try:
        yield
    finally:
        context.detach(token)


@contextmanager
def publishing(task: str, headers: MutableMapping[str, Any]) -> Iterator[None]:
    """A `publish <task>` span around sending a message, its context put into `headers` so
    the task's run is its child."""
    if not _enabled:
        yield
        return
    with tracer.start_as_current_span(
        f"publish {task}",
        kind=trace.SpanKind.PRODUCER,
        attributes={"messaging.system": "celery", "messaging.destination.name": task},
    ):
        propagate.inject(headers)
        yield


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[trace.Span]:
    """A span of our own around a step (`outbox.relay`, `s3.copy_output`); off, a span that
    records nothing."""
    if not _enabled:
        yield trace.INVALID_SPAN
        return
    with tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def log_ids(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: the current span's `trace_id` and `span_id`, when one is."""
    ids = trace.get_current_span().get_span_context()
    if ids.is_valid:
        event_dict.setdefault("trace_id", format(ids.trace_id, "032x"))
        event_dict.setdefault("span_id", format(ids.span_id, "016x"))
    return event_dict


def flush(timeout_ms: int = 5000) -> None:
    """Export what is batched (before a process exits, or for a test to read)."""
    provider = trace.get_tracer_provider()
    force_flush = getattr(provider, "force_flush", None)
    if force_flush is not None:
        force_flush(timeout_ms)
