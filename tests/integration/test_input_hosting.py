"""`INPUT_HOSTING=wavespeed`: each submit uploads its input image through WaveSpeed's media
upload, named `<job_id>-<attempt>.<ext>`, and gives the prediction that upload's URL; an
upload that fails is retried like a submit turned away (nothing was created), and an
unanswered submit is still found in WaveSpeed's history by the uploaded name."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import update

from tests.integration.flow import new_job, poll_until_left_processing, status, submit
from tests.support import SimulatorAdmin
from workers import jobs
from workers.db import unit_of_work
from workers.models import Job
from workers.pipeline import Pipeline
from workers.states import JobState

pytestmark = pytest.mark.integration


def hosting_on_wavespeed(pipeline: Pipeline, **settings: Any) -> Pipeline:
    update = {"input_hosting": "wavespeed", **settings}
    return replace(pipeline, settings=pipeline.settings.model_copy(update=update))


@pytest.fixture
def hosted(pipeline: Pipeline) -> Pipeline:
    return hosting_on_wavespeed(pipeline)


def uploads(simulator: SimulatorAdmin, job_id: uuid.UUID) -> list[dict[str, Any]]:
    """The files uploaded for this job, oldest first."""
    return [u for u in simulator.ledger()["uploads"] if u["filename"].startswith(str(job_id))]


def ours(simulator: SimulatorAdmin, job_id: uuid.UUID) -> list[dict[str, Any]]:
    """The predictions WaveSpeed charged for this job (the image URL names it)."""
    return [p for p in simulator.ledger()["predictions"] if str(job_id) in p["input"]["image"]]


def retry_now(pipeline: Pipeline, job_id: uuid.UUID) -> None:
    """The requeued job's backoff is over: the gate admits it and its submit arrives."""
    with unit_of_work(pipeline.sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(not_before=None))
    pipeline.admit()
    pipeline.submit(job_id)


def test_a_job_completes_from_an_upload_named_for_its_job_and_attempt(
    hosted: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    job_id = new_job(hosted, portrait)
    submit(hosted, job_id)
    job = status(hosted, job_id)
    assert job.status == JobState.PROCESSING
    ((upload,),) = [uploads(simulator, job_id)]
    name = f"{job_id}-1.png"
    assert (upload["filename"], upload["content_type"]) == (name, "image/png")
    assert upload["bytes"] == len(portrait)
    # The prediction reads the upload (its URL does not keep the name: a fragment carries it),
    # not a presigned URL of our S3.
    ((prediction,),) = [ours(simulator, job_id)]
    assert prediction["id"] == job.prediction_id
    assert prediction["input"]["image"] == f"{simulator.base_url}{upload['path']}#/{name}"
    job = poll_until_left_processing(hosted, job_id)
    assert job.status == JobState.STORING, job.error_message
    hosted.store(job_id)
    assert status(hosted, job_id).status == JobState.COMPLETED


def test_an_upload_500_is_retried_and_the_job_completes_paid_once(
    hosted: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    job_id = new_job(hosted, portrait)
    simulator.set_faults(upload_500=1.0)
    submit(hosted, job_id)
    job = status(hosted, job_id)
    assert job.status == JobState.QUEUED and job.submit_attempts == 1
    assert ours(simulator, job_id) == [] and uploads(simulator, job_id) == []
    with hosted.sessions() as session:
        reason = jobs.events(session, job_id)[-1].reason or ""
    assert "media upload" in reason and "500" in reason  # on record in Postgres
    simulator.reset_faults()
    retry_now(hosted, job_id)
    job = status(hosted, job_id)
    assert job.status == JobState.PROCESSING and job.submit_attempts == 2
    assert [u["filename"] for u in uploads(simulator, job_id)] == [f"{job_id}-2.png"]
    assert poll_until_left_processing(hosted, job_id).status == JobState.STORING
    hosted.store(job_id)
    assert status(hosted, job_id).status == JobState.COMPLETED
    assert len(ours(simulator, job_id)) == 1


def test_uploads_that_keep_failing_end_the_job_uncharged_at_the_attempts_cap(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    capped = hosting_on_wavespeed(pipeline, submit_max_attempts=1)
    job_id = new_job(capped, portrait)
    simulator.set_faults(upload_500=1.0)
    submit(capped, job_id)
    job = status(capped, job_id)
    assert job.status == JobState.FAILED and job.error_code == "upstream_unavailable"
    assert job.charged is False and ours(simulator, job_id) == []


def test_an_unanswered_submit_is_adopted_by_its_upload_url_when_wavespeed_drops_the_name(
    hosted: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    """WaveSpeed's docs do not say whether a prediction keeps the fragment of its image URL,
    where the uploaded name travels. If it drops it, the URL WaveSpeed gave the upload,
    recorded before the POST, still finds the prediction: adopted, not paid for again."""
    job_id = new_job(hosted, portrait)
    simulator.set_faults(input_fragment_dropped=True, submit_drop_after_create=1.0)
    submit(hosted, job_id)
    assert status(hosted, job_id).status == JobState.SUBMITTING
    simulator.set_faults(input_fragment_dropped=True)

    def made() -> list[dict[str, Any]]:
        paths = [upload["path"] for upload in uploads(simulator, job_id)]
        predictions = simulator.ledger()["predictions"]
        return [p for p in predictions if any(path in p["input"]["image"] for path in paths)]

    (prediction,) = made()
    assert "#" not in prediction["input"]["image"]
    hosted.recover(job_id, 1)
    job = status(hosted, job_id)
    assert job.status == JobState.PROCESSING and job.prediction_id == prediction["id"]
    assert made() == [prediction]


def test_an_unanswered_submit_is_adopted_from_history_by_its_uploaded_name(
    hosted: Pipeline, pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    """Attempt 1 ran and failed retryably; attempt 2 is created but its answer is lost. The
    lookup adopts attempt 2's prediction, never attempt 1's, even once INPUT_HOSTING is
    back to s3 (the lookup looks for both ways of naming an attempt)."""
    job_id = new_job(hosted, portrait)
    submit(hosted, job_id)
    first = status(hosted, job_id).prediction_id
    assert first
    failure = {"id": first, "status": "failed", "code": 5000, "error": "internal"}
    assert hosted.take_webhook(first, failure)
    simulator.set_faults(submit_drop_after_create=1.0)
    retry_now(hosted, job_id)
    assert status(hosted, job_id).status == JobState.SUBMITTING
    simulator.reset_faults()
    pipeline.recover(job_id, 2)
    job = status(pipeline, job_id)
    charged = ours(simulator, job_id)
    assert len(charged) == 2 and job.status == JobState.PROCESSING
    adopted = next(p for p in charged if p["id"] == job.prediction_id)
    assert job.prediction_id != first
    assert adopted["input"]["image"].endswith(f"#/{job_id}-2.png")
