"""Bulk actions on a real Postgres, run as a worker runs them: cancel by filter (bounded,
tenant-scoped, resumed after a worker dies), replay of callbacks by filter with their own
ids, and re-enabling a URL that answered 410."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from tests.integration.flow import new_job, status
from tests.support import RecordingDispatcher
from workers import bulk, callbacks, dispatch, jobs, tenants
from workers.announce import job_event
from workers.callbacks import DeliveryStatus
from workers.db import unit_of_work
from workers.intake import GenerationInput, create_job
from workers.models import BulkAction, CallbackDelivery, Tenant
from workers.pipeline import Pipeline
from workers.reconciler import reconcile
from workers.states import JobState

pytestmark = pytest.mark.integration

HOOK = "https://hooks.example.com/kling"


def act(
    pipeline: Pipeline, tenant_id: str, kind: str, max_items: int = 100, **filter_: Any
) -> BulkAction:
    with pipeline.work() as work:
        action = bulk.create(work, tenant_id, kind, filter_, max_items)
    return action


def drain(pipeline: Pipeline, dispatcher: RecordingDispatcher, action: BulkAction) -> int:
    """Run the action's messages as workers would, each batch's next one too; answers how
    many ran."""
    runs = 0
    pending = [action.id]
    while pending:
        bulk.run(pipeline, pending.pop())
        runs += 1
        pending += [j for t, j, *_ in dispatcher.take() if t == dispatch.BULK]
    return runs


def reread(pipeline: Pipeline, action: BulkAction) -> BulkAction:
    with pipeline.sessions() as session:
        found = bulk.get(session, None, action.id)
    assert found is not None
    return found


def flow_tenant(pipeline: Pipeline) -> str:
    with pipeline.sessions() as session:
        return session.scalars(select(Tenant.id).where(Tenant.name == "flow")).one()


def other_tenants_job(pipeline: Pipeline, portrait: bytes) -> uuid.UUID:
    with unit_of_work(pipeline.sessions) as session:
        other = tenants.create_tenant(session, f"o-{uuid.uuid4().hex[:8]}", pipeline.sealer)
    request = GenerationInput(
        prompt="p", guidance_scale=0.5, duration=5, image_url="https://example.com/p.png",
        metadata={"batch": "nightly"},
    )  # fmt: skip
    return create_job(
        pipeline.sessions, pipeline.storage, pipeline.settings, other, request, portrait
    ).id


def test_a_bulk_cancel_cancels_what_matches_up_to_its_bound_and_only_the_tenants(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    nightly = [
        new_job(pipeline, portrait, metadata={"batch": "nightly"}, priority="low") for _ in range(4)
    ]
    kept = [
        new_job(pipeline, portrait, metadata={"batch": "nightly"}),  # another priority
        new_job(pipeline, portrait, metadata={"batch": "daytime"}, priority="low"),
        other_tenants_job(pipeline, portrait),
    ]
    owner = flow_tenant(pipeline)
    action = act(
        pipeline, owner, bulk.CANCEL, max_items=3, metadata={"batch": "nightly"}, priority=[2]
    )
    assert [t for t, *_ in dispatcher.take()][-1] == dispatch.BULK  # sent once committed
    later = new_job(pipeline, portrait, metadata={"batch": "nightly"}, priority="low")
    drain(pipeline, dispatcher, action)
    done = reread(pipeline, action)
    assert (done.status, done.matched, done.done) == ("done", 3, 3)  # bounded
    states = [status(pipeline, j).status for j in nightly]
    assert sorted(states) == [*[JobState.CANCELLED] * 3, JobState.QUEUED]
    assert [status(pipeline, j).status for j in kept] == [JobState.QUEUED] * 3
    assert status(pipeline, later).status == JobState.QUEUED  # made after it was asked for
    bulk.run(pipeline, action.id)  # a duplicate message does nothing more
    assert reread(pipeline, action).done == 3


def test_a_bulk_action_whose_worker_died_is_resumed_where_it_stopped(
    pipeline: Pipeline,
    portrait: bytes,
    dispatcher: RecordingDispatcher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jobs = [new_job(pipeline, portrait, metadata={"batch": "b"}) for _ in range(5)]
    owner = flow_tenant(pipeline)
    monkeypatch.setattr(bulk, "BATCH", 2)
    action = act(pipeline, owner, bulk.CANCEL, metadata={"batch": "b"})
    with unit_of_work(pipeline.sessions) as session:  # its worker took it, then died
        session.execute(
            update(BulkAction)
            .where(BulkAction.id == action.id)
            .values(
                lease_until=datetime.now(UTC) - timedelta(seconds=1),
                updated_at=datetime.now(UTC) - timedelta(minutes=10),
            )
        )
    dispatcher.take()
    assert reconcile(pipeline)["bulk"] == 1
    assert [j for t, j, *_ in dispatcher.take() if t == dispatch.BULK] == [action.id]
    assert drain(pipeline, dispatcher, action) == 3  # a batch of two a message
    done = reread(pipeline, action)
    assert (done.status, done.matched, done.done) == ("done", 5, 5)  # each job once
    assert all(status(pipeline, j).status == JobState.CANCELLED for j in jobs)
    assert reconcile(pipeline)["bulk"] == 0


def test_a_bulk_action_sent_past_the_cap_fails_saying_so(
    pipeline: Pipeline, dispatcher: RecordingDispatcher, portrait: bytes
) -> None:
    new_job(pipeline, portrait)
    action = act(pipeline, flow_tenant(pipeline), bulk.CANCEL)
    cap = pipeline.settings.reconcile_max_resends
    with unit_of_work(pipeline.sessions) as session:
        session.execute(
            update(BulkAction)
            .where(BulkAction.id == action.id)
            .values(resends=cap, updated_at=datetime.now(UTC) - timedelta(minutes=10))
        )
    dispatcher.take()  # its message is gone (a flushed broker), not waiting in the queue
    reconcile(pipeline)
    failed = reread(pipeline, action)
    assert failed.status == "failed" and f"sent {cap} times" in (failed.error or "")


def deliveries(
    pipeline: Pipeline, portrait: bytes, *, status_: str, count: int, event: str
) -> list[uuid.UUID]:
    made = []
    for _ in range(count):
        job_id = new_job(pipeline, portrait, webhook_url=HOOK)
        with pipeline.work() as work:
            delivery = job_event(
                work, jobs.get(work.session, job_id), event, datetime.now(UTC)
            ).delivery
        assert delivery is not None
        made.append(delivery)
    with unit_of_work(pipeline.sessions) as session:
        session.execute(
            update(CallbackDelivery)
            .where(CallbackDelivery.id.in_(made))
            .values(status=status_, next_attempt_at=None)
        )
    return made


def delivery_status(pipeline: Pipeline, ids: list[uuid.UUID]) -> list[str]:
    with pipeline.sessions() as session:
        rows = dict(
            session.execute(
                select(CallbackDelivery.id, CallbackDelivery.status).where(
                    CallbackDelivery.id.in_(ids)
                )
            ).all()
        )
    return [rows[i] for i in ids]


def test_a_bulk_replay_sends_each_matching_callback_again_with_its_own_id(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    failed = deliveries(pipeline, portrait, status_="exhausted", count=3, event=callbacks.FAILED)
    other_event = deliveries(
        pipeline, portrait, status_="exhausted", count=1, event=callbacks.COMPLETED
    )
    delivered = deliveries(pipeline, portrait, status_="succeeded", count=1, event=callbacks.FAILED)
    dispatcher.take()
    action = act(
        pipeline, flow_tenant(pipeline), bulk.REPLAY, status=["exhausted"], event=[callbacks.FAILED]
    )
    bulk.run(pipeline, action.id)
    assert (reread(pipeline, action).matched, reread(pipeline, action).done) == (3, 3)
    assert delivery_status(pipeline, failed) == ["pending"] * 3
    assert delivery_status(pipeline, other_event + delivered) == ["exhausted", "succeeded"]
    sent = [j for t, j, *_ in dispatcher.take() if t == dispatch.NOTIFY]
    assert sorted(sent) == sorted(failed)  # the same deliveries, so the same webhook-ids


def test_enabling_a_url_that_answered_410_lets_callbacks_go_to_it_again(
    pipeline: Pipeline, portrait: bytes
) -> None:
    stopped = deliveries(
        pipeline, portrait, status_=DeliveryStatus.GONE, count=2, event=callbacks.FAILED
    )
    job_id = new_job(pipeline, portrait, webhook_url=HOOK)
    with pipeline.work() as work:  # while the URL is gone, a new event is not sent
        assert (
            job_event(
                work, jobs.get(work.session, job_id), callbacks.FAILED, datetime.now(UTC)
            ).delivery
            is None
        )
    action = act(pipeline, flow_tenant(pipeline), bulk.ENABLE, url=HOOK)
    bulk.run(pipeline, action.id)
    assert reread(pipeline, action).done == 3  # the one recorded while gone, too
    assert delivery_status(pipeline, stopped) == ["exhausted"] * 2  # replayable now
    with pipeline.work() as work:
        assert (
            job_event(
                work, jobs.get(work.session, job_id), callbacks.COMPLETED, datetime.now(UTC)
            ).delivery
            is not None
        )
