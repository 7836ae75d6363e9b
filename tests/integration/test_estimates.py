"""Queue positions and estimates on a real Postgres: the gate's own order, the tenant's share,
what a page of records costs, and what a dry run would be told."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import event, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from tests.integration.test_admission import MINUTE_AGO, NOW, add_jobs
from workers.admission import PRIORITIES, Gate, admit
from workers.db import unit_of_work
from workers.estimates import WOULD_BE, Estimator, places
from workers.models import Job, Tenant
from workers.states import JobState

pytestmark = pytest.mark.integration


def loaded(sessions: sessionmaker[Session], ids: list[uuid.UUID]) -> list[Job]:
    with sessions() as session:
        found = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(ids)))}
        session.expunge_all()
    return [found[i] for i in ids]


def test_positions_are_the_order_the_gate_admits_in(sessions: sessionmaker[Session]) -> None:
    bulk = add_jobs(sessions, "bulk", 6, priority=PRIORITIES["low"])
    add_jobs(sessions, "bulk", 4)
    add_jobs(sessions, "heavy", 5)
    add_jobs(sessions, "single", 1, priority=PRIORITIES["high"])
    with unit_of_work(sessions) as session:
        session.execute(update(Tenant).where(Tenant.id == "heavy").values(weight=2))
        waiting = session.scalars(select(Job.id).where(Job.status == JobState.QUEUED)).all()
        ranked = places(session, waiting)
    by_place = sorted(waiting, key=lambda job_id: ranked[job_id].ahead)
    assert [ranked[j].ahead for j in by_place] == list(range(len(waiting)))
    gate = Gate(max_in_flight=100, per_minute=100, tenant_max_in_flight=100)
    with unit_of_work(sessions) as session:
        admitted = [entry.job_id for entry in admit(session, gate, NOW, MINUTE_AGO)]
    assert admitted == by_place
    assert ranked[bulk[0]].ahead_in_tenant == 4  # behind its own tenant's normal jobs


def test_a_page_of_records_costs_one_query_for_its_places(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    ids = add_jobs(sessions, "page", 100)
    jobs = loaded(sessions, ids)
    estimator = Estimator(settings)
    with sessions() as session:
        estimator.observed(session)  # warm: refreshed at most every few seconds
        statements: list[str] = []
        event.listen(session.get_bind(), "before_cursor_execute", _count(statements))
        estimates = estimator.of(session, jobs)
    assert len(statements) == 1, statements
    starts = [estimates[i].estimated_start_at for i in ids]
    assert [estimates[i].queue_position for i in ids] == list(range(100))
    assert starts == sorted(starts) and starts[0] < starts[-1]
    assert all(e.estimated_completion_at > e.estimated_start_at for e in estimates.values())


def _count(statements: list[str]) -> Callable[..., None]:
    def before(conn: object, cursor: object, statement: str, *_: object) -> None:
        statements.append(statement)

    return before


def test_a_tenant_held_to_its_own_rate_waits_longer(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    free = add_jobs(sessions, "free", 3)
    slow = add_jobs(sessions, "slow", 3)
    with unit_of_work(sessions) as session:
        session.execute(update(Tenant).where(Tenant.id == "slow").values(submits_per_minute=1))
    estimates = Estimator(settings).of(sessions(), loaded(sessions, free + slow))
    # Round-robin puts the third job of each at about the same place at the gate...
    assert abs(estimates[free[2]].queue_position - estimates[slow[2]].queue_position) == 1
    # ...but a tenant admitted once a minute starts its third job two minutes from now.
    assert estimates[slow[2]].estimated_start_at - estimates[free[2]].estimated_start_at > (
        timedelta(seconds=90)
    )


def test_the_times_observed_drive_the_completion(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    with sessions() as session:
        now = session.scalar(select(func.now()))
    submitted = now - timedelta(seconds=300)
    add_jobs(
        sessions, "seen", 3, status=JobState.COMPLETED, last_submit_at=submitted,
        submitted_at=submitted, output_at=submitted + timedelta(seconds=200),
        completed_at=submitted + timedelta(seconds=240),
    )  # fmt: skip
    (queued,) = add_jobs(sessions, "seen", 1)
    estimate = Estimator(settings).of(sessions(), loaded(sessions, [queued]))[queued]
    took = estimate.estimated_completion_at - estimate.estimated_start_at
    assert took == timedelta(seconds=240)


def test_a_dry_run_is_told_the_place_a_create_would_get(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    add_jobs(sessions, "mine", 3)
    add_jobs(sessions, "theirs", 3)
    would_be = Job(tenant_id="mine", priority=PRIORITIES["normal"], duration=5, status="queued")
    with sessions() as session:
        estimate = Estimator(settings).of(session, [], would_be)[WOULD_BE]
        # Behind its own three, and round-robin with the other tenant's: 3 + 3 ahead.
        assert estimate.queue_position == 6
        urgent = Job(tenant_id="mine", priority=PRIORITIES["high"], duration=5, status="queued")
        assert Estimator(settings).of(session, [], urgent)[WOULD_BE].queue_position == 0
        assert session.scalar(select(Job).where(Job.id == WOULD_BE)) is None
