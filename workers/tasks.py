"""Celery tasks: thin wrappers that hand a job id to one pipeline method.

Tasks take ids only, reload the row, and do nothing when it is not in the state they expect.
"""

from __future__ import annotations

import os
import uuid
from functools import partial
from typing import Any

import kombu.exceptions
import sqlalchemy.exc
from celery import Task, signals

from config import Settings
from workers import dispatch
from workers.celery_app import app
from workers.errors import ErrorCode
from workers.pipeline import OutputIncomplete, Pipeline, backoff
from workers.reconciler import reconcile
from workers.runtime import build_pipeline
from workers.states import JobState

_pipeline: tuple[int, Pipeline] | None = None

# Postgres restarting or the broker away for a moment: the task is idempotent, run it again.
INFRA_ERRORS = (sqlalchemy.exc.OperationalError, kombu.exceptions.OperationalError)
task = partial(
    app.task, autoretry_for=INFRA_ERRORS, retry_backoff=1, retry_backoff_max=30, max_retries=20
)

STORE_MAX_RETRIES = 5


def pipeline() -> Pipeline:
    """The process's pipeline, built once per process after fork (engines and clients must not
    cross a prefork boundary)."""
    global _pipeline
    if _pipeline is None or _pipeline[0] != os.getpid():
        _pipeline = (os.getpid(), build_pipeline(Settings(), app))
    return _pipeline[1]


@signals.worker_process_init.connect
def _build_pipeline(**_: Any) -> None:
    # Engines, TLS contexts and the boto3 client take a few hundred milliseconds to build:
    # pay that when the pool process starts, not inside the first task it runs.
    pipeline()


@task(name=dispatch.SUBMIT)
def submit(job_id: str) -> None:
    """POST a queued job to WaveSpeed, once."""
    pipeline().submit(uuid.UUID(job_id))


@task(name=dispatch.RECOVER)
def recover(job_id: str) -> None:
    """Settle a submit that got no answer, through WaveSpeed's history."""
    pipeline().recover(uuid.UUID(job_id))


@task(name=dispatch.POLL)
def poll(job_id: str, seq: int | None = None) -> None:
    """Check a prediction once; reschedules itself with a countdown, never sleeps."""
    pipeline().poll(uuid.UUID(job_id), seq)


@task(name=dispatch.STORE, bind=True)
def store(self: Task, job_id: str) -> None:
    """Copy the finished video into S3; a broken download is retried, then fails the job."""
    service = pipeline()
    try:
        service.store(uuid.UUID(job_id))
    except OutputIncomplete as exc:
        if self.request.retries >= STORE_MAX_RETRIES:
            service.fail(uuid.UUID(job_id), JobState.STORING, ErrorCode.STORAGE_FAILED, str(exc))
            return
        settings = service.settings
        delay = backoff(
            self.request.retries + 1, settings.retry_base_seconds, settings.retry_max_seconds
        )
        raise self.retry(exc=exc, countdown=delay, max_retries=STORE_MAX_RETRIES) from exc


@task(name=dispatch.NOTIFY)
def notify(delivery_id: str) -> None:
    """Make a due callback attempt to the producer."""
    pipeline().notify(uuid.UUID(delivery_id))


@task(name=dispatch.RECONCILE)
def reconcile_task() -> dict[str, int]:
    """Resend whatever work lost its message."""
    return reconcile(pipeline())
