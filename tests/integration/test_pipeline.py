"""The pipeline's services against real Postgres, S3 and the simulator, one step at a time
(the dispatcher records what would be enqueued, so each step is run by the test)."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import fields, replace
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import event, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from tests.integration.flow import (
    new_job,
    poll_until_left_processing,
    status,
    submit,
    submitted,
)
from tests.support import RecordingDispatcher, SimulatorAdmin, wait_for
from workers import callbacks, dispatch, jobs, quarantine, tenants
from workers import pipeline as pipeline_module
from workers.admission import ADMISSION_LOCK
from workers.db import unit_of_work
from workers.intake import GenerationInput, accept, commit_staged, stage
from workers.models import Job, OutboxMessage
from workers.outbox import relay
from workers.pipeline import Pipeline, video_key
from workers.reconciler import reconcile
from workers.runtime import build_callbacks
from workers.states import JobState
from workers.wavespeed import Prediction
from workers.work import Work, silent

pytestmark = pytest.mark.integration


def test_accept_stores_job_event_and_outbox_together(pipeline: Pipeline, portrait: bytes) -> None:
    job_id = new_job(pipeline, portrait)
    with pipeline.sessions() as session:
        job = jobs.get(session, job_id)
        assert job.status == JobState.QUEUED
        assert job.input_key == f"inputs/{job_id}/image.png"
        assert [e.to_state for e in jobs.events(session, job_id)] == ["queued"]
        rows = session.scalars(select(OutboxMessage).where(OutboxMessage.job_id == job_id)).all()
        assert [(r.task, r.published_at) for r in rows] == [(dispatch.SUBMIT, None)]
    assert pipeline.storage.get_bytes(job.input_key) == portrait


def test_a_commit_whose_answer_is_lost_keeps_the_image_a_failed_write_does_not(
    pipeline: Pipeline, portrait: bytes
) -> None:
    """Postgres commits, then the answer never reaches us: the job exists, so its image in
    S3 must too. A transaction that failed before its COMMIT leaves nothing behind."""
    storage, settings = pipeline.storage, pipeline.settings
    request = GenerationInput(prompt="slow push-in", guidance_scale=0.5, duration=5,
                              image_url="https://example.com/portrait.png")  # fmt: skip
    with unit_of_work(pipeline.sessions) as session:
        owner = tenants.create_tenant(session, "lost-answers", pipeline.sealer)

    def answer_lost(session: Session) -> None:
        raise ConnectionError("server closed the connection after COMMIT")

    lossy = sessionmaker(bind=pipeline.sessions.kw["bind"], expire_on_commit=False)
    event.listen(lossy, "after_commit", answer_lost)
    staged = stage(storage, settings, request, portrait)
    with pytest.raises(ConnectionError):
        commit_staged(
            lambda: silent(lossy), storage, staged, lambda w: accept(w, owner, request, staged)
        )
    with pipeline.sessions() as session:
        assert jobs.get(session, staged.job_id).status == JobState.QUEUED  # it committed
    assert storage.get_bytes(staged.key) == portrait

    def refused(work: Work) -> None:
        raise ValueError("over budget")

    staged = stage(storage, settings, request, portrait)
    with pytest.raises(ValueError):
        commit_staged(pipeline.work, storage, staged, refused)
    assert storage.head(staged.key) is None


def test_relay_publishes_once_and_marks(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    job_id = new_job(pipeline, portrait)
    assert relay(pipeline.sessions, dispatcher) == 1
    assert relay(pipeline.sessions, dispatcher) == 0
    assert [(t, j) for t, j, _, _ in dispatcher.take()] == [(dispatch.SUBMIT, job_id)]


def test_one_image_becomes_a_stored_video(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)
    job = status(pipeline, job_id)
    assert job.status == JobState.PROCESSING and job.prediction_id
    assert job.cost_usd is not None and float(job.cost_usd) == 0.45
    ((task, _, countdown, _),) = dispatcher.take()
    assert task == dispatch.POLL and countdown == pipeline.settings.poll_first_delay_seconds[5]

    job = poll_until_left_processing(pipeline, job_id)
    assert job.status == JobState.STORING
    assert dispatch.STORE in [t for t, *_ in dispatcher.take()]

    pipeline.store(job_id)
    job = status(pipeline, job_id)
    assert job.status == JobState.COMPLETED, job.error_message
    stored = pipeline.storage.get_bytes(job.s3_key)
    entry = simulator.prediction(job.prediction_id)
    assert hashlib.sha256(stored).hexdigest() == job.sha256 == entry["output_sha256"]
    assert job.bytes == len(stored)
    assert job.video_codec == "h264" and job.video_duration == pytest.approx(5.0, abs=0.1)
    assert job.video_width and job.video_height and job.inference_ms is not None
    with pipeline.sessions() as session:
        path = [(e.from_state, e.to_state) for e in jobs.events(session, job_id)]
    assert path == [
        (None, "queued"),
        ("queued", "submitting"),
        ("submitting", "processing"),
        ("processing", "storing"),
        ("storing", "completed"),
    ]


def test_duplicate_and_late_messages_change_nothing(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)
    pipeline.submit(job_id)  # a redelivered submit must not POST again
    job = status(pipeline, job_id)
    charged = [
        p for p in simulator.ledger()["predictions"] if f"inputs/{job_id}/" in p["input"]["image"]
    ]
    assert len(charged) == 1 and job.submit_attempts == 1

    poll_until_left_processing(pipeline, job_id)
    pipeline.store(job_id)
    pipeline.store(job_id)  # late duplicate: the job is already completed
    pipeline.poll(job_id)
    with pipeline.sessions() as session:
        assert jobs.get(session, job_id).status == JobState.COMPLETED
        completions = [e for e in jobs.events(session, job_id) if e.to_state == "completed"]
    assert len(completions) == 1


def test_a_stale_poll_chain_stops(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(inference_seconds=[30, 30])
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)
    ((_, _, _, first),) = dispatcher.take()
    pipeline.poll(job_id)  # a webhook-style poll takes the chain over
    ((_, _, _, taken),) = dispatcher.take()
    pipeline.poll(job_id, first["seq"])  # the old chain's message arrives late
    assert dispatcher.take() == []  # ...and does not reschedule
    pipeline.poll(job_id, taken["seq"])
    assert [t for t, *_ in dispatcher.take()] == [dispatch.POLL]


def test_permanent_task_failure_fails_the_job_with_our_code(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(task_fail={"1200": 1.0})
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)
    job = poll_until_left_processing(pipeline, job_id)
    assert job.status == JobState.FAILED
    assert job.error_code == "content_moderated" and "1200" in (job.error_message or "")


def test_rate_limited_submit_goes_back_to_the_queue(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(submit_429=1.0)
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)
    job = status(pipeline, job_id)
    assert job.status == JobState.QUEUED and job.submit_attempts == 1
    ((task, _, countdown, _),) = dispatcher.take()
    assert task == dispatch.SUBMIT and countdown is not None and countdown > 0
    simulator.reset_faults()
    wait_for(pipeline.admit, timeout=10)  # admitted again once its backoff is over
    pipeline.submit(job_id)
    job = status(pipeline, job_id)
    assert job.status == JobState.PROCESSING and job.submit_attempts == 2
    # Each claim's event names the attempt it counted (read from the row it moved).
    with pipeline.sessions() as session:
        claims = [e.reason for e in jobs.events(session, job_id) if e.to_state == "submitting"]
    assert claims == ["attempt 1", "attempt 2"]


def test_rejected_submit_fails_at_once(
    pipeline: Pipeline, portrait: bytes, settings: Settings
) -> None:
    job_id = new_job(pipeline, portrait)
    with unit_of_work(pipeline.sessions) as session:  # WaveSpeed refuses what we let through
        session.get(Job, job_id).prompt = "x" * 3000  # type: ignore[union-attr]
    submit(pipeline, job_id)
    job = status(pipeline, job_id)
    assert job.status == JobState.FAILED and job.error_code == "invalid_input"


def test_an_unanswered_submit_is_adopted_from_history_not_paid_twice(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(submit_drop_after_create=1.0)
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)
    assert status(pipeline, job_id).status == JobState.SUBMITTING
    assert [t for t, *_ in dispatcher.take()] == [dispatch.RECOVER]
    simulator.reset_faults()
    pipeline.recover(job_id)
    job = status(pipeline, job_id)
    assert job.status == JobState.PROCESSING and job.submit_attempts == 1
    mine = [
        p for p in simulator.ledger()["predictions"] if f"inputs/{job_id}/" in p["input"]["image"]
    ]
    assert [p["id"] for p in mine] == [job.prediction_id]


def test_an_expired_output_fails_with_output_expired(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(output_gone_after_seconds=0)
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)
    poll_until_left_processing(pipeline, job_id)
    with unit_of_work(pipeline.sessions) as session:  # reported more than 7 days ago
        session.execute(
            update(Job).where(Job.id == job_id).values(output_at=func.now() - timedelta(days=8))
        )
    pipeline.store(job_id)
    job = status(pipeline, job_id)
    assert job.status == JobState.FAILED and job.error_code == "output_expired"


def test_wavespeed_unable_to_read_our_copy_of_the_image_is_tried_again(
    pipeline: Pipeline, portrait: bytes
) -> None:
    """1402 "media URL not reachable" names our own S3 copy: an outage of ours (S3 cut while
    the job was submitted), not a bad input, so the job goes back to the queue."""
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)
    first = status(pipeline, job_id).prediction_id
    assert first
    failure = {"id": first, "status": "failed", "code": 1402, "error": "media URL not reachable"}
    assert pipeline.take_webhook(first, failure)
    job = status(pipeline, job_id)
    assert job.status == JobState.QUEUED and job.error_code is None and job.not_before


def test_the_output_is_asked_for_uncompressed(pipeline: Pipeline, portrait: bytes) -> None:
    """The store streams the raw bytes into S3: a CDN allowed to gzip them would store a
    gzip file (and fail it as invalid) instead of the MP4."""
    asked: list[httpx.Request] = []
    recording = httpx.Client(event_hooks={"request": [asked.append]})
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)
    poll_until_left_processing(pipeline, job_id)
    replace(pipeline, http=recording).store(job_id)
    recording.close()
    assert status(pipeline, job_id).status == JobState.COMPLETED
    ((download,),) = [[r for r in asked if r.url.path.startswith("/_sim/outputs/")]]
    assert download.headers["accept-encoding"] == "identity"


def test_a_cdn_404_just_after_completion_is_retried_not_failed(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)
    poll_until_left_processing(pipeline, job_id)
    simulator.set_faults(output_gone_after_seconds=0)  # the CDN lags behind the completion
    pipeline.store(job_id)
    job = status(pipeline, job_id)
    assert job.status == JobState.STORING and job.step_failures == 1
    assert "HTTP 404" in events_of(pipeline, job_id)[-1].reason
    pipeline.store(job_id)  # a duplicate message before the retry is due does nothing
    assert status(pipeline, job_id).step_failures == 1
    simulator.reset_faults()
    make_due(pipeline, job_id)
    pipeline.store(job_id)
    assert status(pipeline, job_id).status == JobState.COMPLETED


def test_a_truncated_download_is_retried_and_leaves_no_object(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)
    poll_until_left_processing(pipeline, job_id)
    simulator.set_faults(output_truncate=1.0)
    pipeline.store(job_id)
    job = status(pipeline, job_id)
    assert job.status == JobState.STORING and job.step_failures == 1 and job.due_at
    assert pipeline.storage.head(video_key(job_id)) is None
    simulator.reset_faults()
    make_due(pipeline, job_id)
    pipeline.store(job_id)
    assert status(pipeline, job_id).status == JobState.COMPLETED


def test_an_output_that_is_not_a_video_fails_the_job_and_leaves_no_object(
    pipeline: Pipeline, portrait: bytes
) -> None:
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)
    job = poll_until_left_processing(pipeline, job_id)
    assert job.input_key
    not_a_video = pipeline.storage.presign_get(job.input_key, 300)  # the PNG it was made from
    with unit_of_work(pipeline.sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(output_url=not_a_video))
    pipeline.store(job_id)
    job = status(pipeline, job_id)
    assert (job.status, job.error_code) == (JobState.FAILED, "output_invalid")
    assert pipeline.storage.head(video_key(job_id)) is None  # its copy went with it


def store_failed_for_good(pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin) -> Any:
    """A job with a callback URL whose store broke at its deadline (the CDN then healthy)."""
    job_id = new_job(pipeline, portrait, webhook_url="https://hooks.example.com/kling")
    submit(pipeline, job_id)
    poll_until_left_processing(pipeline, job_id)
    simulator.set_faults(output_truncate=1.0)
    with unit_of_work(pipeline.sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(store_deadline_at=func.now()))
    pipeline.store(job_id)
    simulator.reset_faults()
    return job_id


def test_a_store_that_fails_past_its_deadline_fails_and_can_be_restored(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin, dispatcher: RecordingDispatcher
) -> None:
    job_id = store_failed_for_good(pipeline, portrait, simulator)
    job = status(pipeline, job_id)
    assert job.status == JobState.FAILED and job.error_code == "storage_failed"
    dispatcher.take()
    assert pipeline.restore(job_id)
    assert [t for t, *_ in dispatcher.take()] == [dispatch.STORE]
    with pipeline.sessions() as session:  # its `failed` callback is not sent late
        assert [(d.event, d.status) for d, _ in callbacks.of_job(session, job_id)] == [
            (callbacks.FAILED, callbacks.DeliveryStatus.SUPERSEDED)
        ]
    pipeline.store(job_id)
    job = status(pipeline, job_id)
    assert job.status == JobState.COMPLETED and job.error_code is None
    assert not pipeline.restore(job_id)  # only failed stores are restored


def test_a_store_that_keeps_failing_is_retried_to_its_deadline_not_put_aside(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    """Hours of S3 or CDN trouble: every try is sent by the reconciler and fails. Those are
    resends that got through, not a message lost again and again, so the resend cap (which
    puts a job aside for an operator, with no deadline running) must not be reached."""
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)
    poll_until_left_processing(pipeline, job_id)
    simulator.set_faults(output_truncate=1.0)
    cap = pipeline.settings.reconcile_max_resends
    for tries in (1, 2):
        with unit_of_work(pipeline.sessions) as session:  # resent up to the cap, this try last
            session.execute(update(Job).where(Job.id == job_id).values(resends=cap))
        make_due(pipeline, job_id)
        pipeline.store(job_id)
        overdue = func.now() - timedelta(hours=1)
        with unit_of_work(pipeline.sessions) as session:
            session.execute(
                update(Job).where(Job.id == job_id).values(due_at=overdue, updated_at=overdue)
            )
        assert reconcile(pipeline)["storing"] == 1  # sent again, not put aside
        with pipeline.sessions() as session:
            assert job_id not in [entry.subject_id for entry in quarantine.active(session)]
        job = status(pipeline, job_id)
        assert job.status == JobState.STORING and job.step_failures == tries and job.resends == 1


def test_a_restore_during_a_failed_callbacks_attempt_still_supersedes_it(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    """The `generation.failed` attempt is mid-POST when the store is restored: however the
    attempt ends, the callback stays superseded and is not retried after `completed`."""
    job_id = store_failed_for_good(pipeline, portrait, simulator)
    with pipeline.sessions() as session:
        ((delivery, _),) = callbacks.of_job(session, job_id)

    def restored_mid_post(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        assert pipeline.restore(job_id)
        return httpx.Response(500)

    service = build_callbacks(pipeline)
    assert replace(service, post=restored_mid_post).deliver(delivery.id) is None
    with pipeline.sessions() as session:
        ((delivery, attempts),) = callbacks.of_job(session, job_id)
    assert delivery.status == callbacks.DeliveryStatus.SUPERSEDED
    assert delivery.next_attempt_at is None and [a.status_code for a in attempts] == [500]


def events_of(pipeline: Pipeline, job_id: Any) -> list[Any]:
    with pipeline.sessions() as session:
        return list(jobs.events(session, job_id))


def make_due(pipeline: Pipeline, job_id: Any) -> None:
    """Pretend the job's next step is due now (its backoff is over)."""
    with unit_of_work(pipeline.sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(due_at=func.now()))


def test_a_burst_through_an_open_gate_costs_one_submit_message_per_job(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    ids = [new_job(pipeline, portrait) for _ in range(3)]
    for job_id in ids:  # each job's own outbox message arrives
        pipeline.submit(job_id)
    assert {status(pipeline, j).status for j in ids} == {JobState.PROCESSING}
    # The first message admitted all three; the others' own messages claimed them.
    assert [t for t, *_ in dispatcher.take()] == [dispatch.POLL] * 3


def test_a_job_waiting_for_the_gate_gets_its_message_when_a_slot_frees(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    gated = replace(pipeline, settings=pipeline.settings.model_copy(update={"max_in_flight": 1}))
    first, second = new_job(gated, portrait), new_job(gated, portrait)
    gated.submit(first)
    gated.submit(second)  # the gate is full: its message is used up, the job waits parked
    assert status(gated, second).status == JobState.QUEUED
    assert [t for t, *_ in dispatcher.take()] == [dispatch.POLL]
    poll_until_left_processing(gated, first)  # the slot frees...
    assert (dispatch.SUBMIT, second) in [(t, j) for t, j, *_ in dispatcher.take()]
    gated.submit(second)  # ...and the message the gate sent submits it
    assert status(gated, second).status == JobState.PROCESSING


@pytest.mark.parametrize("after", ["its claim", "its claim's statement"])
def test_a_job_admitted_by_another_gate_pass_while_its_message_waited_is_still_submitted(
    pipeline: Pipeline,
    portrait: bytes,
    dispatcher: RecordingDispatcher,
    monkeypatch: Any,
    after: str,
) -> None:
    """Just after this message's claim found the job not admitted, another worker's gate pass
    admits it and commits: after the whole claim, or between the claim's statement and the
    read that follows it. The job was not parked, so that pass sends it no message."""
    job_id = new_job(pipeline, portrait)
    owner, name = (
        (pipeline, "_claim") if after == "its claim" else (pipeline_module._CLAIM, "moved")
    )
    step = getattr(owner, name)

    def step_then_another_worker_admits(*args: Any, **kwargs: Any) -> Any:
        found = step(*args, **kwargs)
        monkeypatch.setattr(owner, name, step)
        assert pipeline.admit() == 1
        return found

    monkeypatch.setattr(owner, name, step_then_another_worker_admits)
    pipeline.submit(job_id)
    # No message is coming for it, so this one must submit it.
    assert status(pipeline, job_id).status == JobState.PROCESSING
    assert [t for t, *_ in dispatcher.take()] == [dispatch.POLL]


def test_a_job_waiting_for_the_gate_holds_no_row_lock_another_gate_pass_needs(
    pipeline: Pipeline, portrait: bytes
) -> None:
    job_id = new_job(pipeline, portrait)
    with pipeline.sessions() as gate, gate.begin():
        # Another worker's gate pass holds the gate's lock...
        gate.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADMISSION_LOCK})
        own_message = threading.Thread(target=pipeline.submit, args=(job_id,))
        own_message.start()
        wait_for(lambda: waiting_for_advisory_lock(pipeline), timeout=30, interval=0.05)
        # ...and, to admit this job, locks its row: parking must not have taken it first
        # (the two passes would deadlock).
        locked = gate.execute(
            select(Job.id).where(Job.id == job_id).with_for_update(nowait=True)
        ).scalar_one()
        assert locked == job_id
    own_message.join(timeout=30)
    assert status(pipeline, job_id).status == JobState.PROCESSING


def test_a_submit_that_waited_for_the_gate_dates_its_claim_from_the_claim_itself(
    pipeline: Pipeline, portrait: bytes
) -> None:
    """`recover` reads WaveSpeed's history in a window that starts at `last_submit_at`: a
    claim dated from its transaction's start, before a long wait for the gate's lock, would
    leave the POST outside the window it is looked for in."""
    job_id = new_job(pipeline, portrait)
    with pipeline.sessions() as gate, gate.begin():
        gate.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADMISSION_LOCK})
        own_message = threading.Thread(target=pipeline.submit, args=(job_id,))
        own_message.start()
        wait_for(lambda: waiting_for_advisory_lock(pipeline), timeout=30, interval=0.05)
        time.sleep(1.5)
        released = gate.scalar(text("SELECT clock_timestamp()"))
    own_message.join(timeout=30)
    job = status(pipeline, job_id)
    assert job.status == JobState.PROCESSING
    assert job.last_submit_at is not None and job.last_submit_at >= released


def waiting_for_advisory_lock(pipeline: Pipeline) -> bool:
    with pipeline.sessions() as session:
        query = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        return bool(session.scalar(text(query)))


def test_a_finished_prediction_reported_by_the_webhook_settles_the_job_at_once(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    job_id, prediction_id = submitted(pipeline, portrait)
    reported = {"id": prediction_id, "status": "completed", "outputs": ["https://cdn.test/o.mp4"]}
    assert pipeline.take_webhook(prediction_id, reported)
    job = status(pipeline, job_id)
    # The output URL is the reported one, so no `/result` was asked for; and no poll task.
    assert job.status == JobState.STORING and job.output_url == "https://cdn.test/o.mp4"
    assert [t for t, *_ in dispatcher.take()] == [dispatch.STORE]
    assert not pipeline.take_webhook(prediction_id, reported)  # WaveSpeed's retry: nothing


def test_a_webhook_that_does_not_settle_the_job_asks_for_a_poll_now(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    job_id, prediction_id = submitted(pipeline, portrait)
    assert pipeline.take_webhook(prediction_id, None)  # a body that was not a prediction
    assert [(t, j, c) for t, j, c, _ in dispatcher.take()] == [(dispatch.POLL, job_id, None)]
    assert status(pipeline, job_id).status == JobState.PROCESSING


def test_a_failure_reported_with_its_code_settles_the_job_without_asking_wavespeed(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(inference_seconds=[30, 30])  # `/result` would still say processing
    job_id, prediction_id = submitted(pipeline, portrait)
    reported = {"id": prediction_id, "status": "failed", "code": 1200, "error": "moderated"}
    assert pipeline.take_webhook(prediction_id, reported)
    job = status(pipeline, job_id)
    assert job.status == JobState.FAILED and job.error_code == "content_moderated"


def test_a_poll_that_stalled_past_a_resubmission_changes_nothing(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(inference_seconds=[30, 30])
    job_id, first = submitted(pipeline, portrait)
    # What a poll holds while it waits on `/result`: what its claim answered.
    job = status(pipeline, job_id)
    stalled = jobs.Chain(**{field.name: getattr(job, field.name) for field in fields(jobs.Chain)})
    failure = {"id": first, "status": "failed", "code": 5000, "error": "internal"}
    # Meanwhile WaveSpeed reports the first prediction failed, retryably; once its backoff
    # is over the job is submitted again.
    assert pipeline.take_webhook(first, failure)
    with unit_of_work(pipeline.sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(not_before=None))
    submit(pipeline, job_id)
    second = status(pipeline, job_id).prediction_id
    assert second and second != first
    # The stalled poll gets the first prediction's failure back, late: it must neither fail
    # the job nor requeue it (which would abandon, and pay again for, the second prediction).
    with pipeline.work() as work:
        pipeline._on_prediction(work, stalled, pipeline.clock(), Prediction.from_data(failure))
    job = status(pipeline, job_id)
    assert job.status == JobState.PROCESSING and job.prediction_id == second
    # Two predictions for this job (the image URL carries its id), not a third.
    ours = [e for e in simulator.ledger()["predictions"] if str(job_id) in e["input"]["image"]]
    assert [e["id"] for e in ours] == [first, second]


def test_a_webhook_that_could_not_be_taken_is_taken_when_wavespeed_retries_it(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    job_id, prediction_id = submitted(pipeline, portrait)

    def broker_down(*_: Any, **__: Any) -> None:
        raise ConnectionError("redis is restarting")

    with pytest.raises(ConnectionError):  # the API answers 500, so WaveSpeed retries
        replace(pipeline, dispatch=broker_down).take_webhook(prediction_id, None)
    assert pipeline.take_webhook(prediction_id, None)  # the retry is not a duplicate
    assert [(t, j) for t, j, *_ in dispatcher.take()] == [(dispatch.POLL, job_id)]
    assert not pipeline.take_webhook(prediction_id, None)  # but once taken, it is


@pytest.mark.parametrize(
    "reported",
    [
        {"status": "processing"},
        {"status": "completed", "id": "someone-else"},
        {"status": "completed", "outputs": []},
        {"status": "failed", "error": "internal error"},
    ],
    ids=["not-finished", "another-prediction", "completed-without-output", "failed-without-code"],
)
def test_a_report_that_does_not_settle_the_job_falls_back_to_a_real_poll(
    pipeline: Pipeline,
    portrait: bytes,
    simulator: SimulatorAdmin,
    dispatcher: RecordingDispatcher,
    reported: dict[str, Any],
) -> None:
    simulator.set_faults(inference_seconds=[30, 30])
    job_id, prediction_id = submitted(pipeline, portrait)
    body = {"id": prediction_id, "outputs": ["https://x/o.mp4"]} | reported
    assert pipeline.take_webhook(prediction_id, body)
    assert [(t, j, kw) for t, j, _, kw in dispatcher.take()] == [(dispatch.POLL, job_id, {})]
    pipeline.poll(job_id)
    job = status(pipeline, job_id)
    # WaveSpeed was asked, and says the 30 s inference is still running.
    assert job.status == JobState.PROCESSING and job.output_url is None
