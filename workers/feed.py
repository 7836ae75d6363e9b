"""A tenant's feed of events (`GET /v1/events`): every event of its jobs, whether or not a
callback carries it, oldest first, so a receiver that was down can catch up from the last
`webhook-id` it saw.

The feed is read in the order of the writing transactions' ids, and only up to the oldest
transaction still running (`pg_snapshot_xmin`). Ids are handed out when a transaction first
writes, but transactions commit in any order; an event whose transaction is still open is
therefore held back with everything after it, rather than appearing later *behind* a cursor
that a reader has already passed. Transactions here are short (none stays open across a
network call), so the hold-back is milliseconds.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, insert, literal_column, select, tuple_, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from workers.models import TenantEvent

# Every transaction id below it has committed or rolled back: nothing more can appear there.
_SETTLED_BEFORE: ColumnElement[int] = literal_column(
    "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
)
PREFIX = "msg_"


class UnknownEvent(LookupError):
    """A cursor that names no event of the tenant's."""


def event_id(value: uuid.UUID) -> str:
    """The id producers see: in the feed, and as the `webhook-id` of the event's callback."""
    return f"{PREFIX}{value.hex}"


def parse_event_id(value: str) -> uuid.UUID:
    """The event a producer's id names; `ValueError` for anything this API never gave out."""
    if not value.startswith(PREFIX) or len(value) != len(PREFIX) + 32:
        raise ValueError(value)
    return uuid.UUID(hex=value[len(PREFIX) :])


# Built once: every job adds a few events, and building the statement each time cost more
# than executing it.
_NEW_EVENT = insert(cast(Table, TenantEvent.__table__))


def record(
    session: Session,
    tenant_id: str,
    job_id: uuid.UUID | None,
    event_type: str,
    data: dict[str, Any],
    now: datetime,
) -> uuid.UUID:
    """Add `event_type` with `data` (the job's record as it is now, or a refused request) to
    the tenant's feed in the caller's transaction; answers the event's id (its callback and
    reply, if any, take it too)."""
    new_id = uuid.uuid4()
    payload = {"type": event_type, "timestamp": now.isoformat(), "data": data}
    values = {"id": new_id, "tenant_id": tenant_id, "job_id": job_id, "type": event_type}
    session.execute(_NEW_EVENT, {**values, "payload": payload})
    return new_id


def payload(session: Session, event: uuid.UUID) -> dict[str, object]:
    """What the event says, as its callback's body carries it."""
    return session.scalar(select(TenantEvent.payload).where(TenantEvent.id == event)) or {}


def page(
    session: Session,
    tenant_id: str,
    *,
    after: uuid.UUID | None,
    types: Sequence[str],
    limit: int,
) -> Sequence[TenantEvent]:
    """The tenant's next `limit` events after the event `after` (from the first without it),
    of `types` (all without them). Raises `UnknownEvent` for an `after` of no event of its."""
    query = select(TenantEvent).where(
        TenantEvent.tenant_id == tenant_id, TenantEvent.txid < _SETTLED_BEFORE
    )
    if after is not None:
        mark = session.execute(
            select(TenantEvent.txid, TenantEvent.seq).where(
                TenantEvent.id == after, TenantEvent.tenant_id == tenant_id
            )
        ).first()
        if mark is None:
            raise UnknownEvent(str(after))
        query = query.where(tuple_(TenantEvent.txid, TenantEvent.seq) > tuple_(*mark))
    if types:
        query = query.where(TenantEvent.type.in_(types))
    return session.scalars(query.order_by(TenantEvent.txid, TenantEvent.seq).limit(limit)).all()


def forget(session: Session, job_id: uuid.UUID) -> None:
    """A deleted job's events keep only their type and the job's id: the record they carried
    held its inputs."""
    session.execute(
        update(TenantEvent)
        .where(TenantEvent.job_id == job_id)
        .values(
            payload=literal_column(
                "jsonb_build_object('type', type, 'timestamp', payload->'timestamp', "
                "'data', jsonb_build_object('id', job_id::text))"
            )
        )
    )
