"""Steps of the pipeline driven by a test, one at a time, through a recording dispatcher."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from tests.support import RecordingDispatcher, wait_for
from workers import dispatch, jobs, tenants
from workers.db import unit_of_work
from workers.intake import GenerationInput, create_job
from workers.models import Job, Tenant
from workers.pipeline import Pipeline
from workers.states import JobState


def new_job(pipeline: Pipeline, image: bytes, **overrides: Any) -> uuid.UUID:
    request = GenerationInput(
        prompt=overrides.pop("prompt", "slow push-in, hair moving in the wind"),
        guidance_scale=0.5,
        duration=overrides.pop("duration", 5),
        image_url="https://example.com/portrait.png",
        **overrides,
    )
    with unit_of_work(pipeline.sessions) as session:
        owner = session.scalar(select(Tenant).where(Tenant.name == "flow"))
        owner = owner or tenants.create_tenant(session, "flow", pipeline.sealer)
    settings = pipeline.settings
    return create_job(pipeline.sessions, pipeline.storage, settings, owner, request, image).id


def submit(pipeline: Pipeline, job_id: uuid.UUID) -> None:
    """The job's own submit message arrives: the gate admits it and the same task submits
    it, without sending it a second message."""
    pipeline.submit(job_id)
    dispatcher = pipeline.dispatch
    assert isinstance(dispatcher, RecordingDispatcher)
    again = [j for t, j, countdown, _ in dispatcher.sent if t == dispatch.SUBMIT and not countdown]
    assert job_id not in again


def submitted(pipeline: Pipeline, image: bytes) -> tuple[uuid.UUID, str]:
    """A new job, submitted, its messages so far consumed: its id and its prediction's."""
    job_id = new_job(pipeline, image)
    submit(pipeline, job_id)
    prediction_id = status(pipeline, job_id).prediction_id
    assert prediction_id
    dispatcher = pipeline.dispatch
    assert isinstance(dispatcher, RecordingDispatcher)
    dispatcher.take()
    return job_id, prediction_id


def status(pipeline: Pipeline, job_id: uuid.UUID) -> Job:
    with pipeline.sessions() as session:
        return jobs.get(session, job_id)


def poll_until_left_processing(pipeline: Pipeline, job_id: uuid.UUID) -> Job:
    def step() -> Job | None:
        pipeline.poll(job_id)
        job = status(pipeline, job_id)
        return job if job.status != JobState.PROCESSING else None

    return wait_for(step, timeout=60, interval=0.3)


def age(pipeline: Pipeline, job_id: object, seconds: float, *columns: str) -> None:
    """Pretend the job's clocks (updated_at, and the named columns) are `seconds` old."""
    then = pipeline.clock() - timedelta(seconds=seconds)
    values = {name: then for name in ("updated_at", *columns)}
    with unit_of_work(pipeline.sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
