"""Producer control: start deadlines (a job not submitted by its deadline ends `expired`,
never sent to WaveSpeed, never charged, and its producer is told) and retries."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from tests.integration.flow import new_job, status
from tests.support import RecordingDispatcher, SimulatorAdmin
from workers import callbacks, dispatch
from workers.db import unit_of_work
from workers.intake import Refusal, again, committed_spend
from workers.models import CallbackDelivery, Job, Tenant
from workers.pipeline import Pipeline
from workers.reconciler import reconcile
from workers.states import JobState

pytestmark = pytest.mark.integration

HOOK = "https://hooks.example.com/kling"


def past() -> datetime:
    return datetime.now(UTC) - timedelta(seconds=1)


def ours(simulator: SimulatorAdmin, job_id: object) -> list[object]:
    return [e for e in simulator.ledger()["predictions"] if str(job_id) in e["input"]["image"]]


def test_a_job_whose_start_deadline_passed_expires_when_its_message_comes(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    job_id = new_job(pipeline, portrait, start_deadline_at=past(), webhook_url=HOOK)
    pipeline.submit(job_id)
    job = status(pipeline, job_id)
    assert (job.status, job.error_code, job.submit_attempts) == (JobState.EXPIRED, "expired", 0)
    assert ours(simulator, job_id) == []  # never sent, so never charged
    with pipeline.sessions() as session:
        (delivery,) = session.scalars(
            select(CallbackDelivery).where(CallbackDelivery.job_id == job_id)
        ).all()
        assert delivery.event == callbacks.EXPIRED
        owner = session.get_one(Tenant, job.tenant_id)
        assert (
            committed_spend(session, owner, job.created_at - timedelta(days=1), pipeline.settings)
            == 0
        )
    assert [t for t, *_ in dispatcher.take()] == [dispatch.NOTIFY]


def test_a_job_with_time_left_is_submitted(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    job_id = new_job(pipeline, portrait, start_deadline_at=datetime.now(UTC) + timedelta(hours=1))
    pipeline.submit(job_id)
    assert status(pipeline, job_id).status == JobState.PROCESSING


def test_a_job_parked_at_the_gate_past_its_deadline_is_expired_by_the_reconciler(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    gated = pipeline.settings.model_copy(update={"max_in_flight": 1})
    with_gate = replace(pipeline, settings=gated)
    first = new_job(with_gate, portrait)
    waiting = new_job(with_gate, portrait, start_deadline_at=datetime.now(UTC) + timedelta(hours=1))
    with_gate.submit(first)
    with_gate.submit(waiting)  # the gate is full: parked, with no message coming
    assert status(with_gate, waiting).status == JobState.QUEUED
    with unit_of_work(pipeline.sessions) as session:
        session.execute(update(Job).where(Job.id == waiting).values(start_deadline_at=past()))
    dispatcher.take()
    assert reconcile(with_gate)["expired"] == 1
    assert status(with_gate, waiting).status == JobState.EXPIRED
    assert reconcile(with_gate)["expired"] == 0


def test_a_job_that_was_submitted_once_is_past_its_start_deadline_for_good(
    pipeline: Pipeline, portrait: bytes
) -> None:
    """Its retry is not an expiry: it started in time, and may have been charged already."""
    job_id = new_job(pipeline, portrait, start_deadline_at=datetime.now(UTC) + timedelta(hours=1))
    with unit_of_work(pipeline.sessions) as session:  # as if attempt 1 failed retryably
        session.execute(
            update(Job).where(Job.id == job_id).values(submit_attempts=1, start_deadline_at=past())
        )
    assert pipeline.expire_due() == 0
    pipeline.submit(job_id)
    job = status(pipeline, job_id)
    assert job.status == JobState.PROCESSING and job.submit_attempts == 2


def test_only_a_finished_job_whose_input_is_still_stored_is_made_again(
    pipeline: Pipeline, portrait: bytes
) -> None:
    job_id = new_job(pipeline, portrait)
    with pytest.raises(Refusal) as running:
        again(status(pipeline, job_id), pipeline.storage)
    assert running.value.code == "not_finished"
    pipeline.cancel(job_id)
    request, image = again(status(pipeline, job_id), pipeline.storage)
    assert request.retry_of == job_id and image.source_key == status(pipeline, job_id).input_key
    pipeline.storage.delete(status(pipeline, job_id).input_key)
    with pytest.raises(Refusal) as gone:
        again(status(pipeline, job_id), pipeline.storage)
    assert gone.value.code == "input_gone"
