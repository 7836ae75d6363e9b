"""Log lines carry the trace they were written in: `trace_id` and `span_id` of the current
span, through the product's logging configuration, as the JSON a deployment writes."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider

from config.logging import configure_logging


@pytest.fixture
def lines() -> Iterator[Any]:
    configure_logging("json", "INFO")
    captured = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(captured)

    def read() -> list[dict[str, Any]]:
        return [json.loads(line) for line in captured.getvalue().splitlines()]

    yield read


def test_a_line_written_inside_a_span_names_its_trace_and_span(lines: Any) -> None:
    # A provider of its own: the global one is the process's, set at most once.
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        structlog.get_logger("t").info("inside.span")
        logging.getLogger("plain.stdlib").warning("inside too")
    ids = span.get_span_context()
    inside, stdlib = lines()
    assert inside["trace_id"] == format(ids.trace_id, "032x")
    assert inside["span_id"] == format(ids.span_id, "016x")
    assert stdlib["trace_id"] == inside["trace_id"]


def test_a_line_written_outside_any_span_has_no_trace_fields(lines: Any) -> None:
    structlog.get_logger("t").info("no.span")
    (line,) = lines()
    assert "trace_id" not in line and "span_id" not in line
