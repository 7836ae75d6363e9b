"""The outbox relay: publish task messages that were committed together with their job."""

from __future__ import annotations

import uuid

import structlog
from sqlalchemy.orm import Session, sessionmaker

from workers import jobs
from workers.db import unit_of_work
from workers.dispatch import Dispatcher

log = structlog.get_logger(__name__)

# A relay that took rows and died leaves them to another relay after this long.
LEASE_SECONDS = 30.0


def relay(
    sessions: sessionmaker[Session],
    dispatch: Dispatcher,
    *,
    job_id: uuid.UUID | None = None,
    older_than: float | None = None,
) -> int:
    """Publish unpublished rows (all of one job's, or those `older_than` seconds old) and mark
    them; answers how many were published.

    The rows are taken under a lease in one short transaction, published with none open, and
    marked in another: a crash in between publishes a message twice, never zero times (the
    tasks are idempotent). A publish that fails (the broker is away) stops the relay; its rows
    wait for the lease to end and the reconciler's next relay.
    """
    with unit_of_work(sessions) as session:
        rows = jobs.claim_unpublished(
            session, lease_seconds=LEASE_SECONDS, older_than=older_than, job_id=job_id
        )
    published: list[int] = []
    try:
        for row in rows:
            dispatch(row.task, row.job_id)
            published.append(row.id)
    except Exception as exc:  # any broker failure: what was not published stays in the outbox
        left = len(rows) - len(published)
        error = f"{type(exc).__name__}: {exc}"
        log.warning("outbox.publish_failed", published=len(published), left=left, error=error)
    with unit_of_work(sessions) as session:
        jobs.mark_published(session, published)
    return len(published)
