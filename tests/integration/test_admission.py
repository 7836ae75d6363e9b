"""The admission gate on a real Postgres: global cap, rate, tenant caps and fairness."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from workers.admission import PRIORITIES, Gate, admit
from workers.db import unit_of_work
from workers.models import Job, Tenant
from workers.quarantine import put_aside
from workers.states import JobState

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
MINUTE_AGO = NOW - timedelta(minutes=1)


def add_jobs(
    sessions: sessionmaker[Session], tenant: str, count: int, **values: object
) -> list[uuid.UUID]:
    ids = []
    with unit_of_work(sessions) as session:
        if session.get(Tenant, tenant) is None:
            # The gate never reads the signing secret: any value fills the column.
            session.add(Tenant(id=tenant, name=tenant, sealed_webhook_secret="unused"))
            session.flush()
        for i in range(count):
            job = Job(
                tenant_id=tenant, status=values.get("status", JobState.QUEUED),
                input_key="k", input_content_type="image/png", prompt="p", guidance_scale=0.5,
                duration=5, created_at=NOW - timedelta(seconds=1000 - i),
                **{k: v for k, v in values.items() if k != "status"},
            )  # fmt: skip
            session.add(job)
            session.flush()
            ids.append(job.id)
    return ids


def run(sessions: sessionmaker[Session], gate: Gate) -> list[uuid.UUID]:
    with unit_of_work(sessions) as session:
        return [entry.job_id for entry in admit(session, gate, NOW, MINUTE_AGO)]


def tenants_of(sessions: sessionmaker[Session], ids: list[uuid.UUID]) -> list[str]:
    with sessions() as session:
        by_id = dict(session.execute(select(Job.id, Job.tenant_id).where(Job.id.in_(ids))).all())
    return [by_id[i] for i in ids]


def test_admits_up_to_the_global_cap_counting_what_is_in_flight(
    sessions: sessionmaker[Session],
) -> None:
    add_jobs(sessions, "a", 2, status=JobState.PROCESSING)
    add_jobs(sessions, "a", 10)
    assert len(run(sessions, Gate(5, 100, 100))) == 3
    assert run(sessions, Gate(5, 100, 100)) == []  # the admitted ones count as in flight now


def test_jobs_put_aside_for_an_operator_hold_no_slot(sessions: sessionmaker[Session]) -> None:
    stuck = add_jobs(sessions, "a", 3, status=JobState.PROCESSING)
    add_jobs(sessions, "b", 2)
    assert run(sessions, Gate(3, 100, 100)) == []  # three in flight: the gate is full
    with unit_of_work(sessions) as session:
        for job_id in stuck:
            put_aside(session, "generation.poll", job_id, "killed its worker", 6)
    assert len(run(sessions, Gate(3, 100, 100))) == 2  # put aside, they stop holding slots
    add_jobs(sessions, "c", 2)
    assert len(run(sessions, Gate(3, 100, 100))) == 1  # the two admitted do hold theirs


def test_unanswered_submits_in_recovery_hold_no_slot(sessions: sessionmaker[Session]) -> None:
    """A submit whose answer was lost may be settled only at the recover deadline, a day
    later; meanwhile it must not keep others from being admitted."""
    recovery = timedelta(seconds=90)
    add_jobs(sessions, "a", 2, status=JobState.SUBMITTING, last_submit_at=NOW - 2 * recovery)
    add_jobs(sessions, "a", 1, status=JobState.SUBMITTING, last_submit_at=NOW)  # POSTing now
    add_jobs(sessions, "b", 3)
    assert len(run(sessions, Gate(3, 100, 100, recovery_after=recovery))) == 2


def test_admits_no_more_than_the_rate_per_minute(sessions: sessionmaker[Session]) -> None:
    add_jobs(
        sessions, "a", 4, status=JobState.PROCESSING, last_submit_at=NOW - timedelta(seconds=30)
    )
    add_jobs(sessions, "a", 3, status=JobState.COMPLETED, last_submit_at=NOW - timedelta(minutes=5))
    add_jobs(sessions, "a", 10)
    assert len(run(sessions, Gate(100, 6, 100))) == 2


def test_one_tenants_batch_does_not_starve_another(sessions: sessionmaker[Session]) -> None:
    add_jobs(sessions, "batch", 1000)
    later = add_jobs(sessions, "single", 1)
    with unit_of_work(sessions) as session:  # the single job arrived after the whole batch
        session.execute(update(Job).where(Job.id == later[0]).values(created_at=NOW))
    admitted = run(sessions, Gate(4, 100, 100))
    assert len(admitted) == 4
    assert tenants_of(sessions, admitted).count("single") == 1


def test_round_robin_across_tenants(sessions: sessionmaker[Session]) -> None:
    for tenant in ("a", "b", "c"):
        add_jobs(sessions, tenant, 5)
    admitted = run(sessions, Gate(6, 100, 100))
    assert sorted(tenants_of(sessions, admitted)) == ["a", "a", "b", "b", "c", "c"]


def test_tenant_cap_holds(sessions: sessionmaker[Session]) -> None:
    add_jobs(sessions, "a", 2, status=JobState.PROCESSING)
    add_jobs(sessions, "a", 10)
    add_jobs(sessions, "b", 10)
    admitted = run(sessions, Gate(10, 100, 3))
    assert sorted(tenants_of(sessions, admitted)) == ["a", "b", "b", "b"]


def set_quotas(sessions: sessionmaker[Session], tenant: str, **quotas: int) -> None:
    with unit_of_work(sessions) as session:
        session.execute(update(Tenant).where(Tenant.id == tenant).values(**quotas))


def test_a_tenants_own_cap_and_rate_bound_its_share_and_others_keep_the_default(
    sessions: sessionmaker[Session],
) -> None:
    add_jobs(sessions, "a", 1, status=JobState.PROCESSING)
    add_jobs(sessions, "a", 10)
    add_jobs(
        sessions, "b", 2, status=JobState.COMPLETED, last_submit_at=NOW - timedelta(seconds=10)
    )
    add_jobs(sessions, "b", 10)
    add_jobs(sessions, "c", 10)
    set_quotas(sessions, "a", max_in_flight=2)  # one in flight already: one more
    set_quotas(sessions, "b", submits_per_minute=3)  # two this minute already: one more
    admitted = run(sessions, Gate(100, 100, 4))
    assert sorted(tenants_of(sessions, admitted)) == ["a", "b", "c", "c", "c", "c"]
    assert run(sessions, Gate(100, 100, 4)) == []  # every share is taken now


def test_the_account_caps_bound_the_sum_of_the_tenants_shares(
    sessions: sessionmaker[Session],
) -> None:
    for tenant in ("a", "b"):
        add_jobs(sessions, tenant, 10)
        set_quotas(sessions, tenant, max_in_flight=10, submits_per_minute=10)
    assert len(run(sessions, Gate(5, 100, 100))) == 5
    assert len(run(sessions, Gate(100, 7, 100))) == 2  # five of the minute's seven are used


def test_a_tenant_of_weight_three_takes_three_jobs_a_turn(
    sessions: sessionmaker[Session],
) -> None:
    add_jobs(sessions, "heavy", 20)
    add_jobs(sessions, "light", 20)
    set_quotas(sessions, "heavy", weight=3)
    first = run(sessions, Gate(4, 100, 100))
    assert sorted(tenants_of(sessions, first)) == ["heavy", "heavy", "heavy", "light"]
    more = run(sessions, Gate(12, 100, 100))
    assert sorted(tenants_of(sessions, more)).count("heavy") == 6


def test_jobs_waiting_out_a_backoff_are_not_admitted(sessions: sessionmaker[Session]) -> None:
    add_jobs(sessions, "a", 1, not_before=NOW + timedelta(seconds=5))
    ready = add_jobs(sessions, "a", 1, not_before=NOW - timedelta(seconds=1))
    assert run(sessions, Gate(10, 100, 10)) == ready


def test_only_parked_jobs_are_owed_a_message(sessions: sessionmaker[Session]) -> None:
    (fresh,) = add_jobs(sessions, "a", 1)  # its own submit message is still on its way
    (parked,) = add_jobs(sessions, "a", 1, parked_at=NOW - timedelta(seconds=5))
    with unit_of_work(sessions) as session:
        owed = {
            e.job_id: e.needs_message for e in admit(session, Gate(10, 100, 10), NOW, MINUTE_AGO)
        }
    assert owed == {fresh: False, parked: True}
    with sessions() as session:
        assert session.get_one(Job, parked).parked_at is None


def add_many(sessions: sessionmaker[Session], tenant: str, count: int, priority: int) -> None:
    """`count` queued jobs in one multi-row INSERT, created before any `add_jobs` job."""
    with unit_of_work(sessions) as session:
        if session.get(Tenant, tenant) is None:
            session.add(Tenant(id=tenant, name=tenant, sealed_webhook_secret="unused"))
            session.flush()
        common = {
            "tenant_id": tenant, "status": JobState.QUEUED, "input_key": "k", "prompt": "p",
            "input_content_type": "image/png", "guidance_scale": 0.5, "duration": 5,
            "priority": priority,
        }  # fmt: skip
        rows = [
            {**common, "id": uuid.uuid4(), "created_at": NOW - timedelta(days=1, seconds=i)}
            for i in range(count)
        ]
        session.execute(insert(Job), rows)


def test_a_high_job_behind_5000_queued_low_jobs_is_admitted_by_the_next_gate_pass(
    sessions: sessionmaker[Session],
) -> None:
    add_many(sessions, "nightly", 5000, PRIORITIES["low"])
    (other_tenant,) = add_jobs(sessions, "person", 1, priority=PRIORITIES["high"])
    (same_tenant,) = add_jobs(sessions, "nightly", 1, priority=PRIORITIES["high"])
    gate = Gate(max_in_flight=2, per_minute=10_000, tenant_max_in_flight=10_000)
    assert sorted(run(sessions, gate)) == sorted([other_tenant, same_tenant])


def test_within_a_priority_tenants_take_turns_and_each_tenants_oldest_goes_first(
    sessions: sessionmaker[Session],
) -> None:
    low = add_jobs(sessions, "a", 1, priority=PRIORITIES["low"])
    a = add_jobs(sessions, "a", 3)
    b = add_jobs(sessions, "b", 3)
    gate = Gate(max_in_flight=7, per_minute=100, tenant_max_in_flight=100)
    admitted = run(sessions, gate)
    turns = [set(admitted[i : i + 2]) for i in range(0, 6, 2)]
    assert turns == [{a[0], b[0]}, {a[1], b[1]}, {a[2], b[2]}]
    assert admitted[6:] == low  # older than all of them, but of a lower priority


def test_a_tenants_cap_is_taken_by_its_highest_priority_first(
    sessions: sessionmaker[Session],
) -> None:
    add_jobs(sessions, "a", 2)
    (urgent,) = add_jobs(sessions, "a", 1, priority=PRIORITIES["high"])
    gate = Gate(max_in_flight=10, per_minute=100, tenant_max_in_flight=1)
    assert run(sessions, gate) == [urgent]


def test_a_weight_below_one_is_refused_by_the_database(sessions: sessionmaker[Session]) -> None:
    add_jobs(sessions, "a", 1)
    with pytest.raises(IntegrityError, match="ck_tenants_weight_positive"):
        set_quotas(sessions, "a", weight=0)  # it would give the tenant no turn at the gate
