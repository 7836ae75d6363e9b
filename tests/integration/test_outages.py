"""Steps that meet a dependency which keeps failing end in a bounded, recorded way: polls
WaveSpeed keeps refusing or failing, the outbox with the broker away, a step resent for ever,
a hostile Retry-After from a callback receiver, a callback receiver that black-holes."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from tests.integration.flow import new_job, status, submitted
from tests.support import RecordingDispatcher, SimulatorAdmin
from workers import callbacks, dispatch, jobs, quarantine
from workers.announce import job_event
from workers.db import unit_of_work
from workers.models import (
    CallbackAttempt,
    CallbackDelivery,
    CallbackHost,
    Job,
    OutboxMessage,
    WaveSpeedWebhook,
)
from workers.outbox import relay
from workers.pipeline import Pipeline
from workers.reconciler import reconcile
from workers.runtime import build_callbacks
from workers.states import JobState
from workers.work import silent

pytestmark = pytest.mark.integration


def test_a_prediction_wavespeed_keeps_refusing_ends_the_job_after_a_few_polls(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    settings = pipeline.settings.model_copy(update={"poll_refusal_base_seconds": 20.0})
    pipeline = replace(pipeline, settings=settings)
    job_id, _ = submitted(pipeline, portrait)
    with unit_of_work(pipeline.sessions) as session:  # a prediction WaveSpeed no longer knows
        session.execute(update(Job).where(Job.id == job_id).values(prediction_id="gone-404"))
    dispatcher.take()
    base = pipeline.settings.poll_refusal_base_seconds
    waits = []
    for refusals in range(1, pipeline.settings.poll_max_rejections):
        pipeline.poll(job_id)
        job = status(pipeline, job_id)
        assert job.status == JobState.PROCESSING and job.step_failures == refusals
        ((task, _, countdown, _),) = dispatcher.take()
        assert task == dispatch.POLL and countdown is not None
        waits.append(countdown)
    # Each refusal waits longer, so a blip of WaveSpeed's does not end a live prediction.
    assert waits[0] >= base / 2 and waits[-1] >= base * 2 ** (len(waits) - 1) / 2
    pipeline.poll(job_id)
    job = status(pipeline, job_id)
    assert job.status == JobState.FAILED and job.error_code == "prediction_lost"
    assert "404" in (job.error_message or "")


def test_polls_that_keep_failing_still_end_at_the_processing_timeout(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(inference_seconds=[30, 30])
    job_id, _ = submitted(pipeline, portrait)
    simulator.set_faults(inference_seconds=[30, 30], result_500=1.0)
    pipeline.poll(job_id)
    assert status(pipeline, job_id).status == JobState.PROCESSING  # a blip: try again
    timeout = pipeline.settings.processing_timeout_seconds
    with unit_of_work(pipeline.sessions) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(submitted_at=func.now() - timedelta(seconds=timeout + 1))
        )
    pipeline.poll(job_id)
    job = status(pipeline, job_id)
    assert job.status == JobState.FAILED and job.error_code == "processing_timeout"


def broker_down(*_: Any, **__: Any) -> None:
    raise ConnectionError("redis is away")


def test_the_outbox_keeps_what_it_could_not_publish_and_counts_each_try(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    job_id = new_job(pipeline, portrait)
    assert relay(pipeline.sessions, broker_down) == 0  # no exception either
    with unit_of_work(pipeline.sessions) as session:
        row = session.scalars(select(OutboxMessage).where(OutboxMessage.job_id == job_id)).one()
        assert row.published_at is None and row.attempts == 1
        # No relay may take it while the failed one's lease runs; then the reconciler's may.
        assert relay(pipeline.sessions, dispatcher) == 0
        session.execute(update(OutboxMessage).values(claimed_until=func.now()))
    assert relay(pipeline.sessions, dispatcher) == 1
    assert [(t, j) for t, j, *_ in dispatcher.take()] == [(dispatch.SUBMIT, job_id)]


def test_a_step_resent_past_the_cap_is_put_aside_for_an_operator(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    capped = replace(
        pipeline, settings=pipeline.settings.model_copy(update={"reconcile_max_resends": 2})
    )
    job_id, _ = submitted(capped, portrait)
    for resends in (1, 2):
        with unit_of_work(capped.sessions) as session:  # its poll message keeps vanishing
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    due_at=func.now() - timedelta(hours=1),
                    updated_at=func.now() - timedelta(hours=1),
                )
            )
        assert reconcile(capped)["processing"] == 1
        assert status(capped, job_id).resends == resends
    dispatcher.take()
    with unit_of_work(capped.sessions) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(updated_at=func.now() - timedelta(hours=1))
        )
    assert reconcile(capped)["processing"] == 0
    assert dispatcher.take() == []
    with capped.sessions() as session:
        (entry,) = quarantine.active(session)
        assert (entry.task, entry.subject_id) == (dispatch.POLL, job_id)
        assert "put aside" in (jobs.events(session, job_id)[-1].reason or "")
    with unit_of_work(capped.sessions) as session:  # released: the sweeps see it again
        assert quarantine.release(session, entry.id, capped.clock()) is not None
        session.execute(
            update(Job).where(Job.id == job_id).values(updated_at=func.now() - timedelta(hours=1))
        )
    assert reconcile(capped)["processing"] == 1
    assert status(capped, job_id).resends == 1


@pytest.fixture
def delivery(pipeline: Pipeline, portrait: bytes) -> Any:
    """A pending callback of a finished job, to a URL the test's `post` will answer."""

    def make(url: str = "https://hooks.example.com/kling") -> uuid.UUID:
        job_id = new_job(pipeline, portrait, webhook_url=url)
        with silent(pipeline.sessions) as work:
            delivery_id = job_event(
                work, jobs.get(work.session, job_id), callbacks.CANCELLED, pipeline.clock()
            ).delivery
        assert delivery_id is not None
        return delivery_id

    return make


def service(pipeline: Pipeline, post: callbacks.Post, **policy: Any) -> callbacks.Callbacks:
    """The pipeline's callback service, with the test's POST and policy."""
    real = build_callbacks(pipeline)
    return replace(real, post=post, policy=replace(real.policy, **policy))


def answering(status_code: int, **headers: str) -> callbacks.Post:
    def post(url: str, body: bytes, sent: dict[str, str]) -> httpx.Response:
        return httpx.Response(status_code, headers=headers)

    return post


def test_a_hostile_retry_after_is_clamped_and_the_attempt_recorded(
    pipeline: Pipeline, delivery: Any
) -> None:
    delivery_id = delivery()
    outcome = service(pipeline, answering(429, **{"retry-after": "1000000000000"})).deliver(
        delivery_id
    )
    assert outcome is not None and outcome.retry_in == pipeline.settings.retry_after_max_seconds
    with pipeline.sessions() as session:
        row = session.get_one(CallbackDelivery, delivery_id)
        assert row.attempts == 1 and row.last_status_code == 429 and row.sending_until is None
        assert row.next_attempt_at is not None
        attempts = session.scalars(
            select(CallbackAttempt).where(CallbackAttempt.delivery_id == delivery_id)
        ).all()
        assert [a.status_code for a in attempts] == [429]


def test_no_transaction_holds_the_delivery_while_its_post_runs(
    pipeline: Pipeline, delivery: Any
) -> None:
    delivery_id = delivery()
    seen: list[Any] = []

    def post(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        # Mid-POST, another session can lock the row without waiting, and a duplicate
        # message for the same delivery finds the attempt running and does nothing.
        with pipeline.sessions() as other, other.begin():
            row = other.scalars(
                select(CallbackDelivery)
                .where(CallbackDelivery.id == delivery_id)
                .with_for_update(nowait=True)
            ).one()
            seen.append(row.sending_until)
        seen.append(service(pipeline, answering(204)).deliver(delivery_id))
        return httpx.Response(204)

    outcome = service(pipeline, post).deliver(delivery_id)
    assert outcome is not None and outcome.status == callbacks.DeliveryStatus.SUCCEEDED
    assert seen[0] is not None and seen[1] is None


def test_a_black_holed_host_opens_its_circuit_and_stops_holding_workers(
    pipeline: Pipeline, delivery: Any
) -> None:
    calls: list[str] = []

    def black_hole(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        calls.append(url)
        raise httpx.ReadTimeout("no answer")

    dead = service(pipeline, black_hole, breaker_failures=2)
    first, second, third = delivery(), delivery(), delivery()
    dead.deliver(first)
    dead.deliver(second)
    outcome = dead.deliver(third)  # the circuit is open: no POST, a wait instead
    assert len(calls) == 2
    assert outcome is not None and outcome.retry_in and outcome.retry_in > 0
    with pipeline.sessions() as session:
        host = session.get_one(CallbackHost, "https://hooks.example.com:443")
        assert host.failures == 2 and host.open_until is not None
        assert session.get_one(CallbackDelivery, third).attempts == 0  # not an attempt
        # Nor does the reconciler send anything for the host while it is open.
        assert third not in callbacks.due(session, pipeline.clock() + timedelta(seconds=1))
    other = delivery("https://elsewhere.example.com/hook")  # another host is not held up
    reached = service(pipeline, answering(204)).deliver(other)
    assert reached is not None and reached.status == callbacks.DeliveryStatus.SUCCEEDED


def test_a_delivery_its_host_holds_back_past_the_whole_schedule_is_exhausted(
    pipeline: Pipeline, delivery: Any
) -> None:
    def black_hole(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        raise httpx.ReadTimeout("no answer")

    dead = service(pipeline, black_hole, breaker_failures=1)
    probe, held = delivery(), delivery()
    dead.deliver(probe)  # opens the circuit
    with unit_of_work(pipeline.sessions) as session:
        session.execute(
            update(CallbackDelivery)
            .where(CallbackDelivery.id == held)
            .values(created_at=func.now() - dead.policy.give_up_after - timedelta(minutes=1))
        )
    outcome = dead.deliver(held)
    assert outcome == callbacks.Outcome(callbacks.DeliveryStatus.EXHAUSTED)
    with pipeline.sessions() as session:
        row = session.get_one(CallbackDelivery, held)
        assert row.status == callbacks.DeliveryStatus.EXHAUSTED and row.attempts == 0
        assert row.next_attempt_at is None
    # A younger delivery to the same host still only waits.
    waiting = dead.deliver(delivery())
    assert waiting is not None and waiting.status == callbacks.DeliveryStatus.PENDING


def test_a_host_gets_at_most_its_share_of_attempts_at_once(
    pipeline: Pipeline, delivery: Any
) -> None:
    first, second = delivery(), delivery()
    inner: list[Any] = []

    def slow(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        # While this attempt runs, the host's only slot is taken: the other one waits.
        inner.append(service(pipeline, answering(204), host_concurrency=1).deliver(second))
        return httpx.Response(204)

    service(pipeline, slow, host_concurrency=1).deliver(first)
    (waited,) = inner
    assert waited is not None and waited.status == callbacks.DeliveryStatus.PENDING
    assert waited.retry_in and waited.retry_in > 0
    with pipeline.sessions() as session:
        assert session.get_one(CallbackDelivery, second).attempts == 0


def test_wavespeed_webhooks_for_no_job_of_ours_leave_no_trace_and_old_ids_are_pruned(
    pipeline: Pipeline, portrait: bytes
) -> None:
    for _ in range(3):  # a flood of signed webhooks for predictions we never made
        assert not pipeline.take_webhook(f"p-{uuid.uuid4().hex}", None)
    _, prediction_id = submitted(pipeline, portrait)
    assert pipeline.take_webhook(prediction_id, None)
    with unit_of_work(pipeline.sessions) as session:
        assert session.scalars(select(WaveSpeedWebhook.id)).all() == [prediction_id]
        session.execute(
            update(WaveSpeedWebhook).values(received_at=func.now() - timedelta(days=30))
        )
    reconcile(pipeline)
    with pipeline.sessions() as session:
        assert session.scalars(select(WaveSpeedWebhook.id)).all() == []
