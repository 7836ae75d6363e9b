"""Deleting what a tenant no longer wants kept: one job (`DELETE /v1/generations/{id}`), the
jobs past the tenant's retention (the reconciler, `tenants.retain_days`), or everything of a
tenant (`kling tenants purge`).

A deleted job stays as a tombstone. `deleted_at` is set, its input image and video are removed
from S3, its prompt, image URL and metadata are cleared, its callbacks keep only the job's id,
and its prediction is deleted at WaveSpeed (by the withdraw task, which also settles
`charged`). Its state, cost, `charged`, timestamps and history stay, so spend and the ledger
still add up. The objects go first, outside any transaction: S3's delete is idempotent, so a
delete that fails half-way is simply asked for again.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import case, delete, func, select, text, update
from sqlalchemy.orm import Session

from workers import callbacks, jobs
from workers.db import unit_of_work
from workers.models import ApiKey, Job, Tenant, Upload
from workers.states import LIVE, TERMINAL, JobState
from workers.storage import StorageError

if TYPE_CHECKING:
    from workers.pipeline import Pipeline

log = structlog.get_logger(__name__)

# WaveSpeed's delete takes a list of ids; this many per call.
PREDICTIONS_PER_DELETE = 100


def _refuse_if_busy(session: Session, tenant: Tenant) -> None:
    """Under the tenant's lock (the one creates take), refuse while a job of the tenant runs,
    or has a prediction still to delete (a submit stopped before its answer came)."""
    session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": tenant.id})
    busy = session.scalar(
        select(func.count()).where(
            Job.tenant_id == tenant.id, Job.status.in_(LIVE) | Job.due_at.is_not(None)
        )
    )
    if busy:
        raise StillRunning(f"{busy} jobs of {tenant.name} still run or have a prediction to delete")


class StillRunning(Exception):
    """Only an ended job (or a tenant with no live job) is deleted: cancel it first."""


def delete_job(pipeline: Pipeline, job_id: uuid.UUID) -> Job:
    """Delete an ended job's inputs and video and leave its tombstone; answers it. Deleting
    a tombstone again changes nothing."""
    with pipeline.sessions() as session:
        job = jobs.get(session, job_id)
    if not JobState(job.status).terminal:
        raise StillRunning(str(job_id))
    if job.deleted_at is None:
        for key in _objects(job):
            pipeline.storage.delete(key)
        with unit_of_work(pipeline.sessions) as session:
            if not _tombstone(session, job):  # restored meanwhile: it runs again
                raise StillRunning(str(job_id))
    with pipeline.sessions() as session:
        return jobs.get(session, job_id)


def _objects(job: Job) -> list[str]:
    from workers.pipeline import attempt_key

    keys = [attempt_key(job, n) for n in range(1, max(1, job.submit_attempts) + 1)]
    return keys + ([job.s3_key] if job.s3_key else [])


def _tombstone(session: Session, job: Job) -> bool:
    """Clear an ended job's inputs, if it is still the ended job that was read."""
    done = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.deleted_at.is_(None), Job.status == job.status)
        .values(
            deleted_at=func.now(), prompt="", negative_prompt=None, image_url=None,
            metadata_={}, s3_key=None, s3_bucket=None, output_url=None, hosted_input_url=None,
            updated_at=func.now(),
            # Its prediction is deleted at WaveSpeed next (`Pipeline.withdraw`).
            due_at=case((Job.prediction_id.is_not(None), func.now()), else_=None),
        )
        .returning(Job.id)
    ).first()  # fmt: skip
    if done is None:
        return False
    callbacks.forget(session, job.id)
    jobs.note(session, job.id, "deleted: its inputs and video removed")
    return True


def expired_jobs(session: Session, limit: int) -> list[Job]:
    """Ended jobs kept past their tenant's retention, oldest first."""
    cutoff = func.now() - func.make_interval(0, 0, 0, Tenant.retain_days)
    return list(
        session.scalars(
            select(Job)
            .join(Tenant, Tenant.id == Job.tenant_id)
            .where(
                Tenant.retain_days.is_not(None), Job.deleted_at.is_(None),
                Job.status.in_(sorted(TERMINAL)), Job.completed_at < cutoff,
            )
            .order_by(Job.completed_at)
            .limit(limit)
        )
    )  # fmt: skip


def sweep(pipeline: Pipeline, limit: int = 50) -> int:
    """Delete up to `limit` jobs past their tenant's retention; answers how many. S3 being
    away ends the sweep: the next tick tries again."""
    with pipeline.sessions() as session:
        due = expired_jobs(session, limit)
    deleted = 0
    for job in due:
        try:
            delete_job(pipeline, job.id)
        except StorageError as exc:
            log.warning("retention.s3_failed", job_id=str(job.id), error=str(exc))
            break
        except (StillRunning, jobs.JobNotFound):
            continue  # restored, or purged, since it was read
        deleted += 1
    return deleted


@dataclass
class Purged:
    jobs: int = 0
    objects: int = 0
    uploads: int = 0
    keys: int = 0
    predictions_deleted: int = 0


def purge(pipeline: Pipeline, tenant: Tenant) -> Purged:
    """Remove everything of a tenant, for account deletion: its keys first (so it makes
    nothing new meanwhile), its objects in S3, its predictions at WaveSpeed, then every row
    of it. Refused while a job of it still runs or still has a prediction to delete."""
    with unit_of_work(pipeline.sessions) as session:
        _refuse_if_busy(session, tenant)
        keys = delete(ApiKey).where(ApiKey.tenant_id == tenant.id).returning(ApiKey.id)
        report = Purged(keys=len(session.scalars(keys).all()))
    with pipeline.sessions() as session:
        owned = list(session.scalars(select(Job).where(Job.tenant_id == tenant.id)))
        uploads = list(session.scalars(select(Upload.key).where(Upload.tenant_id == tenant.id)))
    report.jobs, report.uploads = len(owned), len(uploads)
    for key in [k for job in owned for k in _objects(job)] + uploads:
        pipeline.storage.delete(key)
        report.objects += 1
    predictions = [job.prediction_id for job in owned if job.prediction_id]
    for start in range(0, len(predictions), PREDICTIONS_PER_DELETE):
        chunk = predictions[start : start + PREDICTIONS_PER_DELETE]
        report.predictions_deleted += pipeline.wavespeed.delete(chunk)
    with unit_of_work(pipeline.sessions) as session:
        _refuse_if_busy(session, tenant)  # a submit answered meanwhile, say
        session.execute(delete(Job).where(Job.tenant_id == tenant.id))
        session.execute(delete(Tenant).where(Tenant.id == tenant.id))
    log.info("tenant.purged", tenant_id=tenant.id, **vars(report))
    return report
