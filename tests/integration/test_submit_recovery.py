"""An unanswered submit is never paid twice: it is adopted from WaveSpeed's history when it
arrived, and resubmitted only once the history proves it did not (two misses, far enough
apart, both begun once no POST of the attempt can still arrive), whatever messages come late
or twice."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, update

from tests.integration.flow import new_job, status, submit
from tests.support import RecordingDispatcher, SimulatorAdmin
from workers import dispatch, jobs
from workers.db import unit_of_work
from workers.models import Job
from workers.pipeline import Pipeline
from workers.reconciler import reconcile
from workers.states import JobState
from workers.wavespeed import WaveSpeedClient, WaveSpeedUnavailable

pytestmark = pytest.mark.integration


def settle(pipeline: Pipeline) -> float:
    """How long a sent POST waits for its answer."""
    return pipeline.settings.submit_post_seconds


def in_flight(pipeline: Pipeline) -> float:
    """How long after its claim a POST may still reach WaveSpeed (the submit's hard limit)."""
    return pipeline.settings.submit_time_limit_seconds


def rewind(pipeline: Pipeline, job_id: uuid.UUID, seconds: float, *columns: str) -> None:
    """Pretend the named clocks of the job (and updated_at) ran `seconds` earlier."""
    values = {name: getattr(Job, name) - timedelta(seconds=seconds) for name in columns}
    with unit_of_work(pipeline.sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def claimed_but_never_posted(pipeline: Pipeline, portrait: bytes) -> uuid.UUID:
    """A job whose worker died between the claim of attempt 1 and its POST."""
    job_id = new_job(pipeline, portrait)
    with unit_of_work(pipeline.sessions) as session:
        jobs.transition(
            session, job_id, JobState.QUEUED, JobState.SUBMITTING, reason="test",
            submit_attempts=1, last_submit_at=func.now(), due_at=func.now(),
        )  # fmt: skip
    return job_id


def ours(simulator: SimulatorAdmin, job_id: uuid.UUID) -> list[dict[str, Any]]:
    """The predictions WaveSpeed charged for this job (the image URL carries its id)."""
    return [p for p in simulator.ledger()["predictions"] if str(job_id) in p["input"]["image"]]


def test_one_miss_is_not_proof_two_far_enough_apart_are(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    job_id = claimed_but_never_posted(pipeline, portrait)
    wait = settle(pipeline)
    pipeline.recover(job_id, 1)  # the POST may still be in flight: this lookup cannot count
    assert status(pipeline, job_id).recover_misses == 0
    # Past the POST's own timeouts, but the worker may have stalled between its claim and
    # the POST (an S3 copy hanging, a paused host): until the submit's hard limit has killed
    # it, a miss proves nothing.
    rewind(pipeline, job_id, wait + 1, "last_submit_at")
    pipeline.recover(job_id, 1)
    assert status(pipeline, job_id).recover_misses == 0
    rewind(pipeline, job_id, in_flight(pipeline), "last_submit_at")
    pipeline.recover(job_id, 1)
    job = status(pipeline, job_id)
    assert job.status == JobState.SUBMITTING and job.recover_misses == 1
    pipeline.recover(job_id, 1)  # a duplicate message right after: not a second miss
    assert status(pipeline, job_id).recover_misses == 1
    # Every lookup asked for exactly one next lookup of the same attempt, no sooner than it
    # could count: the first two only once the hard limit has passed.
    asked = [(t, c, kw) for t, _, c, kw in dispatcher.take()]
    assert {(t, kw["attempt"]) for t, _, kw in asked} == {(dispatch.RECOVER, 1)}
    assert all(c is not None and c > wait for _, c, _ in asked)
    assert asked[0][1] > in_flight(pipeline) - 1 and asked[1][1] > in_flight(pipeline) - wait - 2
    rewind(pipeline, job_id, wait, "last_submit_at", "last_miss_at")
    pipeline.recover(job_id, 1)
    # Proof: back to the queue, and (the gate being open) a submit message for attempt 2.
    assert status(pipeline, job_id).status == JobState.QUEUED
    assert [(t, j) for t, j, *_ in dispatcher.take()] == [(dispatch.SUBMIT, job_id)]


def test_with_no_attempts_left_a_proven_miss_fails_the_job_uncharged(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    job_id = claimed_but_never_posted(pipeline, portrait)
    last = pipeline.settings.submit_max_attempts
    with unit_of_work(pipeline.sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(submit_attempts=last))
    rewind(pipeline, job_id, in_flight(pipeline), "last_submit_at")
    pipeline.recover(job_id, last)
    rewind(pipeline, job_id, settle(pipeline), "last_submit_at", "last_miss_at")
    pipeline.recover(job_id, last)
    job = status(pipeline, job_id)
    assert job.status == JobState.FAILED and job.error_code == "upstream_unavailable"
    assert ours(simulator, job_id) == []


class Stalling:
    """The pipeline's storage, with every presign taking `seconds` (an S3 endpoint that
    hangs between the claim and the POST)."""

    def __init__(self, inner: Any, seconds: float) -> None:
        self.inner, self.seconds = inner, seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def presign_get(self, key: str, expires_in: int) -> str:
        time.sleep(self.seconds)
        return str(self.inner.presign_get(key, expires_in))


def test_a_post_that_could_outlast_the_submit_limit_is_not_sent(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    """Past `submit_time_limit_seconds` a history miss proves the POST never arrived, so a
    worker that stalled before its POST must not send it late (Celery's time limit does not
    fire while the worker has lost the broker)."""
    post = pipeline.settings.submit_post_seconds
    tight = pipeline.settings.model_copy(update={"submit_time_limit_seconds": post + 10})
    stalled = replace(pipeline, settings=tight, storage=Stalling(pipeline.storage, 5.5))
    job_id = new_job(pipeline, portrait)
    submit(stalled, job_id)
    job = status(pipeline, job_id)
    assert job.status == JobState.QUEUED and job.prediction_id is None
    assert ours(simulator, job_id) == []
    with pipeline.sessions() as session:
        assert "not sent" in (jobs.events(session, job_id)[-1].reason or "")


def test_a_miss_counts_from_when_its_lookup_began(pipeline: Pipeline, portrait: bytes) -> None:
    """Two lookups of one attempt that overlap (two chains, a slow history answer) are one
    miss, however far apart their answers come back."""
    job_id = claimed_but_never_posted(pipeline, portrait)
    rewind(pipeline, job_id, 2 * in_flight(pipeline), "last_submit_at")
    spacing = timedelta(seconds=settle(pipeline))
    with unit_of_work(pipeline.sessions) as session:
        began = jobs.db_now(session)

    def miss(looked_at: Any) -> int | None:
        with unit_of_work(pipeline.sessions) as session:
            return jobs.record_miss(
                session, job_id, 1, looked_at,
                posted_before=looked_at - timedelta(seconds=in_flight(pipeline)),
                missed_before=looked_at - spacing,
            )  # fmt: skip

    assert miss(began) == 1
    assert miss(began + timedelta(seconds=1)) is None  # began a second after the first
    assert miss(began + spacing) == 2


def test_a_recover_message_of_an_earlier_attempt_changes_nothing(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    job_id = claimed_but_never_posted(pipeline, portrait)
    with unit_of_work(pipeline.sessions) as session:  # attempt 2 is being POSTed right now
        session.execute(update(Job).where(Job.id == job_id).values(submit_attempts=2))
    rewind(pipeline, job_id, 10 * in_flight(pipeline), "last_submit_at")
    for _ in range(3):
        pipeline.recover(job_id, 1)
    job = status(pipeline, job_id)
    assert job.status == JobState.SUBMITTING and job.recover_misses == 0
    assert dispatcher.take() == []


def test_an_earlier_attempts_prediction_is_never_adopted(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)  # attempt 1 is answered and runs at WaveSpeed...
    first = status(pipeline, job_id).prediction_id
    assert first
    failure = {"id": first, "status": "failed", "code": 5000, "error": "internal"}
    assert pipeline.take_webhook(first, failure)  # ...and fails retryably: back to the queue
    with unit_of_work(pipeline.sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(not_before=None))
    simulator.set_faults(submit_drop_after_create=1.0)
    pipeline.admit()
    pipeline.submit(job_id)  # attempt 2 is created at WaveSpeed, but its answer is lost
    assert status(pipeline, job_id).status == JobState.SUBMITTING
    simulator.reset_faults()
    pipeline.recover(job_id, 2)
    job = status(pipeline, job_id)
    charged = ours(simulator, job_id)
    assert len(charged) == 2 and job.status == JobState.PROCESSING
    # Attempt 2's own prediction, with an input URL of its own: not attempt 1's failed one.
    assert job.prediction_id != first and job.prediction_id in [p["id"] for p in charged]
    assert f"inputs/{job_id}/attempt-2." in next(
        p["input"]["image"] for p in charged if p["id"] == job.prediction_id
    )


class FailingHistory(WaveSpeedClient):
    """WaveSpeed with its history down; the rest of the API as the simulator answers it."""

    def history(self, **_: Any) -> list[Any]:
        raise WaveSpeedUnavailable("WaveSpeed answered HTTP 500: history is down")


def history_down(pipeline: Pipeline) -> Pipeline:
    settings = pipeline.settings
    key = settings.wavespeed_api_key.get_secret_value()
    return replace(
        pipeline, wavespeed=FailingHistory(pipeline.http, settings.wavespeed_base_url, key)
    )


class InputlessHistory(WaveSpeedClient):
    """WaveSpeed's history as its documentation shows it: items without their `input`."""

    def history(self, **kwargs: Any) -> list[Any]:
        return [replace(p, input={}) for p in super().history(**kwargs)]


def test_a_history_that_hides_inputs_proves_nothing_missing(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    """An unanswered submit whose prediction WaveSpeed did create: a history without inputs
    cannot say which item is ours, so the job is never resubmitted (paid twice) on it."""
    settings = pipeline.settings
    key = settings.wavespeed_api_key.get_secret_value()
    blind = replace(
        pipeline, wavespeed=InputlessHistory(pipeline.http, settings.wavespeed_base_url, key)
    )
    job_id = new_job(blind, portrait)
    simulator.set_faults(submit_drop_after_create=1.0)
    submit(blind, job_id)
    simulator.reset_faults()
    rewind(blind, job_id, in_flight(blind) + 1, "last_submit_at")  # every lookup can count
    for _ in range(3):
        blind.recover(job_id, 1)
    job = status(blind, job_id)
    assert job.status == JobState.SUBMITTING and job.recover_misses == 0
    assert job.step_failures == 3 and len(ours(simulator, job_id)) == 1


def test_while_history_fails_lookups_back_off_one_chain_and_no_resubmit(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    down = history_down(pipeline)
    job_id = claimed_but_never_posted(down, portrait)
    rewind(down, job_id, 10 * in_flight(down), "last_submit_at")
    delays = []
    for failures in range(1, 5):
        down.recover(job_id, 1)
        job = status(down, job_id)
        assert job.status == JobState.SUBMITTING and job.step_failures == failures
        ((task, _, countdown, kwargs),) = dispatcher.take()
        assert (task, kwargs) == (dispatch.RECOVER, {"attempt": 1})
        delays.append(countdown)
    assert delays == sorted(delays) and delays[-1] > delays[0]  # backing off
    # The chain's next lookup is scheduled, so the reconciler starts no second chain.
    assert reconcile(down)["submitting"] == 0
    with down.sessions() as session:
        reasons = [e.reason or "" for e in jobs.events(session, job_id)]
    assert sum("history lookup" in r for r in reasons) == 4  # every failure is on record


def test_a_submit_history_cannot_settle_fails_as_unconfirmed_at_its_deadline(
    pipeline: Pipeline, portrait: bytes
) -> None:
    down = history_down(pipeline)
    job_id = claimed_but_never_posted(down, portrait)
    rewind(down, job_id, down.settings.recover_deadline_seconds + 1, "last_submit_at")
    down.recover(job_id, 1)
    job = status(down, job_id)
    assert job.status == JobState.FAILED and job.error_code == "submit_unconfirmed"
    assert "may be charged" in (job.error_message or "")
