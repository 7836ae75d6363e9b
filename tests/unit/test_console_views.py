"""The console's pure parts: the state timeline and the server-drawn charts."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

from api.console import charts
from api.console.routes import templates
from workers.console import timeline
from workers.models import JobEvent

T0 = datetime(2026, 12, 8, 10, 0, tzinfo=UTC)


def event(to: str, seconds: float, from_: str | None = None) -> JobEvent:
    return JobEvent(
        job_id=uuid.uuid4(), from_state=from_, to_state=to, at=T0 + timedelta(seconds=seconds)
    )


def test_the_timeline_times_each_state_until_the_next_and_skips_notes() -> None:
    stays = timeline([
        event("queued", 0),
        event("submitting", 2, "queued"),
        event("processing", 3, "submitting"),
        event("processing", 10, "processing"),  # a note, not a move
        event("completed", 63, "processing"),
    ])  # fmt: skip
    assert [(s.state, s.seconds) for s in stays] == [
        ("queued", 2.0), ("submitting", 1.0), ("processing", 60.0), ("completed", None),
    ]  # fmt: skip


def test_charts_escape_their_labels_and_describe_themselves() -> None:
    points = [(T0 + timedelta(minutes=i), i % 2, 1 - i % 2) for i in range(4)]
    svg = str(charts.throughput(points, "<script>"))
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    assert "2 completions and 2 failures between 10:00 and 10:03 UTC" in svg
    assert svg.count("<rect") == 4
    assert 'aria-label="a&lt;b"' in str(charts.bars([0, 3], "a<b"))


def test_times_shown_as_utc_are_utc_whatever_zone_the_database_answered_in() -> None:
    kolkata = timezone(timedelta(hours=5, minutes=30))
    shown = templates.env.filters["utc"]
    assert shown(datetime(2026, 3, 2, 15, 45, tzinfo=kolkata)) == "2026-03-02 10:15:00"
    assert shown(None) == ""
