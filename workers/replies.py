"""Events sent to producers as tasks of their own: a broker request's `reply`
(`{"task", "queue", "events"}`) has each of those events of its job published as the
producer's task, with the body a callback carries and, as its task id and its `webhook-id`
header, the id a callback of it would have.

At least once, never lost: the reply row is written with the event, in the same
transaction, and its message (`generation.reply`) after the commit; the task publishes and
then marks it sent, so a crash in between publishes it again (the producer deduplicates by
id). A publish that fails is tried again, backing off, up to `reply_max_attempts`, each try
counted on the row; a `generation.reply` message that was lost is sent again by the
reconciler (`due`), and that counts as a try too.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from workers import dispatch, feed, metrics
from workers.dispatch import PUBLISH_ERRORS
from workers.models import Reply
from workers.retry import backoff
from workers.work import Units

log = structlog.get_logger(__name__)

PENDING, SENT, FAILED = "pending", "sent", "failed"

# (task, queue, body, message id): publishes the producer's task.
Publish = Callable[[str, str, dict[str, Any], str], None]


def record(
    session: Session, event: uuid.UUID, tenant_id: str, reply: dict[str, Any], now: datetime
) -> uuid.UUID:
    """Write the reply of the feed's `event`, under its id, to be sent after the commit."""
    session.add(
        Reply(
            id=event, tenant_id=tenant_id, task=reply["task"], queue=reply["queue"],
            status=PENDING, next_attempt_at=now,
        )
    )  # fmt: skip
    session.flush()
    return event


@dataclass
class Replies:
    """Publishes the replies that are due. Collaborators are passed in."""

    work: Units
    publish: Publish
    clock: Callable[[], datetime]
    max_attempts: int
    retry_base: float
    retry_max: float

    def send(self, reply_id: uuid.UUID) -> bool:
        """Publish a pending reply (no transaction open meanwhile) and mark it sent; a
        publish that fails is tried again later. False when there was nothing to send."""
        with self.work() as work:
            row = work.session.get(Reply, reply_id, populate_existing=True)
            if row is None or row.status != PENDING:
                return False
            task, queue = row.task, row.queue
            body = feed.payload(work.session, reply_id)
        try:
            self.publish(task, queue, dict(body), feed.event_id(reply_id))
        except PUBLISH_ERRORS as exc:
            metrics.REPLIES.labels("retried").inc()
            self._failed(reply_id, f"{type(exc).__name__}: {exc}")
            return False
        with self.work() as work:
            work.session.execute(
                update(Reply)
                .where(Reply.id == reply_id, Reply.status == PENDING)
                .values(status=SENT, sent_at=self.clock(), attempts=Reply.attempts + 1)
            )
        metrics.REPLIES.labels(SENT).inc()
        return True

    def _failed(self, reply_id: uuid.UUID, error: str) -> None:
        with self.work() as work:
            row = work.session.get(Reply, reply_id, with_for_update=True)
            if row is None or row.status != PENDING:
                return
            row.attempts += 1
            row.last_error = error[:500]
            if row.attempts >= self.max_attempts:
                row.status, row.next_attempt_at = FAILED, None
                metrics.REPLIES.labels(FAILED).inc()
                log.error("reply.failed", reply_id=str(reply_id), attempts=row.attempts)
                return
            delay = backoff(row.attempts, self.retry_base, self.retry_max)
            row.next_attempt_at = self.clock() + timedelta(seconds=delay)
            work.send(dispatch.REPLY, reply_id, delay)


def due(
    session: Session, now: datetime, grace: float, max_attempts: int, limit: int = 500
) -> Sequence[uuid.UUID]:
    """Pending replies `grace` seconds past their time, whose message was lost: each is
    marked (the next sweep leaves it for `grace` more) and counted as a try; one past
    `max_attempts` tries fails instead."""
    rows = session.scalars(
        select(Reply)
        .where(Reply.status == PENDING, Reply.next_attempt_at <= now - timedelta(seconds=grace))
        .order_by(Reply.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    resend = []
    for row in rows:
        row.attempts += 1
        if row.attempts >= max_attempts:
            row.status, row.next_attempt_at = FAILED, None
            row.last_error = "its message was lost again and again"
            continue
        row.next_attempt_at = now
        resend.append(row.id)
    return resend
