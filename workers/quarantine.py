"""Tasks put aside for an operator: a message that kept killing its worker, or a step the
reconciler kept resending. Nothing runs them, and no sweep resends them, until released."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from workers import jobs, metrics
from workers.models import Job, QuarantinedTask

log = structlog.get_logger(__name__)


def put_aside(
    session: Session, task: str, subject_id: uuid.UUID, reason: str, deliveries: int
) -> bool:
    """Record `task` for `subject_id` as put aside (once: False if it already is)."""
    if session.scalar(select(jobs.quarantined(subject_id))):
        return False
    session.add(
        QuarantinedTask(task=task, subject_id=subject_id, reason=reason, deliveries=deliveries)
    )
    session.flush()
    metrics.QUARANTINED.labels(task).inc()
    log.error("task.quarantined", task=task, subject_id=str(subject_id), reason=reason)
    return True


def is_aside(session: Session, subject_id: uuid.UUID) -> bool:
    return bool(session.scalar(select(jobs.quarantined(subject_id))))


def active(session: Session) -> Sequence[QuarantinedTask]:
    """What waits for an operator, oldest first."""
    return session.scalars(
        select(QuarantinedTask)
        .where(QuarantinedTask.released_at.is_(None))
        .order_by(QuarantinedTask.id)
    ).all()


def release(session: Session, entry_id: int, now: datetime) -> QuarantinedTask | None:
    """Let a put-aside task run again, its job's resends counted from zero; answers it, or
    None if there was none to release. The caller sends the task again (and clears the
    run count `workers.poison` keeps)."""
    entry = session.scalars(
        update(QuarantinedTask)
        .where(QuarantinedTask.id == entry_id, QuarantinedTask.released_at.is_(None))
        .values(released_at=now)
        .returning(QuarantinedTask)
    ).first()
    if entry is not None:
        session.execute(update(Job).where(Job.id == entry.subject_id).values(resends=0))
    return entry
