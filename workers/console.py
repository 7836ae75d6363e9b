"""What the operators' console shows, read from Postgres (and the broker's queue lengths).

Every read is bounded: by a time window on an indexed column, or by a LIMIT. The numbers come
from the same code the rest of the system counts with (the admission gate's usage, a tenant's
quotas and committed spend, the metrics' queue depths), so the console never tells a story of
its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from config import Settings
from workers import admission, intake, metrics, tenants
from workers.callbacks import DeliveryStatus
from workers.models import (
    ApiKey,
    CallbackAttempt,
    CallbackDelivery,
    Job,
    JobEvent,
    Tenant,
)
from workers.states import LIVE, JobState

# Bounds of what one page reads.
MAX_EVENTS = 200
MAX_DELIVERIES = 50
MAX_ATTEMPTS = 200
MAX_TENANTS = 200
MAX_ENDPOINTS = 50
EXAMPLES = 3
CHART_HOURS = 3


def _day(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def _month(now: datetime) -> datetime:
    return _day(now).replace(day=1)


@dataclass(frozen=True)
class Overview:
    states: dict[str, int]
    # (minute, completions, failures), oldest first, one per minute of the window.
    per_minute: list[tuple[datetime, int, int]]
    # tenant name -> (spend today, spend this month)
    spend: dict[str, tuple[Decimal, Decimal]]
    gate: admission.Usage
    max_in_flight: int
    submits_per_minute: int
    queued_by_priority: dict[str, int]
    queues: list[tuple[str, int]]
    resends: dict[str, int]
    callbacks_last_hour: tuple[int, int]  # (attempts, failed)


def overview(session: Session, broker: Any, settings: Settings, now: datetime) -> Overview:
    """The overview page: states, throughput, spend, the gate, queues and callbacks."""
    gate = admission.Gate(
        settings.max_in_flight, settings.submits_per_minute,
        settings.tenant_max_in_flight or settings.max_in_flight,
    )  # fmt: skip
    return Overview(
        states=_states(session),
        per_minute=_per_minute(session, now, CHART_HOURS),
        spend=_spend(session, settings, now),
        gate=admission.usage(session, gate, now, now - timedelta(minutes=1)),
        max_in_flight=settings.max_in_flight,
        submits_per_minute=settings.submits_per_minute,
        queued_by_priority=_queued_by_priority(session),
        queues=metrics.queue_depths(broker),
        resends=_resends(session, now),
        callbacks_last_hour=_callback_failures(session, now - timedelta(hours=1)),
    )


def _states(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    counted = {str(state): int(n) for state, n in rows}
    return {state.value: counted.get(state.value, 0) for state in JobState}


def _per_minute(session: Session, now: datetime, hours: int) -> list[tuple[datetime, int, int]]:
    since = (now - timedelta(hours=hours)).replace(second=0, microsecond=0)
    minute = func.date_trunc("minute", JobEvent.at)
    rows = session.execute(
        select(
            minute,
            func.count().filter(JobEvent.to_state == JobState.COMPLETED),
            func.count().filter(JobEvent.to_state == JobState.FAILED),
        )
        .where(
            JobEvent.at >= since,
            JobEvent.to_state.in_([JobState.COMPLETED, JobState.FAILED]),
            # A transition, not a note recorded on a job that had already ended.
            JobEvent.from_state.is_distinct_from(JobEvent.to_state),
        )
        .group_by(minute)
    ).all()
    found = {at.astimezone(since.tzinfo): (int(c), int(f)) for at, c, f in rows}
    slots = [since + timedelta(minutes=i) for i in range(hours * 60 + 1)]
    return [(at, *found.get(at, (0, 0))) for at in slots]


def _spend(
    session: Session, settings: Settings, now: datetime
) -> dict[str, tuple[Decimal, Decimal]]:
    month = intake.spend_by_tenant(session, _month(now), settings)
    today = intake.spend_by_tenant(session, _day(now), settings)
    names = dict(session.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(month))).all())
    return {
        names.get(tenant, tenant): (today.get(tenant, Decimal(0)), spent)
        for tenant, spent in sorted(month.items(), key=lambda item: -item[1])
    }


def _queued_by_priority(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(Job.priority, func.count())
        .where(Job.status == JobState.QUEUED)
        .group_by(Job.priority)
    ).all()
    counted = {int(rank): int(n) for rank, n in rows}
    return {name: counted.get(rank, 0) for rank, name in admission.PRIORITY_NAMES.items()}


def _resends(session: Session, now: datetime) -> dict[str, int]:
    # Resends are counted on the rows themselves (and capped there), so Postgres answers for
    # every worker host at once: a job's count is its current step's, a callback's its own.
    jobs = session.scalar(
        select(func.coalesce(func.sum(Job.resends), 0)).where(Job.status.in_(LIVE))
    )
    deliveries = session.scalar(
        select(func.coalesce(func.sum(CallbackDelivery.resends), 0)).where(
            CallbackDelivery.created_at >= now - timedelta(hours=24)
        )
    )
    return {"live jobs": int(jobs or 0), "callbacks (24 h)": int(deliveries or 0)}


def _failed_attempt() -> Any:
    return (CallbackAttempt.status_code.is_(None)) | (
        (CallbackAttempt.status_code < 200) | (CallbackAttempt.status_code >= 300)
    )


def _callback_failures(session: Session, since: datetime) -> tuple[int, int]:
    row = session.execute(
        select(func.count(), func.count().filter(_failed_attempt())).where(
            CallbackAttempt.at >= since
        )
    ).one()
    return int(row[0]), int(row[1])


# -- a job --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stay:
    """A state the job was in, from when, and for how long (None: it is still there)."""

    state: str
    since: datetime
    seconds: float | None
    reason: str | None


@dataclass(frozen=True)
class JobView:
    job: Job
    tenant: str
    stays: list[Stay]
    deliveries: list[tuple[CallbackDelivery, list[CallbackAttempt]]]


def job_view(session: Session, job_id: uuid.UUID) -> JobView | None:
    """A job with its state timeline and its callbacks, each bounded."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    events = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id).limit(MAX_EVENTS)
    ).all()
    deliveries = session.scalars(
        select(CallbackDelivery)
        .where(CallbackDelivery.job_id == job_id)
        .order_by(CallbackDelivery.created_at)
        .limit(MAX_DELIVERIES)
    ).all()
    name = session.scalar(select(Tenant.name).where(Tenant.id == job.tenant_id))
    return JobView(job, name or job.tenant_id, timeline(events), _attempts(session, deliveries))


def timeline(events: Sequence[JobEvent]) -> list[Stay]:
    """The states a job went through, each with the time spent in it until the next."""
    moves = [e for e in events if e.from_state != e.to_state or e.from_state is None]
    stays = []
    for i, event in enumerate(moves):
        following = moves[i + 1].at if i + 1 < len(moves) else None
        seconds = (following - event.at).total_seconds() if following else None
        stays.append(Stay(event.to_state, event.at, seconds, event.reason))
    return stays


def _attempts(
    session: Session, deliveries: Sequence[CallbackDelivery]
) -> list[tuple[CallbackDelivery, list[CallbackAttempt]]]:
    attempts = session.scalars(
        select(CallbackAttempt)
        .where(CallbackAttempt.delivery_id.in_([d.id for d in deliveries]))
        .order_by(CallbackAttempt.id.desc())
        .limit(MAX_ATTEMPTS)
    ).all()
    ordered = sorted(attempts, key=lambda a: a.id)
    return [(d, [a for a in ordered if a.delivery_id == d.id]) for d in deliveries]


def delivery_tenant(session: Session, delivery_id: uuid.UUID) -> str | None:
    return session.scalar(
        select(CallbackDelivery.tenant_id).where(CallbackDelivery.id == delivery_id)
    )


# -- failures -----------------------------------------------------------------------------


@dataclass
class FailureGroup:
    code: str
    count: int
    # Failures in each hour of the window, oldest first.
    per_hour: list[int]
    examples: list[tuple[uuid.UUID, str | None]] = field(default_factory=list)


def failures(session: Session, now: datetime, hours: int = 24) -> list[FailureGroup]:
    """Jobs that failed in the last `hours`, grouped by error code, most frequent first."""
    since = (now - timedelta(hours=hours)).replace(minute=0, second=0, microsecond=0)
    # UTC hours, as `since` is: truncated in the session's time zone, a zone half an hour
    # off UTC would count a failure in the hour before its own.
    hour = func.date_trunc("hour", JobEvent.at, "UTC")
    failed_here = and_(
        JobEvent.at >= since,
        JobEvent.to_state == JobState.FAILED,
        JobEvent.from_state.is_distinct_from(JobState.FAILED),
    )
    code = func.coalesce(Job.error_code, "unknown")
    rows = session.execute(
        select(code, hour, func.count())
        .join(Job, Job.id == JobEvent.job_id)
        .where(failed_here)
        .group_by(code, hour)
    ).all()
    groups: dict[str, FailureGroup] = {}
    slots = hours + 1
    for name, at, n in rows:
        group = groups.setdefault(name, FailureGroup(name, 0, [0] * slots))
        index = int((at - since).total_seconds() // 3600)
        group.per_hour[min(max(index, 0), slots - 1)] += int(n)
        group.count += int(n)
    for group in groups.values():
        group.examples = _examples(session, group.code, since)
    return sorted(groups.values(), key=lambda g: -g.count)


def _examples(session: Session, code: str, since: datetime) -> list[tuple[uuid.UUID, str | None]]:
    wanted = Job.error_code.is_(None) if code == "unknown" else Job.error_code == code
    rows = session.execute(
        select(Job.id, Job.error_message)
        .where(Job.status == JobState.FAILED, wanted, Job.updated_at >= since)
        .order_by(Job.updated_at.desc())
        .limit(EXAMPLES)
    ).all()
    return [(row.id, row.error_message) for row in rows]


# -- tenants ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TenantRow:
    tenant: Tenant
    live_keys: int
    spent_month: Decimal


def tenant_rows(
    session: Session, settings: Settings, now: datetime, after: str | None = None,
    limit: int = MAX_TENANTS,
) -> tuple[list[TenantRow], str | None]:  # fmt: skip
    """A page of tenants by name, those after `after`; and the name the next page starts
    after, if there is one."""
    query = select(Tenant).order_by(Tenant.name)
    if after is not None:
        query = query.where(Tenant.name > after)
    found = session.scalars(query.limit(limit + 1)).all()
    more = found[limit - 1].name if len(found) > limit else None
    found = found[:limit]
    ids = [t.id for t in found]
    keys = dict(
        session.execute(
            select(ApiKey.tenant_id, func.count())
            .where(ApiKey.revoked_at.is_(None), ApiKey.tenant_id.in_(ids))
            .group_by(ApiKey.tenant_id)
        ).all()
    )
    spent = intake.spend_by_tenant(session, _month(now), settings, ids)
    rows = [TenantRow(t, int(keys.get(t.id, 0)), spent.get(t.id, Decimal(0))) for t in found]
    return rows, more


@dataclass(frozen=True)
class Endpoint:
    """A callback URL of a tenant, and how its recent deliveries went."""

    url: str
    health: str  # healthy, failing, disabled (it answered 410)
    counts: dict[str, int]
    last_status_code: int | None


@dataclass(frozen=True)
class TenantView:
    tenant: Tenant
    keys: Sequence[ApiKey]
    usage: dict[str, dict[str, Any]]
    endpoints: list[Endpoint]


def tenant_view(
    session: Session, tenant_id: str, settings: Settings, now: datetime
) -> TenantView | None:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        return None
    return TenantView(
        tenant,
        tenants.list_keys(session, tenant),
        intake.tenant_usage(session, tenant, now, settings),
        endpoints(session, tenant_id, now),
    )


def endpoints(session: Session, tenant_id: str, now: datetime, days: int = 7) -> list[Endpoint]:
    """The tenant's callback URLs of the last `days`: disabled when one answered 410 and was
    not enabled again, failing when its latest delivery is not a success, else healthy."""
    latest = func.max(CallbackDelivery.created_at)
    rows = session.execute(
        select(CallbackDelivery.url, CallbackDelivery.status, func.count(), latest)
        .where(
            CallbackDelivery.tenant_id == tenant_id,
            CallbackDelivery.created_at >= now - timedelta(days=days),
        )
        .group_by(CallbackDelivery.url, CallbackDelivery.status)
        .order_by(latest.desc())
        .limit(MAX_ENDPOINTS * len(DeliveryStatus))
    ).all()
    by_url: dict[str, dict[str, Any]] = {}
    for url, status, n, last in rows:
        entry = by_url.setdefault(url, {"counts": {}, "last": last, "last_status": status})
        entry["counts"][status] = int(n)
        if last > entry["last"]:
            entry["last"], entry["last_status"] = last, status
    return [
        Endpoint(url, _health(entry["counts"], entry["last_status"]), entry["counts"],
                 _last_code(session, tenant_id, url))
        for url, entry in list(by_url.items())[:MAX_ENDPOINTS]
    ]  # fmt: skip


def _health(counts: dict[str, int], last_status: str) -> str:
    if counts.get(DeliveryStatus.GONE):
        return "disabled"
    failing = (DeliveryStatus.EXHAUSTED, DeliveryStatus.PENDING)
    return "failing" if last_status in failing else "healthy"


def _last_code(session: Session, tenant_id: str, url: str) -> int | None:
    return session.scalar(
        select(CallbackDelivery.last_status_code)
        .where(
            CallbackDelivery.tenant_id == tenant_id,
            CallbackDelivery.url == url,
            CallbackDelivery.attempts > 0,
        )
        .order_by(CallbackDelivery.created_at.desc())
        .limit(1)
    )
