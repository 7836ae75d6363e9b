"""Work whose message was lost is found again; cancel stops a job wherever it is."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from tests.integration.flow import age, new_job, poll_until_left_processing, status, submit
from tests.support import RecordingDispatcher, SimulatorAdmin
from workers import dispatch
from workers.db import unit_of_work
from workers.models import Job, OutboxMessage
from workers.pipeline import Pipeline
from workers.reconciler import reconcile
from workers.states import JobState

pytestmark = pytest.mark.integration


def sent(dispatcher: RecordingDispatcher) -> list[tuple[str, object]]:
    return [(task, job_id) for task, job_id, *_ in dispatcher.take()]


def test_an_unpublished_outbox_row_is_published_by_the_reconciler(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    job_id = new_job(pipeline, portrait)  # committed, never published (API died after commit)
    assert reconcile(pipeline)["outbox"] == 0  # too fresh: the API's relay may still do it
    with unit_of_work(pipeline.sessions) as session:
        session.execute(
            update(OutboxMessage).values(created_at=OutboxMessage.created_at - timedelta(hours=1))
        )
    dispatcher.take()
    counts = reconcile(pipeline)
    assert counts["outbox"] == 1
    assert (dispatch.SUBMIT, job_id) in sent(dispatcher)


def test_under_a_backlog_of_submits_an_outbox_row_waits_for_its_task(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    """The row is settled by its submit task when it runs: while the submit queue is busy,
    a row past the outbox grace is only waiting its turn, and publishing it again would
    lengthen the queue it waits in."""
    job_id = new_job(pipeline, portrait)
    age = timedelta(seconds=pipeline.settings.outbox_grace_seconds + 5)
    with unit_of_work(pipeline.sessions) as session:
        session.execute(update(OutboxMessage).values(created_at=OutboxMessage.created_at - age))
    dispatcher(dispatch.SUBMIT, uuid.uuid4())  # another job's submit, not yet taken
    assert reconcile(pipeline)["outbox"] == 0
    dispatcher.take()  # the queue drained
    assert reconcile(pipeline)["outbox"] == 1
    assert (dispatch.SUBMIT, job_id) in sent(dispatcher)


def test_a_broker_that_refuses_resends_ends_the_tick_before_more_are_counted(
    pipeline: Pipeline, portrait: bytes
) -> None:
    """Each resend counts towards putting a job aside: one the broker refused must not."""
    processing, storing = new_job(pipeline, portrait), new_job(pipeline, portrait)
    old = func.now() - timedelta(hours=1)
    with unit_of_work(pipeline.sessions) as session:
        for job_id, state in ((processing, JobState.PROCESSING), (storing, JobState.STORING)):
            session.execute(
                update(Job).where(Job.id == job_id)
                .values(status=state, due_at=old, updated_at=old, prediction_id="p")
            )  # fmt: skip
    refusing = RefusingDispatcher()
    with pytest.raises(ConnectionError):
        reconcile(replace(pipeline, dispatch=refusing))
    with pipeline.sessions() as session:
        resends = dict(session.execute(select(Job.status, Job.resends)).all())
    # The processing sweep runs first and was refused; the storing one never ran.
    assert resends == {JobState.PROCESSING: 1, JobState.STORING: 0}


class RefusingDispatcher(RecordingDispatcher):
    def __call__(self, *_: Any, **__: Any) -> None:
        raise ConnectionError("redis refuses writes")


def test_an_overdue_poll_is_sent_again(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(inference_seconds=[30, 30])
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)
    dispatcher.take()  # the poll message is "lost" (Redis flushed)
    assert reconcile(pipeline)["processing"] == 0
    age(pipeline, job_id, 3600, "due_at")
    assert reconcile(pipeline)["processing"] == 1
    assert (dispatch.POLL, job_id) in sent(dispatcher)
    assert reconcile(pipeline)["processing"] == 0  # touched: not resent every sweep


def test_a_stalled_store_is_sent_again(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)
    poll_until_left_processing(pipeline, job_id)
    dispatcher.take()  # the store message is lost (or its worker died mid-copy)...
    assert reconcile(pipeline)["storing"] == 0
    age(pipeline, job_id, 3600, "due_at")  # ...and its try's lease ran out
    assert reconcile(pipeline)["storing"] == 1
    assert (dispatch.STORE, job_id) in sent(dispatcher)


def test_an_unanswered_submit_is_sent_to_recovery(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(submit_drop_after_create=1.0)
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)
    dispatcher.take()  # the recover message is lost with the worker
    assert reconcile(pipeline)["submitting"] == 0  # its chain is still due to look
    age(pipeline, job_id, 3600, "due_at")
    assert reconcile(pipeline)["submitting"] == 1
    # The message names the attempt it is for, so it is stale once another attempt starts.
    resent = [(t, j, kw) for t, j, _, kw in dispatcher.take()]
    assert (dispatch.RECOVER, job_id, {"attempt": 1}) in resent


def test_an_admitted_job_whose_submit_was_lost_is_sent_again(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    job_id = new_job(pipeline, portrait)
    assert pipeline.admit() == 1
    dispatcher.take()
    age(pipeline, job_id, 3600, "admitted_at")
    assert reconcile(pipeline)["queued"] == 1
    assert (dispatch.SUBMIT, job_id) in sent(dispatcher)


def test_cancelling_a_queued_job_means_it_is_never_submitted(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    job_id = new_job(pipeline, portrait)
    job = pipeline.cancel(job_id)
    assert job.status == JobState.CANCELLED and "may still be charged" not in (
        job.error_message or ""
    )
    assert pipeline.admit() == 0
    pipeline.submit(job_id)  # the outbox's submit message still arrives
    assert status(pipeline, job_id).submit_attempts == 0
    charged = [p for p in simulator.ledger()["predictions"] if str(job_id) in p["input"]["image"]]
    assert charged == []


def test_cancelling_a_job_at_wavespeed_asks_for_its_prediction_to_be_deleted(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(inference_seconds=[2, 2])
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)
    prediction_id = status(pipeline, job_id).prediction_id
    dispatcher.take()
    job = pipeline.cancel(job_id)
    assert job.status == JobState.CANCELLED
    assert f"prediction {prediction_id} is deleted" in (job.error_message or "")
    assert (dispatch.WITHDRAW, job_id) in [(t, j) for t, j, *_ in dispatcher.take()]
    pipeline.poll(job_id)  # its poll chain ends quietly
    assert status(pipeline, job_id).status == JobState.CANCELLED


def test_cancel_leaves_finished_jobs_alone(pipeline: Pipeline, portrait: bytes) -> None:
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)
    poll_until_left_processing(pipeline, job_id)
    pipeline.store(job_id)
    assert pipeline.cancel(job_id).status == JobState.COMPLETED


def late_behind_a_backlog(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin, late_by: float
) -> tuple[object, object]:
    """Two jobs at WaveSpeed: one whose poll is `late_by` seconds overdue, and one whose poll
    still waits in the queue (a backlog the late one may be stuck behind)."""
    simulator.set_faults(inference_seconds=[30, 30])
    late, behind = new_job(pipeline, portrait), new_job(pipeline, portrait)
    submit(pipeline, late)
    submit(pipeline, behind)
    dispatcher = pipeline.dispatch
    assert isinstance(dispatcher, RecordingDispatcher)
    dispatcher.take()
    age(pipeline, late, late_by, "due_at")
    dispatcher(dispatch.POLL, behind)
    return late, behind


def test_sweeps_wait_while_their_queue_still_holds_messages(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    grace = pipeline.settings.poll_overdue_grace_seconds
    late, _ = late_behind_a_backlog(pipeline, portrait, simulator, grace + 60)
    # The late job may just be queued behind it: re-sending would only lengthen the queue.
    assert reconcile(pipeline)["processing"] == 0
    dispatcher.take()  # the queue drained (or was flushed): now the late job is re-sent
    assert reconcile(pipeline)["processing"] == 1
    assert (dispatch.POLL, late) in sent(dispatcher)


def test_a_backlog_that_never_drains_hides_lost_work_only_for_a_while(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    settings = pipeline.settings
    lateness = settings.poll_overdue_grace_seconds + settings.reconcile_backlog_grace_seconds
    late, behind = late_behind_a_backlog(pipeline, portrait, simulator, lateness + 60)
    assert reconcile(pipeline)["processing"] == 1  # the poll queue is never empty, yet...
    assert (dispatch.POLL, late) in sent(dispatcher)
    dispatcher(dispatch.POLL, behind)
    # Re-sent once: the next sweep gives that message the same long grace before trying again.
    assert reconcile(pipeline)["processing"] == 0
