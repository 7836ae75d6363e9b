"""Bulk actions of one tenant: cancel the jobs a filter matches, replay the callbacks a filter
matches, re-enable a callback URL that answered 410.

Each is bounded (`max_items`), reported (its row counts what it matched and what it did) and
run by a worker, never inside the request that asked for it: the request writes the action and
its task (`create`), and the task (`run`) does one batch under a lease, keeps its cursor on
the row and sends itself again for the next. A worker that dies mid-way leaves its lease to
run out; the reconciler then sends the task again (`stalled`), and it resumes at the cursor.
Only what existed when the action was asked for is picked. An action sent
`reconcile_max_resends` times without finishing fails, saying so. Each item goes through the
same step as its single-item route (`Pipeline.cancel`, `callbacks.replay`), so a bulk action
keeps their invariants.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import ColumnElement, Row, Select, func, or_, select, tuple_, update
from sqlalchemy.orm import Session

from workers import callbacks, dispatch
from workers.callbacks import DeliveryStatus
from workers.db import unit_of_work
from workers.listing import JobFilter
from workers.models import BulkAction, CallbackDelivery, Job
from workers.states import LIVE, JobState
from workers.work import Work

if TYPE_CHECKING:
    from workers.pipeline import Pipeline

log = structlog.get_logger(__name__)

CANCEL, REPLAY, ENABLE = "cancel", "replay", "enable"
BATCH = 200
MAX_ITEMS = 10_000
LEASE = timedelta(seconds=120)
# What a replay may pick: deliveries whose every attempt failed, or whose URL answered 410.
REPLAYABLE = (DeliveryStatus.EXHAUSTED, DeliveryStatus.GONE)


class ActionStatus(StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


# One batch of an action: (pipeline, action, at most this many) -> (matched, acted, cursor of
# the next batch, or None when this was the last).
Step = Callable[["Pipeline", BulkAction, int], tuple[int, int, str | None]]


def create(
    work: Work, tenant_id: str, kind: str, filter_: dict[str, Any], max_items: int
) -> BulkAction:
    """Write the action and send its task once it has committed."""
    assert kind in _STEPS, kind
    action = BulkAction(
        id=uuid.uuid4(), tenant_id=tenant_id, kind=kind, filter=filter_, max_items=max_items,
        status=ActionStatus.PENDING, matched=0, done=0,
    )  # fmt: skip
    work.session.add(action)
    work.session.flush()
    work.send(dispatch.BULK, action.id)
    return action


def get(session: Session, tenant_id: str | None, action_id: uuid.UUID) -> BulkAction | None:
    """The action if it is the tenant's (any tenant's for None: the operator's CLI)."""
    action = session.get(BulkAction, action_id, populate_existing=True)
    if action is None or (tenant_id is not None and action.tenant_id != tenant_id):
        return None
    return action


def run(pipeline: Pipeline, action_id: uuid.UUID) -> None:
    """One batch of the action, then the task again for the next one (so that no action
    holds a worker for long), until the filter matches no more or its bound is reached. A
    duplicate message finds the lease held, or the action done."""
    lease = uuid.uuid4()
    with unit_of_work(pipeline.sessions) as session:
        action = _lease(session, action_id, lease)
    if action is None:
        return
    left = action.max_items - action.done
    matched, acted, cursor = _STEPS[action.kind](pipeline, action, min(BATCH, left))
    finished = cursor is None or acted >= left
    with pipeline.work() as work:
        recorded = work.session.execute(
            update(BulkAction)
            .where(
                BulkAction.id == action_id, BulkAction.lease_id == lease,
                BulkAction.status == ActionStatus.PENDING,
            )
            .values(
                matched=BulkAction.matched + matched, done=BulkAction.done + acted,
                cursor=cursor, updated_at=func.now(), resends=0, lease_until=None,
                lease_id=None, status=ActionStatus.DONE if finished else ActionStatus.PENDING,
                finished_at=func.now() if finished else None,
            )
            .returning(BulkAction.id)
        ).first()  # fmt: skip
        if recorded is not None and not finished:
            work.send(dispatch.BULK, action_id)
    if recorded is None:
        log.warning("bulk.lease_lost", action_id=str(action_id))  # another worker took over
    elif finished:
        log.info("bulk.done", action_id=str(action_id), kind=action.kind)


def _lease(session: Session, action_id: uuid.UUID, lease: uuid.UUID) -> BulkAction | None:
    """Take the pending action for one batch, unless another worker holds it."""
    return session.scalars(
        update(BulkAction)
        .where(BulkAction.id == action_id, BulkAction.status == ActionStatus.PENDING, _free())
        .values(lease_until=func.now() + LEASE, lease_id=lease, updated_at=func.now())
        .returning(BulkAction)
    ).first()


def _free() -> ColumnElement[bool]:
    return or_(BulkAction.lease_until.is_(None), BulkAction.lease_until < func.now())


def stalled(session: Session, grace_seconds: float, cap: int) -> list[uuid.UUID]:
    """Pending actions nobody works on (their message lost, or their worker dead), counted
    and answered to be sent again; those sent `cap` times already fail instead."""
    idle = (
        (BulkAction.status == ActionStatus.PENDING)
        & (BulkAction.updated_at < func.now() - timedelta(seconds=grace_seconds))
        & _free()
    )
    session.execute(
        update(BulkAction)
        .where(idle, BulkAction.resends >= cap)
        .values(
            status=ActionStatus.FAILED, finished_at=func.now(), lease_until=None,
            error=f"its task was sent {cap} times without finishing",
        )
    )  # fmt: skip
    return list(
        session.scalars(
            update(BulkAction)
            .where(idle)
            .values(resends=BulkAction.resends + 1, updated_at=func.now())
            .returning(BulkAction.id)
        )
    )


# -- the steps ----------------------------------------------------------------------------


def _cancel(pipeline: Pipeline, action: BulkAction, limit: int) -> tuple[int, int, str | None]:
    wanted = JobFilter.from_json(action.filter)
    query = select(Job.id, Job.created_at).where(
        Job.tenant_id == action.tenant_id, Job.status.in_(wanted.statuses or LIVE),
        # What existed when it was asked for: jobs made since are not the caller's meaning.
        Job.created_at <= action.created_at, *wanted.where(),
    )  # fmt: skip
    with pipeline.sessions() as session:
        rows = session.execute(_page(query, Job, action.cursor, limit)).all()
    acted = sum(pipeline.cancel(job_id).status == JobState.CANCELLED for job_id, _ in rows)
    return len(rows), acted, _next(rows, limit)


def _replay(pipeline: Pipeline, action: BulkAction, limit: int) -> tuple[int, int, str | None]:
    wanted = action.filter
    query = select(CallbackDelivery.id, CallbackDelivery.created_at).where(
        CallbackDelivery.tenant_id == action.tenant_id,
        CallbackDelivery.created_at <= action.created_at,
        CallbackDelivery.status.in_(wanted.get("status") or [DeliveryStatus.EXHAUSTED]),
    )
    if wanted.get("event"):
        query = query.where(CallbackDelivery.event.in_(wanted["event"]))
    if wanted.get("created_after"):
        after = datetime.fromisoformat(wanted["created_after"])
        query = query.where(CallbackDelivery.created_at >= after)
    if wanted.get("created_before"):
        before = datetime.fromisoformat(wanted["created_before"])
        query = query.where(CallbackDelivery.created_at < before)
    with pipeline.work() as work:
        rows = work.session.execute(_page(query, CallbackDelivery, action.cursor, limit)).all()
        now = pipeline.clock()
        acted = sum(callbacks.replay(work, action.tenant_id, row[0], now) for row in rows)
    return len(rows), acted, _next(rows, limit)


def _enable(pipeline: Pipeline, action: BulkAction, limit: int) -> tuple[int, int, str | None]:
    with unit_of_work(pipeline.sessions) as session:
        count = callbacks.enable(session, action.tenant_id, action.filter["url"])
    return count, count, None


Keyed = Select[uuid.UUID, datetime]  # an item's id and created_at, the keyset it is paged by


def _page(query: Keyed, model: Any, cursor: str | None, limit: int) -> Keyed:
    """The next `limit` items after `cursor`, oldest first: every batch starts where the
    last one ended, so an item an earlier batch changed is not picked again."""
    if cursor:
        at, last = cursor.split("|")
        after = tuple_(datetime.fromisoformat(at), uuid.UUID(last))
        query = query.where(tuple_(model.created_at, model.id) > after)
    return query.order_by(model.created_at, model.id).limit(limit)


def _next(rows: Sequence[Row[uuid.UUID, datetime]], limit: int) -> str | None:
    """The cursor after a full batch; None once a batch came back short (the last one)."""
    if len(rows) < limit:
        return None
    item_id, created_at = rows[-1]
    return f"{created_at.isoformat()}|{item_id}"


_STEPS: dict[str, Step] = {CANCEL: _cancel, REPLAY: _replay, ENABLE: _enable}
