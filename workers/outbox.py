"""The outbox: task messages committed together with the change that calls for them, and the
relay that publishes those nobody has published (the reconciler runs it)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import Row, func, select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from config import tracing
from workers.db import unit_of_work
from workers.dispatch import Dispatcher, Message, publish
from workers.jobs import db_in
from workers.models import Job, OutboxMessage

# A relay that took rows and died leaves them to another relay after this long.
LEASE_SECONDS = 30.0


def add(session: Session, task: str, job_id: uuid.UUID) -> int:
    """Write the outbox row of `task` into the caller's transaction; answers its id."""
    row = OutboxMessage(task=task, job_id=job_id)
    session.add(row)
    session.flush()
    return row.id


def relay(
    sessions: sessionmaker[Session], dispatch: Dispatcher, *, older_than: float | None = None
) -> int:
    """Publish unpublished rows (those `older_than` seconds old, or all) and mark them;
    answers how many were published.

    The rows are taken under a lease in one short transaction, published with none open, and
    marked in another: a crash in between publishes a message twice, never zero times (the
    tasks are idempotent). A publish that fails (the broker is away) stops the relay; its rows
    wait for the lease to end and the reconciler's next relay.
    """
    with tracing.span("outbox.relay") as span:
        with unit_of_work(sessions) as session:
            rows = claim_unpublished(session, lease_seconds=LEASE_SECONDS, older_than=older_than)
        # Each message is published in its job's trace, not the relay's.
        messages = [Message(row.task, row.job_id, traceparent=row.traceparent) for row in rows]
        sent, _ = publish(dispatch, messages)
        with unit_of_work(sessions) as session:
            mark_published(session, [row.id for row in rows[:sent]])
        span.set_attribute("outbox.claimed", len(rows))
        span.set_attribute("outbox.published", sent)
    return sent


def settle(session: Session, outbox_id: int | None) -> None:
    """The task an outbox row announced is running: the row needs no more publishing."""
    if outbox_id is not None:
        mark_published(session, [outbox_id])


def claim_unpublished(
    session: Session,
    *,
    lease_seconds: float,
    older_than: float | None = None,
    limit: int = 500,
) -> Sequence[Row[int, str, uuid.UUID, str | None]]:
    """Outbox rows nobody published (those `older_than` seconds old, or all)
    and no other relay holds: taken for `lease_seconds`, their attempts counted. Answers
    their id, task, job and the job's traceparent; the caller publishes them after this
    commits."""
    conditions: list[ColumnElement[bool]] = [
        OutboxMessage.published_at.is_(None),
        OutboxMessage.claimed_until.is_(None) | (OutboxMessage.claimed_until < func.now()),
    ]
    if older_than is not None:
        conditions.append(OutboxMessage.created_at <= func.now() - timedelta(seconds=older_than))
    free = (
        select(OutboxMessage.id)
        .where(*conditions)
        .order_by(OutboxMessage.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.id.in_(free.scalar_subquery()))
        .values(claimed_until=db_in(lease_seconds), attempts=OutboxMessage.attempts + 1)
        .returning(
            OutboxMessage.id,
            OutboxMessage.task,
            OutboxMessage.job_id,
            select(Job.traceparent)
            .where(Job.id == OutboxMessage.job_id)
            .scalar_subquery()
            .label("traceparent"),
        )
    ).all()


def mark_published(session: Session, outbox_ids: Sequence[int]) -> None:
    if outbox_ids:
        session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id.in_(outbox_ids))
            .values(published_at=func.now(), claimed_until=None)
        )
