"""Queries on the job aggregate: creation, conditional transitions, reads. The only place
that writes `jobs`, `job_events` and `outbox`."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from workers import metrics
from workers.models import (
    Job,
    JobEvent,
    OutboxMessage,
    WaveSpeedWebhook,
    WebhookAttempt,
    WebhookDelivery,
)
from workers.states import JobState, can_transition


class JobNotFound(LookupError):
    """A task or request named a job id that is not in the database."""


def get(session: Session, job_id: uuid.UUID) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise JobNotFound(str(job_id))
    return job


def create(session: Session, job: Job, *, first_task: str) -> Job:
    """Insert a queued job, its first event and the outbox row of its first task, unflushed
    into the caller's transaction so all three commit (or vanish) together."""
    job.status = JobState.QUEUED
    session.add(job)
    session.flush()
    session.add(
        JobEvent(job_id=job.id, from_state=None, to_state=JobState.QUEUED, reason="accepted")
    )
    session.add(OutboxMessage(task=first_task, job_id=job.id))
    session.flush()
    metrics.TRANSITIONS.labels(JobState.QUEUED).inc()
    return job


def transition(
    session: Session,
    job_id: uuid.UUID,
    src: JobState | Sequence[JobState],
    dst: JobState,
    *,
    reason: str,
    when: ColumnElement[bool] | None = None,
    **values: Any,
) -> bool:
    """Move a job from `src` to `dst` if, and only if, it is still in `src` (and `when` holds).

    One conditional UPDATE: of two workers racing on the same job exactly one wins, and a
    duplicate or late message finds the row elsewhere and changes nothing.
    """
    sources = [src] if isinstance(src, JobState) else list(src)
    assert all(can_transition(s, dst) for s in sources), (sources, dst)
    # Lock the row and read its current state in the same statement, so the event records
    # the state the job really left.
    locked = select(Job.id, Job.status).where(Job.id == job_id)
    if when is not None:
        locked = locked.where(when)
    old = locked.with_for_update().subquery()
    row = session.execute(
        update(Job)
        .where(Job.id == old.c.id, old.c.status.in_(sources))
        .values(status=dst, updated_at=func.now(), **values)
        .returning(old.c.status)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return False
    session.execute(
        insert(JobEvent).values(job_id=job_id, from_state=row[0], to_state=dst, reason=reason)
    )
    metrics.TRANSITIONS.labels(dst).inc()
    return True


def update_fields(session: Session, job_id: uuid.UUID, state: JobState, **values: Any) -> bool:
    """Change fields of a job that is still in `state`, without a transition."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == state)
        .values(updated_at=func.now(), **values)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).first()
    return result is not None


def enqueue(session: Session, job_id: uuid.UUID, task: str) -> None:
    """Record a task to publish once the surrounding transaction commits."""
    session.add(OutboxMessage(task=task, job_id=job_id))


def events(session: Session, job_id: uuid.UUID) -> Sequence[JobEvent]:
    return session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
    ).all()


def unpublished(
    session: Session,
    *,
    older_than: datetime | None = None,
    job_id: uuid.UUID | None = None,
    limit: int = 500,
) -> Sequence[OutboxMessage]:
    """Outbox rows nobody published, claimed so that concurrent relays skip each other's."""
    conditions: list[ColumnElement[bool]] = [OutboxMessage.published_at.is_(None)]
    if older_than is not None:
        conditions.append(OutboxMessage.created_at <= older_than)
    if job_id is not None:
        conditions.append(OutboxMessage.job_id == job_id)
    return session.scalars(
        select(OutboxMessage)
        .where(*conditions)
        .order_by(OutboxMessage.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()


def claim_poll(session: Session, job_id: uuid.UUID, seq: int | None) -> Job | None:
    """Take the poll chain of a processing job: bump `poll_seq` if the caller's `seq` is
    current (or `None`, which takes over from any chain). Answers the row, or None when the
    job moved on or another chain owns it."""
    condition: list[ColumnElement[bool]] = [Job.id == job_id, Job.status == JobState.PROCESSING]
    if seq is not None:
        condition.append(Job.poll_seq == seq)
    return session.scalars(
        update(Job)
        .where(*condition)
        .values(poll_seq=Job.poll_seq + 1, updated_at=func.now())
        .returning(Job)
        .execution_options(synchronize_session=False, populate_existing=True)
    ).first()


def by_prediction(session: Session, prediction_id: str) -> Job | None:
    return session.scalars(select(Job).where(Job.prediction_id == prediction_id)).first()


def overdue(
    session: Session, state: JobState, column: Any, before: datetime, limit: int = 500
) -> Sequence[uuid.UUID]:
    """Ids of jobs in `state` whose `column` and last touch are both older than `before`,
    skipping rows another reconciler holds."""
    return session.scalars(
        select(Job.id)
        .where(Job.status == state, column < before, Job.updated_at < before)
        .order_by(column)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()


def set_next_poll(session: Session, job_id: uuid.UUID, seq: int, at: datetime) -> bool:
    """Record when the chain `seq` checks next; False if the job moved on or the chain died."""
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobState.PROCESSING, Job.poll_seq == seq)
        .values(next_poll_at=at, updated_at=func.now())
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).first()
    return row is not None


def touch(session: Session, job_ids: Sequence[uuid.UUID]) -> None:
    """Mark jobs as just looked at, so a sweep does not resend the same work every tick."""
    if job_ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(job_ids))
            .values(updated_at=func.now())
            .execution_options(synchronize_session=False)
        )


def first_delivery(session: Session, webhook_id: str) -> bool:
    """Record a WaveSpeed webhook id; False if it was delivered before."""
    row = session.execute(
        pg_insert(WaveSpeedWebhook)
        .values(id=webhook_id)
        .on_conflict_do_nothing()
        .returning(WaveSpeedWebhook.id)
    ).first()
    return row is not None


def forget_delivery(session: Session, webhook_id: str) -> None:
    """Undo `first_delivery` for a webhook that could not be taken, so its retry is."""
    session.execute(delete(WaveSpeedWebhook).where(WaveSpeedWebhook.id == webhook_id))


@dataclass(frozen=True)
class Cursor:
    """Where a page of the list ended: newest first, so stable while new jobs arrive."""

    created_at: datetime
    job_id: uuid.UUID

    def encode(self) -> str:
        raw = f"{self.created_at.isoformat()}|{self.job_id}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        created_at, job_id = raw.split("|")
        return cls(datetime.fromisoformat(created_at), uuid.UUID(job_id))


def page(
    session: Session,
    tenant_id: str,
    *,
    limit: int,
    status: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    metadata: dict[str, str] | None = None,
    after: Cursor | None = None,
) -> tuple[Sequence[Job], Cursor | None]:
    """One page of a tenant's jobs, newest first, and the cursor of the next page."""
    query = select(Job).where(Job.tenant_id == tenant_id)
    if status:
        query = query.where(Job.status == status)
    if created_after:
        query = query.where(Job.created_at >= created_after)
    if created_before:
        query = query.where(Job.created_at < created_before)
    for key, value in (metadata or {}).items():
        query = query.where(Job.metadata_[key].astext == value)
    if after:
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(after.created_at, after.job_id))
    rows = session.scalars(
        query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, Cursor(rows[-1].created_at, rows[-1].id) if more else None


def for_tenant(session: Session, tenant_id: str, job_id: uuid.UUID) -> Job | None:
    """The job if it belongs to the tenant: another tenant's job is as good as absent."""
    job = session.get(Job, job_id, populate_existing=True)
    return job if job is not None and job.tenant_id == tenant_id else None


def deliveries(
    session: Session, job_id: uuid.UUID
) -> list[tuple[WebhookDelivery, list[WebhookAttempt]]]:
    rows = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.job_id == job_id)
        .order_by(WebhookDelivery.created_at)
    ).all()
    attempts = session.scalars(
        select(WebhookAttempt)
        .where(WebhookAttempt.delivery_id.in_([d.id for d in rows]))
        .order_by(WebhookAttempt.id)
    ).all()
    return [(d, [a for a in attempts if a.delivery_id == d.id]) for d in rows]
