"""The webhooks WaveSpeed sends us: verification (its variant of Standard Webhooks: `v3,<hex>`
signatures keyed with the secret text itself, not base64-decoded) and the ids already seen."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from datetime import timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from workers.models import WaveSpeedWebhook

TOLERANCE_SECONDS = 300
# WaveSpeed's prediction ids are short; the dedupe row keeps them in a String(64) column.
MAX_ID_LENGTH = 64


class WebhookRejected(ValueError):
    """The request is not a fresh webhook signed with our secret."""


def sign(secret: str, webhook_id: str, timestamp: str, body: bytes) -> str:
    key = secret.removeprefix("whsec_").encode()
    message = f"{webhook_id}.{timestamp}.".encode() + body
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, *, now: float | None = None
) -> str:
    """Answer the webhook id if the signature is valid and the timestamp fresh; raise otherwise."""
    if not secret.removeprefix("whsec_"):
        # An empty key would make every forged signature computable: refuse everything.
        raise WebhookRejected("no WaveSpeed webhook secret is configured")
    webhook_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not (webhook_id and timestamp and signatures):
        raise WebhookRejected("missing webhook-id, webhook-timestamp or webhook-signature")
    if not (webhook_id + timestamp + signatures).isascii():
        # Headers arrive decoded as Latin-1; what is not ASCII was never signed by WaveSpeed.
        raise WebhookRejected("webhook headers must be ASCII")
    if len(webhook_id) > MAX_ID_LENGTH:
        raise WebhookRejected(f"webhook-id is longer than {MAX_ID_LENGTH} characters")
    try:
        sent = int(timestamp)
    except ValueError as exc:
        raise WebhookRejected("webhook-timestamp is not unix seconds") from exc
    if abs((now if now is not None else time.time()) - sent) > TOLERANCE_SECONDS:
        raise WebhookRejected("webhook-timestamp outside the 300 s tolerance")
    expected = sign(secret, webhook_id, timestamp, body)
    for candidate in signatures.split():
        version, _, value = candidate.partition(",")
        if version == "v3" and hmac.compare_digest(value, expected):
            return webhook_id
    raise WebhookRejected("no valid signature")


def first_seen(session: Session, webhook_id: str) -> bool:
    """Record a WaveSpeed webhook id; False if it was seen before."""
    row = session.execute(
        pg_insert(WaveSpeedWebhook)
        .values(id=webhook_id)
        .on_conflict_do_nothing()
        .returning(WaveSpeedWebhook.id)
    ).first()
    return row is not None


def forget(session: Session, webhook_id: str) -> None:
    """Undo `first_seen` for a webhook that could not be taken, so its retry is."""
    session.execute(delete(WaveSpeedWebhook).where(WaveSpeedWebhook.id == webhook_id))


def prune(session: Session, older_than_seconds: float, limit: int = 5000) -> int:
    """Forget webhook ids old enough that WaveSpeed no longer retries them (a bounded batch,
    so one sweep never holds the table for long)."""
    before = func.now() - timedelta(seconds=older_than_seconds)
    oldest = select(WaveSpeedWebhook.id).where(WaveSpeedWebhook.received_at < before).limit(limit)
    result = session.execute(delete(WaveSpeedWebhook).where(WaveSpeedWebhook.id.in_(oldest)))
    return int(getattr(result, "rowcount", 0) or 0)
