"""Celery tasks: thin wrappers that hand a job id to one pipeline method.

Tasks take ids only, reload the row, and do nothing when it is not in the state they expect.
Every task for a job or delivery runs inside `GuardedTask`, which puts a message aside that
keeps killing its worker (`workers.poison`).
"""

from __future__ import annotations

import os
import uuid
from functools import partial
from typing import Any

import kombu.exceptions
import redis
import sqlalchemy.exc
from celery import Task, signals

from config import Settings
from workers import bulk as workers_bulk
from workers import dispatch, jobs, quarantine
from workers.celery_app import app
from workers.db import unit_of_work
from workers.pipeline import Pipeline
from workers.poison import RunCounter, subject_of
from workers.reconciler import reconcile
from workers.runtime import build_callbacks, build_pipeline, build_replies


class Runtime:
    """What a worker process builds once, after fork: engines and clients must not cross a
    prefork boundary."""

    def __init__(self, settings: Settings) -> None:
        self.pid = os.getpid()
        self.pipeline = build_pipeline(settings, app)
        self.callbacks = build_callbacks(self.pipeline)
        self.replies = build_replies(self.pipeline)
        broker = redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.broker_timeout_seconds,
            socket_connect_timeout=settings.broker_timeout_seconds,
        )
        self.runs = RunCounter(broker, settings.poison_max_deliveries)


_runtime: Runtime | None = None


def runtime() -> Runtime:
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        _runtime = Runtime(Settings())
    return _runtime


def pipeline() -> Pipeline:
    """The process's pipeline."""
    return runtime().pipeline


@signals.worker_process_init.connect
def _build_runtime(**_: Any) -> None:
    # Engines, TLS contexts and the boto3 client take a few hundred milliseconds to build:
    # pay that when the pool process starts, not inside the first task it runs.
    runtime()


class GuardedTask(Task):
    """Counts the runs of a task for one job or delivery; one whose worker died too often
    in a row is put aside for an operator instead of being run again."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        subject = subject_of(args)
        if subject is None:
            return super().__call__(*args, **kwargs)
        runs = runtime().runs
        begun = runs.begin(self.name, str(subject))
        if runs.poisoned(begun):
            _put_aside(self.name, subject, begun - 1)
            return None
        try:
            return super().__call__(*args, **kwargs)
        finally:
            runs.end(self.name, str(subject))


def _put_aside(task_name: str, subject: uuid.UUID, deaths: int) -> None:
    reason = f"its worker died {deaths} times in a row while running it"
    with unit_of_work(pipeline().sessions) as session:
        if quarantine.put_aside(session, task_name, subject, reason, deaths):
            # The job's history says so (a delivery id matches no job: nothing to note).
            jobs.note(session, subject, f"{task_name} put aside: {reason}")


# Postgres restarting or the broker away for a moment: the task is idempotent, run it again.
INFRA_ERRORS = (sqlalchemy.exc.OperationalError, kombu.exceptions.OperationalError)
task = partial(
    app.task, base=GuardedTask, autoretry_for=INFRA_ERRORS, retry_backoff=1,
    retry_backoff_max=30, max_retries=20,
)  # fmt: skip


@task(name=dispatch.SUBMIT)
def submit(job_id: str, outbox: int | None = None) -> None:
    """POST a queued job to WaveSpeed, once (`outbox`: the row that announced it)."""
    pipeline().submit(uuid.UUID(job_id), outbox)


@task(name=dispatch.RECOVER)
def recover(job_id: str, attempt: int | None = None) -> None:
    """Settle submit `attempt` that got no answer, through WaveSpeed's history."""
    pipeline().recover(uuid.UUID(job_id), attempt)


@task(name=dispatch.POLL)
def poll(job_id: str, seq: int | None = None) -> None:
    """Check a prediction once; reschedules itself with a countdown, never sleeps."""
    pipeline().poll(uuid.UUID(job_id), seq)


@task(name=dispatch.STORE)
def store(job_id: str) -> None:
    """Copy the finished video into S3; a failed try is retried by the reconciler."""
    pipeline().store(uuid.UUID(job_id))


@task(name=dispatch.WITHDRAW)
def withdraw(job_id: str) -> None:
    """Delete a stopped job's prediction at WaveSpeed; a failed try is retried by the
    reconciler."""
    pipeline().withdraw(uuid.UUID(job_id))


@task(name=dispatch.NOTIFY)
def notify(delivery_id: str) -> None:
    """Make a due callback attempt to the producer."""
    runtime().callbacks.deliver(uuid.UUID(delivery_id))


@task(name=dispatch.REPLY)
def reply(reply_id: str) -> None:
    """Publish an event as the producer's own task (`workers.replies`)."""
    runtime().replies.send(uuid.UUID(reply_id))


@task(name=dispatch.BULK)
def bulk(action_id: str) -> None:
    """Work through a tenant's bulk action (`workers.bulk`)."""
    workers_bulk.run(pipeline(), uuid.UUID(action_id))


@task(name=dispatch.RECONCILE)
def reconcile_task() -> dict[str, int]:
    """Resend whatever work lost its message."""
    return reconcile(pipeline())
