"""Signed callbacks to producers (Standard Webhooks), with a long retry schedule.

A delivery row is written in the same transaction as the job's transition, so an event is
never lost between the change and its callback. Every attempt is recorded. Retries hours apart
live in `next_attempt_at` and the reconciler turns due rows into tasks; only short waits use
a Celery countdown.

An attempt is made in three steps so that no transaction stays open across the POST: claim
the delivery under a lease (`sending_until`), POST, record the outcome. One receiver cannot
hold up the others: at most `callback_host_concurrency` attempts go to one host at a time, and
after `callback_breaker_failures` failures in a row its circuit opens: nothing is sent there
until a backed-off cool-down ends, and then a single attempt probes it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import httpx
import structlog
from sqlalchemy import exists, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from config import Settings, tracing
from workers import feed, jobs, metrics
from workers.dispatch import NOTIFY
from workers.models import CallbackAttempt, CallbackDelivery, CallbackHost, Job, Tenant
from workers.retry import parse_retry_after
from workers.sealing import Sealer
from workers.tenants import signing_secrets
from workers.work import Units, Work

log = structlog.get_logger(__name__)

COMPLETED = "generation.completed"
FAILED = "generation.failed"
CANCELLED = "generation.cancelled"
PROCESSING = "generation.processing"
EXPIRED = "generation.expired"
# A request over the broker that was refused (`api.inbox`): it never became a job.
REFUSED = "generation.refused"
DEFAULT_EVENTS = (COMPLETED, FAILED, CANCELLED, EXPIRED, REFUSED)


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    EXHAUSTED = "exhausted"  # every scheduled attempt failed; replayable
    GONE = "gone"  # the receiver answered 410: nothing more goes to that URL
    # The job moved on (a failed store restored): what it said is no longer true, so it is
    # not sent late, after the news that replaced it.
    SUPERSEDED = "superseded"


Post = Callable[[str, bytes, dict[str, str]], httpx.Response]


@dataclass(frozen=True)
class Outcome:
    status: DeliveryStatus
    retry_in: float | None = None


@dataclass(frozen=True)
class Policy:
    """How callbacks are retried and how hard one host may be pushed."""

    schedule: Sequence[float]
    timeout: float
    host_concurrency: int
    breaker_failures: int
    breaker_seconds: float
    breaker_max_seconds: float
    retry_after_max: float

    @classmethod
    def of(cls, settings: Settings) -> Policy:
        return cls(
            schedule=tuple(settings.callback_schedule_seconds),
            timeout=settings.callback_timeout_seconds,
            host_concurrency=settings.callback_host_concurrency,
            breaker_failures=settings.callback_breaker_failures,
            breaker_seconds=settings.callback_breaker_seconds,
            breaker_max_seconds=settings.callback_breaker_max_seconds,
            retry_after_max=settings.retry_after_max_seconds,
        )

    @property
    def give_up_after(self) -> timedelta:
        """The age past which a delivery its host still holds back is exhausted."""
        return timedelta(seconds=sum(self.schedule))

    @property
    def lease(self) -> timedelta:
        # The attempt's own timeout bounds the POST; the rest covers recording it.
        return timedelta(seconds=self.timeout + 10)


@dataclass(frozen=True)
class Attempt:
    """A claimed attempt: everything the POST needs, and the lease that proves it is ours."""

    delivery_id: uuid.UUID
    job_id: uuid.UUID | None  # None: a refused broker request's callback
    url: str
    host: str
    body: bytes
    headers: dict[str, str]
    lease: datetime
    # The job's trace, which the POST joins and whose `traceparent` it sends.
    traceparent: str | None = None


def host_of(url: str) -> str:
    """scheme://host:port: one receiver, as far as limits and the breaker are concerned."""
    parsed = httpx.URL(url)
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme, 0)
    return f"{parsed.scheme}://{parsed.host}:{port}"


def record(
    session: Session,
    event: uuid.UUID,
    event_type: str,
    tenant_id: str,
    job_id: uuid.UUID | None,
    url: str,
    now: datetime,
) -> uuid.UUID | None:
    """Write the delivery of the feed's `event` (`workers.announce`) to `url`, under the
    event's id. Answers the delivery id to dispatch after commit (None when nothing is sent:
    the URL answered 410 before)."""
    gone = session.scalar(
        select(CallbackDelivery.id).where(
            CallbackDelivery.tenant_id == tenant_id,
            CallbackDelivery.url == url,
            CallbackDelivery.status == DeliveryStatus.GONE,
        )
    )
    delivery = CallbackDelivery(
        id=event, job_id=job_id, tenant_id=tenant_id, event=event_type, url=url,
        host=host_of(url), status=DeliveryStatus.GONE if gone else DeliveryStatus.PENDING,
        next_attempt_at=None if gone else now,
    )  # fmt: skip
    session.add(delivery)
    session.flush()
    return None if gone else delivery.id


@dataclass
class Callbacks:
    """Makes the callback attempts that are due: claim, POST with no transaction open,
    record, and ask for the next attempt when it is a short wait away. Collaborators are
    passed in."""

    work: Units
    post: Post
    policy: Policy
    clock: Callable[[], datetime]
    sealer: Sealer

    def deliver(self, delivery_id: uuid.UUID) -> Outcome | None:
        """Make the attempt that is due and decide what comes next. None when there is
        nothing to do (delivered, stopped, not due, another attempt running); a pending
        outcome without an attempt when the receiver's host must be left alone for now. A
        secret that none of the keys opens raises `SealingError` before anything is sent: a
        callback is never signed with anything but the tenant's secret."""
        with self.work() as work:
            claimed = _claim(work.session, delivery_id, self.clock(), self.policy, self.sealer)
            if not isinstance(claimed, Attempt):
                _again(work, delivery_id, claimed)
                return claimed
        started = time.monotonic()
        with tracing.within(claimed.traceparent), tracing.span("callback.post") as span:
            status_code, error, retry_after = _attempt(self.post, claimed)
            span.set_attribute("http.response.status_code", status_code or 0)
        duration_ms = int((time.monotonic() - started) * 1000)
        retry_after = min(retry_after, self.policy.retry_after_max) if retry_after else None
        with self.work() as work:
            outcome = _record(
                work.session, claimed, (status_code, error, retry_after), duration_ms,
                self.clock(), self.policy,
            )  # fmt: skip
            _again(work, delivery_id, outcome)
        log.info(
            "callback.attempt", delivery_id=str(delivery_id), job_id=str(claimed.job_id),
            status_code=status_code, error=error, outcome=outcome and outcome.status,
        )  # fmt: skip
        return outcome


def _again(work: Work, delivery_id: uuid.UUID, outcome: Outcome | None) -> None:
    """A short wait for the next attempt is a countdown; a long one (which `send` drops) is
    left in `next_attempt_at` for the reconciler."""
    if outcome is not None and outcome.retry_in is not None:
        work.send(NOTIFY, delivery_id, outcome.retry_in)


def _claim(
    session: Session, delivery_id: uuid.UUID, now: datetime, policy: Policy, sealer: Sealer
) -> Attempt | Outcome | None:
    delivery = session.scalar(
        select(CallbackDelivery)
        .where(CallbackDelivery.id == delivery_id)
        .with_for_update(skip_locked=True)
    )
    if delivery is None or delivery.status != DeliveryStatus.PENDING:
        return None
    if delivery.next_attempt_at and delivery.next_attempt_at > now + timedelta(seconds=1):
        return None
    if delivery.sending_until and delivery.sending_until > now:
        return None  # an attempt is running; a duplicate message must not make another
    wait = _host_wait(session, delivery.host, now, policy)
    if wait and now - delivery.created_at > policy.give_up_after:
        # Held back by its host for as long as the whole schedule of attempts would have
        # taken: it ends as those attempts would have, rather than waiting for ever.
        delivery.status, delivery.next_attempt_at = DeliveryStatus.EXHAUSTED, None
        delivery.last_error = "the receiver's host was unreachable for the whole schedule"
        metrics.CALLBACK_ATTEMPTS.labels(DeliveryStatus.EXHAUSTED).inc()
        return Outcome(DeliveryStatus.EXHAUSTED)
    if wait:
        delivery.next_attempt_at = now + timedelta(seconds=wait)
        return Outcome(DeliveryStatus.PENDING, wait)
    tenant = session.get_one(Tenant, delivery.tenant_id)
    body = json.dumps(feed.payload(session, delivery.id), separators=(",", ":")).encode()
    headers = sign(signing_secrets(tenant, sealer, now), feed.event_id(delivery.id), now, body)
    delivery.sending_until = now + policy.lease
    traceparent = None
    if tracing.enabled() and delivery.job_id is not None:
        traceparent = session.scalar(select(Job.traceparent).where(Job.id == delivery.job_id))
    return Attempt(
        delivery.id, delivery.job_id, delivery.url, delivery.host, body, headers,
        delivery.sending_until, traceparent,
    )  # fmt: skip


def _host_wait(session: Session, host: str, now: datetime, policy: Policy) -> float:
    """Seconds to leave `host` alone (0: go ahead). Holds the host's row until commit, so
    concurrent claims for one host count each other."""
    session.execute(pg_insert(CallbackHost).values(host=host).on_conflict_do_nothing())
    row = session.scalar(select(CallbackHost).where(CallbackHost.host == host).with_for_update())
    assert row is not None
    if row.open_until is not None and row.open_until > now:
        return (row.open_until - now).total_seconds()
    busy = session.scalar(
        select(func.count()).where(
            CallbackDelivery.host == host, CallbackDelivery.sending_until > now
        )
    )
    if (busy or 0) >= policy.host_concurrency:
        return policy.timeout / 2  # about when one of those attempts has ended
    if row.failures >= policy.breaker_failures:
        # Half open: this attempt probes the host; the others wait for what it finds.
        row.open_until = now + policy.lease
    return 0.0


def _record(
    session: Session,
    attempt: Attempt,
    result: tuple[int | None, str | None, float | None],
    duration_ms: int,
    now: datetime,
    policy: Policy,
) -> Outcome | None:
    status_code, error, retry_after = result
    session.add(
        CallbackAttempt(
            delivery_id=attempt.delivery_id, status_code=status_code, error=error,
            duration_ms=duration_ms,
        )
    )  # fmt: skip
    _host_outcome(session, attempt.host, status_code, now, policy)
    delivery = session.scalar(
        select(CallbackDelivery).where(CallbackDelivery.id == attempt.delivery_id).with_for_update()
    )
    if delivery is None or delivery.sending_until != attempt.lease:
        return None  # the lease ran out and another attempt took over: it decides
    outcome = _next(delivery.attempts + 1, status_code, retry_after, policy.schedule)
    _apply(session, delivery, outcome, status_code, error, now)
    metrics.CALLBACK_ATTEMPTS.labels(outcome.status).inc()
    return outcome


def _host_outcome(
    session: Session, host: str, status_code: int | None, now: datetime, policy: Policy
) -> None:
    """Close the host's circuit on an answer; count a failure towards opening it otherwise,
    the cool-down doubling with each failure past the threshold. Only signs of a receiver in
    trouble count: no answer, 429 or 5xx."""
    row = session.get(CallbackHost, host, with_for_update=True)
    if row is None:
        return
    if status_code is not None and status_code != 429 and status_code < 500:
        row.failures, row.open_until, row.last_success_at = 0, None, now
        return
    row.failures += 1
    row.last_failure_at = now
    over = row.failures - policy.breaker_failures
    if over >= 0:
        cooldown = min(policy.breaker_max_seconds, policy.breaker_seconds * 2 ** min(over, 32))
        row.open_until = now + timedelta(seconds=cooldown)
        log.warning("callback.circuit_open", host=host, failures=row.failures, seconds=cooldown)


def sign(secrets: Sequence[str], msg_id: str, now: datetime, body: bytes) -> dict[str, str]:
    """Standard Webhooks headers; one `v1,` signature per valid secret (rotation overlap)."""
    signatures = " ".join(Webhook(secret).sign(msg_id, now, body.decode()) for secret in secrets)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signatures,
    }


def _attempt(post: Post, attempt: Attempt) -> tuple[int | None, str | None, float | None]:
    # The receiver may join the job's trace; the signature does not cover this header.
    traceparent = tracing.current_traceparent()
    headers = {**attempt.headers, "traceparent": traceparent} if traceparent else attempt.headers
    try:
        response = post(attempt.url, attempt.body, headers)
    except Exception as exc:  # any failure to get an answer is one failed attempt
        return None, f"{type(exc).__name__}: {exc}"[:500], None
    retry_after = None
    if response.status_code in (429, 503):
        retry_after = parse_retry_after(response.headers.get("retry-after"))
    error = None if response.is_success else f"HTTP {response.status_code}"
    return response.status_code, error, retry_after


def _next(
    attempts: int, status_code: int | None, retry_after: float | None, schedule: Sequence[float]
) -> Outcome:
    if status_code is not None and 200 <= status_code < 300:
        return Outcome(DeliveryStatus.SUCCEEDED)
    if status_code == 410:
        return Outcome(DeliveryStatus.GONE)
    if attempts >= len(schedule):
        return Outcome(DeliveryStatus.EXHAUSTED)
    return Outcome(DeliveryStatus.PENDING, max(schedule[attempts], retry_after or 0.0))


def _apply(
    session: Session,
    delivery: CallbackDelivery,
    outcome: Outcome,
    status_code: int | None,
    error: str | None,
    now: datetime,
) -> None:
    delivery.attempts += 1
    delivery.sending_until = None
    delivery.status = outcome.status
    delivery.last_status_code = status_code
    delivery.last_error = error
    delivery.next_attempt_at = (
        now + timedelta(seconds=outcome.retry_in) if outcome.retry_in is not None else None
    )
    if outcome.status == DeliveryStatus.SUCCEEDED:
        delivery.delivered_at = now
    if outcome.status == DeliveryStatus.GONE:
        # 410 Gone: stop everything still pending for this URL too.
        session.execute(
            update(CallbackDelivery)
            .where(
                CallbackDelivery.tenant_id == delivery.tenant_id,
                CallbackDelivery.url == delivery.url,
                CallbackDelivery.status == DeliveryStatus.PENDING,
            )
            .values(status=DeliveryStatus.GONE, next_attempt_at=None)
        )


def of_job(
    session: Session, job_id: uuid.UUID
) -> list[tuple[CallbackDelivery, list[CallbackAttempt]]]:
    """A job's callback deliveries, oldest first, each with its attempts."""
    rows = session.scalars(
        select(CallbackDelivery)
        .where(CallbackDelivery.job_id == job_id)
        .order_by(CallbackDelivery.created_at)
    ).all()
    return _with_attempts(session, rows)


def one(session: Session, delivery_id: uuid.UUID) -> tuple[CallbackDelivery, list[CallbackAttempt]]:
    """A delivery with its attempts."""
    delivery = session.get_one(CallbackDelivery, delivery_id, populate_existing=True)
    return _with_attempts(session, [delivery])[0]


def _with_attempts(
    session: Session, deliveries: Sequence[CallbackDelivery]
) -> list[tuple[CallbackDelivery, list[CallbackAttempt]]]:
    attempts = session.scalars(
        select(CallbackAttempt)
        .where(CallbackAttempt.delivery_id.in_([d.id for d in deliveries]))
        .order_by(CallbackAttempt.id)
    ).all()
    return [(d, [a for a in attempts if a.delivery_id == d.id]) for d in deliveries]


def supersede(session: Session, job_id: uuid.UUID) -> None:
    """Stop every callback of the job still waiting to be sent."""
    session.execute(
        update(CallbackDelivery)
        .where(CallbackDelivery.job_id == job_id, CallbackDelivery.status == DeliveryStatus.PENDING)
        # Clearing the lease makes an attempt running now record itself and decide nothing.
        .values(status=DeliveryStatus.SUPERSEDED, next_attempt_at=None, sending_until=None)
    )


def forget(session: Session, job_id: uuid.UUID) -> None:
    """A deleted job's callbacks: none is sent any more, and each keeps only its event and
    the job's id (the record they carried held its inputs)."""
    supersede(session, job_id)
    feed.forget(session, job_id)


def replay(work: Work, tenant_id: str, delivery_id: uuid.UUID, now: datetime) -> bool:
    """Send one of the tenant's deliveries again now, whatever became of it, with the same
    `webhook-id`; False when the tenant has no such delivery."""
    delivery = work.session.get(CallbackDelivery, delivery_id, with_for_update=True)
    if delivery is None or delivery.tenant_id != tenant_id:
        return False
    delivery.status = DeliveryStatus.PENDING
    delivery.next_attempt_at = now
    work.send(NOTIFY, delivery_id)
    return True


def enable(session: Session, tenant_id: str, url: str) -> int:
    """Let callbacks go to a URL of the tenant's that answered 410 again: its deliveries
    stopped by the 410 become `exhausted` (so a replay may pick them), and new events are
    delivered to it; answers how many deliveries were stopped."""
    return len(
        session.scalars(
            update(CallbackDelivery)
            .where(
                CallbackDelivery.tenant_id == tenant_id,
                CallbackDelivery.url == url,
                CallbackDelivery.status == DeliveryStatus.GONE,
            )
            .values(status=DeliveryStatus.EXHAUSTED)
            .returning(CallbackDelivery.id)
        ).all()
    )


def due(session: Session, now: datetime, limit: int = 500) -> Sequence[uuid.UUID]:
    """Pending deliveries whose next attempt is due, that no attempt holds, whose host's
    circuit is not open, and that no sweep sent in the last minute (marked now and counted,
    so a concurrent reconciler or the next sweep skips them)."""
    recently = now - timedelta(seconds=60)
    host_open = exists().where(
        CallbackHost.host == CallbackDelivery.host, CallbackHost.open_until > now
    )
    ids = session.scalars(
        select(CallbackDelivery.id)
        .where(
            CallbackDelivery.status == DeliveryStatus.PENDING,
            CallbackDelivery.next_attempt_at <= now,
            (CallbackDelivery.claimed_at.is_(None)) | (CallbackDelivery.claimed_at < recently),
            (CallbackDelivery.sending_until.is_(None)) | (CallbackDelivery.sending_until < now),
            ~host_open,
            ~jobs.quarantined(CallbackDelivery.id),
        )
        .order_by(CallbackDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(of=CallbackDelivery, skip_locked=True)
    ).all()
    if ids:
        session.execute(
            update(CallbackDelivery)
            .where(CallbackDelivery.id.in_(ids))
            .values(claimed_at=now, resends=CallbackDelivery.resends + 1)
        )
    return ids
