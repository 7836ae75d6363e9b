"""Producer control: start deadlines (a job not submitted by its deadline ends `expired`,
never sent to WaveSpeed, never charged, and its producer is told), retries, real cancel (the
prediction deleted at WaveSpeed, with what it cost on the record) and whole-job deadlines."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select, update

from sandbox.processes import free_port
from tests.integration.flow import new_job, poll_until_left_processing, status, submitted
from tests.support import RecordingDispatcher, SimulatorAdmin, wait_for
from workers import callbacks, dispatch
from workers.db import unit_of_work
from workers.intake import Refusal, again, committed_spend
from workers.models import CallbackDelivery, Job, JobEvent, Tenant
from workers.pipeline import Pipeline, video_key
from workers.reconciler import reconcile
from workers.representation import Generation
from workers.states import JobState
from workers.storage import StorageError
from workers.wavespeed import WaveSpeedClient, WaveSpeedRejected

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


# -- real cancel, deadlines and what they cost -------------------------------------------


def withdraws(dispatcher: RecordingDispatcher) -> list[object]:
    return [job for task, job, *_ in dispatcher.take() if task == dispatch.WITHDRAW]


def history(pipeline: Pipeline, job_id: object) -> list[str]:
    with pipeline.sessions() as session:
        return [
            e.reason or ""
            for e in session.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            )
        ]


def test_cancelling_a_running_job_deletes_its_prediction_at_wavespeed(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(inference_seconds=[60, 60])
    job_id, prediction_id = submitted(pipeline, portrait)
    assert Generation.of(status(pipeline, job_id)).charged == "unknown"
    pipeline.cancel(job_id)
    assert withdraws(dispatcher) == [job_id]
    pipeline.withdraw(job_id)
    assert simulator.prediction(prediction_id)["status"] == "deleted"
    job = status(pipeline, job_id)
    assert (job.status, job.due_at) == (JobState.CANCELLED, None)
    # WaveSpeed documents no refund for a deleted task: the record does not guess.
    assert Generation.of(job).charged == "unknown"
    assert any(f"prediction {prediction_id} deleted" in line for line in history(pipeline, job_id))
    before = history(pipeline, job_id)
    pipeline.withdraw(job_id)  # a duplicate message deletes nothing more
    assert history(pipeline, job_id) == before


def test_a_prediction_that_completed_before_the_cancel_is_charged(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(inference_seconds=[0, 0])
    job_id, prediction_id = submitted(pipeline, portrait)
    wait_for(lambda: simulator.prediction(prediction_id)["status"] == "completed")
    pipeline.cancel(job_id)  # before any poll saw it finish
    pipeline.withdraw(job_id)
    assert Generation.of(status(pipeline, job_id)).charged == "true"
    assert simulator.prediction(prediction_id)["refunded_usd"] == 0.0


def test_a_queued_job_cancelled_was_not_charged_and_deletes_nothing(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    job_id = new_job(pipeline, portrait)
    dispatcher.take()
    pipeline.cancel(job_id)
    job = status(pipeline, job_id)
    assert (job.charged, job.due_at, withdraws(dispatcher)) == (False, None, [])
    assert Generation.of(job).charged == "false"


def test_a_cancel_that_overtakes_its_submit_deletes_the_prediction_once_it_is_known(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    job_id = new_job(pipeline, portrait)
    real = pipeline.wavespeed

    class CancelledMidPost:
        """The caller cancels while the POST is on its way to WaveSpeed."""

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def submit(self, *args: object, **kwargs: object) -> object:
            pipeline.cancel(job_id)
            return real.submit(*args, **kwargs)  # type: ignore[arg-type]

    racing = replace(pipeline, wavespeed=CancelledMidPost())  # type: ignore[arg-type]
    racing.submit(job_id)
    job = status(pipeline, job_id)
    assert job.status == JobState.CANCELLED and job.prediction_id
    assert Generation.of(job).charged == "unknown"  # a POST was on its way when it stopped
    assert job_id in withdraws(dispatcher)
    pipeline.withdraw(job_id)
    assert simulator.prediction(job.prediction_id)["status"] == "deleted"


def test_a_withdraw_wavespeed_refuses_backs_off_and_gives_up_at_its_cap(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(inference_seconds=[60, 60])
    job_id, prediction_id = submitted(pipeline, portrait)
    pipeline.cancel(job_id)
    dispatcher.take()
    away = WaveSpeedClient(httpx.Client(timeout=2.0), f"http://127.0.0.1:{free_port()}", "k")
    capped = pipeline.settings.model_copy(update={"withdraw_max_attempts": 2})
    gone = replace(pipeline, wavespeed=away, settings=capped)
    gone.withdraw(job_id)
    job = status(pipeline, job_id)
    assert job.step_failures == 1 and job.due_at is not None
    assert job.due_at > datetime.now(UTC)  # backing off, on the record
    with unit_of_work(pipeline.sessions) as session:  # its backoff and the sweep's grace end
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(due_at=past() - timedelta(minutes=5), updated_at=past() - timedelta(minutes=5))
        )
    assert reconcile(gone)["cancelled"] == 1
    assert withdraws(dispatcher) == [job_id]
    gone.withdraw(job_id)
    job = status(pipeline, job_id)
    assert (job.due_at, job.step_failures) == (None, 2)
    assert "gave up deleting" in history(pipeline, job_id)[-1]
    assert simulator.prediction(prediction_id)["status"] != "deleted"
    assert reconcile(gone)["cancelled"] == 0


def test_a_running_job_past_its_deadline_fails_and_its_prediction_is_deleted(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(inference_seconds=[60, 60])
    job_id = new_job(
        pipeline, portrait, webhook_url=HOOK, deadline_at=datetime.now(UTC) + timedelta(hours=1)
    )
    pipeline.submit(job_id)
    prediction_id = status(pipeline, job_id).prediction_id
    assert prediction_id
    assert reconcile(pipeline)["expired"] == 0
    with unit_of_work(pipeline.sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(deadline_at=past()))
    dispatcher.take()
    assert reconcile(pipeline)["expired"] == 1
    job = status(pipeline, job_id)
    assert (job.status, job.error_code) == (JobState.FAILED, "deadline_exceeded")
    sent = dispatcher.take()
    assert (dispatch.WITHDRAW, job_id) in [(t, j) for t, j, *_ in sent]
    assert dispatch.NOTIFY in [t for t, *_ in sent]
    pipeline.withdraw(job_id)
    assert simulator.prediction(prediction_id)["status"] == "deleted"
    pipeline.poll(job_id)  # a poll still on its way changes nothing
    assert status(pipeline, job_id).status == JobState.FAILED


def test_a_queued_job_past_its_deadline_fails_unsubmitted_and_uncharged(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    job_id = new_job(pipeline, portrait, deadline_at=past())
    pipeline.submit(job_id)
    job = status(pipeline, job_id)
    assert (job.status, job.error_code, job.submit_attempts) == (
        JobState.FAILED,
        "deadline_exceeded",
        0,
    )
    assert Generation.of(job).charged == "false"
    assert ours(simulator, job_id) == []
    assert withdraws(dispatcher) == []


def cancelled_behind_a_killed_store(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> tuple[uuid.UUID, str]:
    """A job cancelled while storing, after its store uploaded the video and was killed before
    its commit: its id and its prediction's."""
    simulator.set_faults(inference_seconds=[0, 0])
    job_id, prediction_id = submitted(pipeline, portrait)
    assert poll_until_left_processing(pipeline, job_id).status == JobState.STORING
    pipeline.storage.put_stream(video_key(job_id), iter([b"\x00" * 1024]), "video/mp4")
    pipeline.cancel(job_id)
    return job_id, prediction_id


def test_a_store_killed_after_its_upload_leaves_no_video_behind_a_cancel(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin, dispatcher: RecordingDispatcher
) -> None:
    job_id, _ = cancelled_behind_a_killed_store(pipeline, portrait, simulator)
    assert withdraws(dispatcher) == [job_id]
    pipeline.withdraw(job_id)
    assert pipeline.storage.head(video_key(job_id)) is None
    assert status(pipeline, job_id).due_at is None  # done: nothing left to withdraw


class DeletesFail:
    """The storage, but S3 refuses every delete."""

    def __init__(self, real: object) -> None:
        self._real = real

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def delete(self, key: str) -> None:
        raise StorageError(f"delete {key}: S3 is away")


def test_a_withdraw_that_cannot_delete_our_copy_tries_again_before_wavespeed_forgets(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    job_id, prediction_id = cancelled_behind_a_killed_store(pipeline, portrait, simulator)
    real = pipeline.storage
    replace(pipeline, storage=DeletesFail(real)).withdraw(job_id)  # type: ignore[arg-type]
    job = status(pipeline, job_id)
    assert job.due_at is not None and job.step_failures == 1  # tried again later
    assert simulator.prediction(prediction_id)["status"] == "completed"  # not yet deleted
    # The history names what could not be deleted: our copy, not the prediction.
    assert history(pipeline, job_id)[-1].startswith("deleting our copy of its output failed (1)")
    pipeline.withdraw(job_id)
    job = status(pipeline, job_id)
    assert (job.due_at, real.head(video_key(job_id))) == (None, None)
    assert simulator.prediction(prediction_id)["status"] == "deleted"
    assert Generation.of(job).charged == "true"  # WaveSpeed's last report was still there


def test_the_last_withdraw_try_deletes_the_prediction_even_if_our_copy_cannot_go(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    job_id, prediction_id = cancelled_behind_a_killed_store(pipeline, portrait, simulator)
    last_try = replace(
        pipeline,
        storage=DeletesFail(pipeline.storage),  # type: ignore[arg-type]
        settings=pipeline.settings.model_copy(update={"withdraw_max_attempts": 1}),
    )
    last_try.withdraw(job_id)
    job = status(pipeline, job_id)
    assert job.due_at is None  # nothing left to try
    assert simulator.prediction(prediction_id)["status"] == "deleted"
    assert Generation.of(job).charged == "true"  # settled from WaveSpeed's last report
    assert "gave up deleting our copy of its output" in history(pipeline, job_id)[-1]


def test_a_store_overtaken_by_a_cancel_leaves_no_video_behind(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(inference_seconds=[0, 0])
    job_id, _ = submitted(pipeline, portrait)
    assert poll_until_left_processing(pipeline, job_id).status == JobState.STORING
    real = pipeline.storage

    class CancelledMidCopy:
        """The caller cancels while the video streams into S3."""

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def put_stream(self, *args: object, **kwargs: object) -> object:
            pipeline.cancel(job_id)
            return real.put_stream(*args, **kwargs)  # type: ignore[arg-type]

    replace(pipeline, storage=CancelledMidCopy()).store(job_id)  # type: ignore[arg-type]
    job = status(pipeline, job_id)
    assert (job.status, job.s3_key) == (JobState.CANCELLED, None)
    assert Generation.of(job).charged == "true"  # its output was made, and paid for
    assert real.head(video_key(job_id)) is None


def test_an_output_flagged_nsfw_is_on_the_record_and_fails_a_tenant_that_rejects_them(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin, dispatcher: RecordingDispatcher
) -> None:
    simulator.set_faults(inference_seconds=[0, 0], nsfw=1.0)
    delivered, _ = submitted(pipeline, portrait)
    job = poll_until_left_processing(pipeline, delivered)
    assert (job.status, Generation.of(job).nsfw) == (JobState.STORING, [True])
    with unit_of_work(pipeline.sessions) as session:
        session.execute(update(Tenant).where(Tenant.name == "flow").values(reject_nsfw=True))
    rejected, _ = submitted(pipeline, portrait)
    job = poll_until_left_processing(pipeline, rejected)
    assert (job.status, job.error_code) == (JobState.FAILED, "content_moderated")
    assert "flagged output 0 as NSFW" in (job.error_message or "")
    record = Generation.of(job)
    assert (record.nsfw, record.charged) == ([True], "true")  # made and billed all the same
    assert dispatch.STORE not in [t for t, *_ in dispatcher.take()]


def test_a_job_stopped_while_its_submit_had_no_answer_has_the_prediction_found_and_deleted(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(inference_seconds=[60, 60], submit_drop_after_create=1.0)
    job_id = new_job(pipeline, portrait)
    pipeline.submit(job_id)  # WaveSpeed made it, but its answer was lost
    assert status(pipeline, job_id).status == JobState.SUBMITTING
    simulator.set_faults(inference_seconds=[60, 60])
    dispatcher.take()
    pipeline.cancel(job_id)
    assert withdraws(dispatcher) == [job_id]
    pipeline.withdraw(job_id)
    job = status(pipeline, job_id)
    assert job.prediction_id and job.due_at is None
    assert simulator.prediction(job.prediction_id)["status"] == "deleted"
    assert ours(simulator, job_id)[0]["id"] == job.prediction_id  # the one it made


def test_a_submit_refused_after_the_cancel_leaves_nothing_to_delete_and_no_charge(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    job_id = new_job(pipeline, portrait)

    class CancelledThenRefused:
        def __getattr__(self, name: str) -> object:
            return getattr(pipeline.wavespeed, name)

        def submit(self, *args: object, **kwargs: object) -> object:
            pipeline.cancel(job_id)
            raise WaveSpeedRejected("duration must be one of 5, 10", status_code=400)

    replace(pipeline, wavespeed=CancelledThenRefused()).submit(job_id)  # type: ignore[arg-type]
    job = status(pipeline, job_id)
    assert (job.status, job.due_at, job.charged) == (JobState.CANCELLED, None, False)


def test_a_stopped_submit_that_made_nothing_is_proven_absent_and_settled_uncharged(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(submit_500=1.0)  # refused before anything was made, ambiguous to us
    job_id = new_job(pipeline, portrait)
    pipeline.submit(job_id)
    assert status(pipeline, job_id).status == JobState.SUBMITTING
    simulator.reset_faults()
    pipeline.cancel(job_id)
    long_ago = datetime.now(UTC) - timedelta(minutes=10)
    with unit_of_work(pipeline.sessions) as session:  # its POST can no longer arrive
        session.execute(update(Job).where(Job.id == job_id).values(last_submit_at=long_ago))
    pipeline.withdraw(job_id)  # a first miss: not proof yet
    job = status(pipeline, job_id)
    assert (job.due_at is not None, job.recover_misses, job.charged) == (True, 1, None)
    with unit_of_work(pipeline.sessions) as session:  # a POST's timeout later
        session.execute(update(Job).where(Job.id == job_id).values(last_miss_at=long_ago))
    pipeline.withdraw(job_id)
    job = status(pipeline, job_id)
    assert (job.due_at, job.charged) == (None, False)
    assert "twice: it made nothing to delete" in history(pipeline, job_id)[-1]
