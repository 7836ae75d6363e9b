"""What the console reads, on a real Postgres: counts, throughput, failures by code, spend,
and the cross-tenant job list."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import text, update

from tests.integration.flow import new_job
from workers import console, listing, tenants
from workers.db import unit_of_work
from workers.errors import ErrorCode
from workers.models import JobEvent
from workers.pipeline import Pipeline, utcnow
from workers.states import JobState

pytestmark = pytest.mark.integration


def test_the_overview_and_the_failures_count_what_happened(
    pipeline: Pipeline, portrait: bytes
) -> None:
    waiting = new_job(pipeline, portrait)
    failed = [new_job(pipeline, portrait, metadata={"batch": "b1"}) for _ in range(2)]
    for job_id in failed:
        assert pipeline.fail(job_id, JobState.QUEUED, ErrorCode.INVALID_INPUT, "bad input")
    now = utcnow()
    with pipeline.sessions() as session:
        # No broker at all: its queues are left out, and everything else still shows.
        seen = console.overview(session, None, pipeline.settings, now)
        groups = console.failures(session, now)
        found, _ = listing.page(
            session, None, listing.JobFilter(error_codes=(ErrorCode.INVALID_INPUT,)), limit=10
        )
        view = console.job_view(session, failed[0])
    assert seen.states["queued"] == 1 and seen.states["failed"] == 2
    assert sum(f for _, _, f in seen.per_minute) == 2
    assert sum(c for _, c, _ in seen.per_minute) == 0
    assert seen.queued_by_priority == {"high": 0, "normal": 1, "low": 0}
    assert seen.queues == []
    # The gate admitted the queued job at once: it holds a slot until it is submitted.
    assert (seen.gate.in_flight, seen.max_in_flight) == (1, pipeline.settings.max_in_flight)
    today, month = seen.spend["flow"]
    # The queued job may still cost; the ones refused before WaveSpeed saw them do not.
    assert today == month == pipeline.settings.price_usd[5] > Decimal(0)
    assert [(g.code, g.count, sum(g.per_hour)) for g in groups] == [("invalid_input", 2, 2)]
    assert {job_id for job_id, _ in groups[0].examples} == set(failed)
    assert {job.id for job in found} == set(failed) and waiting not in {j.id for j in found}
    assert view is not None
    assert [stay.state for stay in view.stays] == ["queued", "failed"]
    assert view.stays[0].seconds is not None and view.stays[-1].seconds is None


def test_tenants_are_paged_by_name_however_many_there_are(pipeline: Pipeline) -> None:
    with unit_of_work(pipeline.sessions) as session:
        for name in ("delta", "alpha", "echo", "charlie", "bravo"):
            tenants.create_tenant(session, name, pipeline.sealer)
    pages, after = [], None
    with pipeline.sessions() as session:
        while True:
            rows, after = console.tenant_rows(session, pipeline.settings, utcnow(), after, 2)
            pages.append([row.tenant.name for row in rows])
            if after is None:
                break
    assert pages == [["alpha", "bravo"], ["charlie", "delta"], ["echo"]]


def test_failures_are_counted_in_their_utc_hour_whatever_the_databases_time_zone(
    pipeline: Pipeline, portrait: bytes
) -> None:
    job_id = new_job(pipeline, portrait)
    assert pipeline.fail(job_id, JobState.QUEUED, ErrorCode.INVALID_INPUT, "bad input")
    failed_at = datetime(2026, 3, 2, 10, 15, tzinfo=UTC)
    with unit_of_work(pipeline.sessions) as session:
        session.execute(
            update(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.to_state == JobState.FAILED)
            .values(at=failed_at)
        )
    with pipeline.sessions() as session:
        # Half an hour off UTC: 10:15 UTC is 15:45 there, whose hour began at 09:30 UTC.
        session.execute(text("SET TIME ZONE 'Asia/Kolkata'"))
        groups = console.failures(session, datetime(2026, 3, 2, 12, 0, tzinfo=UTC), hours=3)
    # The window's hours begin at 09:00, 10:00, 11:00 and 12:00 UTC.
    assert [(g.code, g.per_hour) for g in groups] == [("invalid_input", [0, 1, 0, 0])]
