"""Deleting on a real Postgres, S3 and simulator: one ended job leaves a tombstone whose facts
still add up, a tenant's retention deletes its old jobs in the reconciler, and a purge removes
everything of a tenant."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from tests.integration.flow import new_job, poll_until_left_processing, status, submitted
from tests.support import RecordingDispatcher, SimulatorAdmin
from workers import retention, tenants
from workers.db import unit_of_work
from workers.models import Job, Tenant, TenantEvent, Upload
from workers.pipeline import Pipeline, video_key
from workers.reconciler import reconcile
from workers.representation import Generation
from workers.states import JobState

pytestmark = pytest.mark.integration

HOOK = "https://hooks.example.com/kling"


def completed(pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin) -> uuid.UUID:
    simulator.set_faults(inference_seconds=[0, 0])
    job_id, _ = submitted(pipeline, portrait)
    with unit_of_work(pipeline.sessions) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(webhook_url=HOOK, metadata_={"order": "A-1"})
        )
    poll_until_left_processing(pipeline, job_id)
    pipeline.store(job_id)
    assert status(pipeline, job_id).status == JobState.COMPLETED
    return job_id


def test_a_deleted_job_leaves_a_tombstone_and_its_prediction_is_deleted_upstream(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin, dispatcher: RecordingDispatcher
) -> None:
    job_id = completed(pipeline, portrait, simulator)
    with unit_of_work(pipeline.sessions) as session:  # as INPUT_HOSTING=wavespeed leaves it
        hosted = "https://cdn.example/media/images/1764761316371833793_r5ZX531Z.png"
        session.execute(update(Job).where(Job.id == job_id).values(hosted_input_url=hosted))
    before = status(pipeline, job_id)
    assert pipeline.storage.head(video_key(job_id)) and pipeline.storage.head(before.input_key)
    tomb = retention.delete_job(pipeline, job_id)
    assert tomb.deleted_at is not None and tomb.status == JobState.COMPLETED
    assert (tomb.prompt, tomb.image_url, tomb.metadata_, tomb.s3_key) == ("", None, {}, None)
    assert tomb.hosted_input_url is None  # a public URL of the tenant's image
    assert (tomb.cost_usd, tomb.charged, tomb.sha256) == (before.cost_usd, True, before.sha256)
    assert pipeline.storage.head(video_key(job_id)) is None
    assert pipeline.storage.head(before.input_key) is None
    assert Generation.of(tomb).video is None
    with pipeline.sessions() as session:
        payloads = session.scalars(
            select(TenantEvent.payload).where(TenantEvent.job_id == job_id)
        ).all()
    kept = {"type", "timestamp"}
    assert payloads and all(
        p == {**{k: p[k] for k in kept}, "data": {"id": str(job_id)}} for p in payloads
    )
    pipeline.withdraw(job_id)  # the reconciler's sweep sends it for a deleted job
    assert simulator.prediction(str(before.prediction_id))["status"] == "deleted"
    assert status(pipeline, job_id).charged is True  # completed before: it stays paid for
    assert retention.delete_job(pipeline, job_id).deleted_at == tomb.deleted_at  # once


def test_a_running_job_is_not_deleted(pipeline: Pipeline, portrait: bytes) -> None:
    job_id = new_job(pipeline, portrait)
    with pytest.raises(retention.StillRunning):
        retention.delete_job(pipeline, job_id)
    assert pipeline.storage.head(status(pipeline, job_id).input_key) is not None


def test_a_tenants_retention_deletes_its_old_jobs_in_the_reconciler(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    old, recent = new_job(pipeline, portrait), new_job(pipeline, portrait)
    for job_id in (old, recent):
        pipeline.cancel(job_id)
    with unit_of_work(pipeline.sessions) as session:
        session.execute(
            update(Job)
            .where(Job.id == old)
            .values(completed_at=datetime.now(UTC) - timedelta(days=3))
        )
        session.execute(update(Tenant).where(Tenant.name == "flow").values(retain_days=2))
    assert reconcile(pipeline)["deleted"] == 1
    assert status(pipeline, old).deleted_at is not None
    assert status(pipeline, recent).deleted_at is None
    assert reconcile(pipeline)["deleted"] == 0


def test_a_purge_removes_everything_of_a_tenant_and_says_what(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    job_id = completed(pipeline, portrait, simulator)
    with pipeline.sessions() as session:
        owner = session.scalars(select(Tenant).where(Tenant.name == "flow")).one()
    running = new_job(pipeline, portrait)
    with pytest.raises(retention.StillRunning):
        retention.purge(pipeline, owner)
    pipeline.cancel(running)
    with unit_of_work(pipeline.sessions) as session:
        tenants.create_key(session, session.get_one(Tenant, owner.id))
    input_key = status(pipeline, job_id).input_key
    report = retention.purge(pipeline, owner)
    assert (report.jobs, report.keys, report.predictions_deleted) == (2, 1, 1)
    assert report.objects >= 3  # two inputs and a video
    assert (
        pipeline.storage.head(input_key) is None
        and pipeline.storage.head(video_key(job_id)) is None
    )
    with pipeline.sessions() as session:
        assert session.get(Tenant, owner.id) is None
        assert session.scalar(select(func.count()).where(Job.tenant_id == owner.id)) == 0
        assert session.scalar(select(func.count()).where(Upload.tenant_id == owner.id)) == 0


def test_a_purge_waits_for_a_prediction_still_to_delete(
    pipeline: Pipeline, portrait: bytes
) -> None:
    job_id = new_job(pipeline, portrait)
    pipeline.cancel(job_id)
    with unit_of_work(pipeline.sessions) as session:  # as if stopped while its POST ran
        session.execute(update(Job).where(Job.id == job_id).values(due_at=func.now()))
        owner = session.scalars(select(Tenant).where(Tenant.name == "flow")).one()
        tenants.create_key(session, owner)
    with pytest.raises(retention.StillRunning, match="prediction to delete"):
        retention.purge(pipeline, owner)
    with pipeline.sessions() as session:  # nothing was removed, its keys included
        assert session.get(Tenant, owner.id) is not None
        assert tenants.list_keys(session, owner)
    assert pipeline.storage.head(status(pipeline, job_id).input_key) is not None


def test_a_restore_after_the_deadline_keeps_the_paid_output(
    pipeline: Pipeline, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    job_id = completed(pipeline, portrait, simulator)
    with unit_of_work(pipeline.sessions) as session:  # its store failed for good, late
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status="failed",
                error_code="storage_failed",
                s3_key=None,
                deadline_at=datetime.now(UTC) - timedelta(minutes=1),
            )
        )
    assert pipeline.restore(job_id)
    assert pipeline.expire_due() == 0  # asked for now: its deadline no longer applies
    pipeline.store(job_id)
    assert status(pipeline, job_id).status == JobState.COMPLETED
