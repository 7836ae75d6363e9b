"""An event goes everywhere it is wanted at once, in the transaction that made it happen: the
tenant's feed (always, `workers.feed`), the callback URL (`workers.callbacks`) and the
producer's reply task (`workers.replies`), for the events each of those asked for. Their
messages go out after the commit; the rows behind them bring them again if they are lost.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from workers import callbacks, dispatch, feed, replies
from workers.models import Job
from workers.representation import Generation
from workers.work import Work


@dataclass(frozen=True)
class Audience:
    """Who hears of a job's events (or of a refused request's): the tenant's feed, and the
    callback URL and reply task for the events each asked for."""

    tenant_id: str
    job_id: uuid.UUID | None = None
    webhook_url: str | None = None
    webhook_events: Sequence[str] = callbacks.DEFAULT_EVENTS
    reply: dict[str, Any] | None = None

    @classmethod
    def of(cls, job: Job) -> Audience:
        events = job.webhook_events or callbacks.DEFAULT_EVENTS
        return cls(job.tenant_id, job.id, job.webhook_url, events, job.reply)


@dataclass(frozen=True)
class Announced:
    event: uuid.UUID
    delivery: uuid.UUID | None = None
    reply: uuid.UUID | None = None


def announce(
    work: Work, audience: Audience, event: str, data: dict[str, Any], now: datetime
) -> Announced:
    """Record `event` with `data` for `audience` in `work`, and send its callback and reply
    after the commit."""
    session = work.session
    recorded = feed.record(session, audience.tenant_id, audience.job_id, event, data, now)
    delivery = reply = None
    if audience.webhook_url and event in audience.webhook_events:
        delivery = callbacks.record(
            session, recorded, event, audience.tenant_id, audience.job_id, audience.webhook_url,
            now,
        )  # fmt: skip
        if delivery is not None:
            work.send(dispatch.NOTIFY, delivery)
    if audience.reply and event in audience.reply.get("events", ()):
        reply = replies.record(session, recorded, audience.tenant_id, audience.reply, now)
        work.send(dispatch.REPLY, reply)
    return Announced(recorded, delivery, reply)


def job_event(work: Work, job: Job, event: str, now: datetime) -> Announced:
    """`event` of the job, carrying its record as it is now (`job`, read in this unit after
    its change)."""
    return announce(work, Audience.of(job), event, Generation.of(job).model_dump(mode="json"), now)
