"""Signed callbacks to producers (Standard Webhooks), with a long retry schedule.

A delivery row is written in the same transaction as the job's transition, so an event is
never lost between the change and its callback. Every attempt is recorded. Retries hours apart
live in `next_attempt_at` and the reconciler turns due rows into tasks; only short waits use
a Celery countdown.
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
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from workers import jobs, metrics
from workers.models import Tenant, WebhookAttempt, WebhookDelivery
from workers.representation import Generation
from workers.sealing import Sealer
from workers.tenants import signing_secrets

log = structlog.get_logger(__name__)

COMPLETED = "generation.completed"
FAILED = "generation.failed"
CANCELLED = "generation.cancelled"
PROCESSING = "generation.processing"
EVENTS = (COMPLETED, FAILED, CANCELLED, PROCESSING)
DEFAULT_EVENTS = (COMPLETED, FAILED, CANCELLED)


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    EXHAUSTED = "exhausted"  # every scheduled attempt failed; replayable
    GONE = "gone"  # the receiver answered 410: nothing more goes to that URL


Post = Callable[[str, bytes, dict[str, str]], httpx.Response]


@dataclass(frozen=True)
class Outcome:
    status: DeliveryStatus
    retry_in: float | None = None


def webhook_id(delivery_id: uuid.UUID) -> str:
    return f"msg_{delivery_id.hex}"


def record(session: Session, job_id: uuid.UUID, event: str, now: datetime) -> uuid.UUID | None:
    """Write the delivery of `event` for a job, if it has a callback URL that asked for it.
    Answers the delivery id to dispatch after commit (None when there is nothing to send)."""
    job = jobs.get(session, job_id)
    if not job.webhook_url or event not in (job.webhook_events or DEFAULT_EVENTS):
        return None
    gone = session.scalar(
        select(WebhookDelivery.id).where(
            WebhookDelivery.tenant_id == job.tenant_id,
            WebhookDelivery.url == job.webhook_url,
            WebhookDelivery.status == DeliveryStatus.GONE,
        )
    )
    payload = {
        "type": event,
        "timestamp": now.isoformat(),
        "data": Generation.of(job).model_dump(mode="json"),
    }
    delivery = WebhookDelivery(
        job_id=job.id, tenant_id=job.tenant_id, event=event, url=job.webhook_url,
        payload=payload, status=DeliveryStatus.GONE if gone else DeliveryStatus.PENDING,
        next_attempt_at=None if gone else now,
    )  # fmt: skip
    session.add(delivery)
    session.flush()
    return None if gone else delivery.id


def deliver(
    session: Session,
    delivery_id: uuid.UUID,
    post: Post,
    now: datetime,
    schedule: Sequence[float],
    sealer: Sealer,
) -> Outcome | None:
    """Make the attempt that is due, record it, and decide what comes next. None when the
    delivery is not due (already delivered, stopped, or a duplicate message). A secret that
    none of the keys opens raises `SealingError` before anything is sent: a callback is never
    signed with anything but the tenant's secret."""
    delivery = session.scalar(
        select(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id)
        .with_for_update(skip_locked=True)
    )
    if delivery is None or delivery.status != DeliveryStatus.PENDING:
        return None
    if delivery.next_attempt_at and delivery.next_attempt_at > now + timedelta(seconds=1):
        return None
    tenant = session.get_one(Tenant, delivery.tenant_id)
    body = json.dumps(delivery.payload, separators=(",", ":")).encode()
    headers = sign(signing_secrets(tenant, sealer, now), webhook_id(delivery.id), now, body)
    started = time.monotonic()
    status_code, error, retry_after = _attempt(post, delivery.url, body, headers)
    session.add(
        WebhookAttempt(
            delivery_id=delivery.id, status_code=status_code, error=error,
            duration_ms=int((time.monotonic() - started) * 1000),
        )
    )  # fmt: skip
    outcome = _next(delivery.attempts + 1, status_code, retry_after, schedule)
    _apply(session, delivery, outcome, status_code, error, now)
    metrics.CALLBACK_ATTEMPTS.labels(outcome.status).inc()
    log.info(
        "callback.attempt", delivery_id=str(delivery.id), job_id=str(delivery.job_id),
        status_code=status_code, error=error, outcome=outcome.status,
    )  # fmt: skip
    return outcome


def sign(secrets: Sequence[str], msg_id: str, now: datetime, body: bytes) -> dict[str, str]:
    """Standard Webhooks headers; one `v1,` signature per valid secret (rotation overlap)."""
    signatures = " ".join(Webhook(secret).sign(msg_id, now, body.decode()) for secret in secrets)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signatures,
    }


def _attempt(
    post: Post, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int | None, str | None, float | None]:
    try:
        response = post(url, body, headers)
    except Exception as exc:  # any failure to get an answer is one failed attempt
        return None, f"{type(exc).__name__}: {exc}"[:500], None
    retry_after = None
    if response.status_code in (429, 503):
        value = response.headers.get("retry-after", "")
        retry_after = float(value) if value.strip().isdigit() else None
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
    delivery: WebhookDelivery,
    outcome: Outcome,
    status_code: int | None,
    error: str | None,
    now: datetime,
) -> None:
    delivery.attempts += 1
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
            update(WebhookDelivery)
            .where(
                WebhookDelivery.tenant_id == delivery.tenant_id,
                WebhookDelivery.url == delivery.url,
                WebhookDelivery.status == DeliveryStatus.PENDING,
            )
            .values(status=DeliveryStatus.GONE, next_attempt_at=None)
        )


def replay(session: Session, delivery: WebhookDelivery, now: datetime) -> None:
    """Send a delivery again, whatever became of it, with the same `webhook-id`."""
    delivery.status = DeliveryStatus.PENDING
    delivery.next_attempt_at = now
    session.flush()


def due(session: Session, now: datetime, limit: int = 500) -> Sequence[uuid.UUID]:
    """Pending deliveries whose next attempt is due and that no sweep sent in the last minute
    (marked now, so a concurrent reconciler or the next sweep skips them)."""
    recently = now - timedelta(seconds=60)
    ids = session.scalars(
        select(WebhookDelivery.id)
        .where(
            WebhookDelivery.status == DeliveryStatus.PENDING,
            WebhookDelivery.next_attempt_at <= now,
            (WebhookDelivery.claimed_at.is_(None)) | (WebhookDelivery.claimed_at < recently),
        )
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if ids:
        session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id.in_(ids)).values(claimed_at=now)
        )
    return ids
