"""The outbox relay: publish task messages that were committed together with their job."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import func
from sqlalchemy.orm import Session, sessionmaker

from workers import jobs
from workers.db import unit_of_work
from workers.dispatch import Dispatcher


def relay(
    sessions: sessionmaker[Session],
    dispatch: Dispatcher,
    *,
    job_id: uuid.UUID | None = None,
    older_than: datetime | None = None,
) -> int:
    """Publish unpublished rows (all of one job's, or those older than a cutoff) and mark them.

    Publishing happens while the rows are locked and before the mark commits: a crash in
    between publishes the message twice, never zero times; the tasks are idempotent.
    """
    with unit_of_work(sessions) as session:
        rows = jobs.unpublished(session, older_than=older_than, job_id=job_id)
        for row in rows:
            dispatch(row.task, row.job_id)
            row.published_at = func.now()
        return len(rows)
