"""The admission gate: which queued jobs may go to WaveSpeed now.

WaveSpeed caps concurrent tasks and submissions per minute per account tier. Rather than let
every submit message hit the cap and bounce, queued jobs wait in Postgres and this pump admits
as many as the gate allows, fairly: round-robin across tenants, oldest first within a tenant,
so one tenant's 10,000-job batch cannot starve another tenant's single job. One advisory lock
serialises the pump across every worker host, so the caps hold however many run it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

ADMISSION_LOCK = 0x6B6C696E67  # "kling": one pump at a time across every worker host

# In flight: submitting or processing at WaveSpeed, or admitted and about to be submitted.
_FAIR_CANDIDATES = text("""
WITH in_flight AS (
    SELECT tenant_id, count(*) AS n FROM jobs
    WHERE status IN ('submitting', 'processing') OR (status = 'queued' AND admitted_at IS NOT NULL)
    GROUP BY tenant_id
), waiting AS (
    SELECT id, tenant_id, created_at,
           row_number() OVER (PARTITION BY tenant_id ORDER BY created_at, id) AS rank
    FROM jobs
    WHERE status = 'queued' AND admitted_at IS NULL AND (not_before IS NULL OR not_before <= :now)
)
SELECT waiting.id FROM waiting LEFT JOIN in_flight USING (tenant_id)
WHERE waiting.rank + coalesce(in_flight.n, 0) <= :tenant_cap
ORDER BY waiting.rank, waiting.created_at, waiting.id
LIMIT :free
""")

_USAGE = text("""
SELECT
    count(*) FILTER (WHERE status IN ('submitting', 'processing')
                     OR (status = 'queued' AND admitted_at IS NOT NULL)) AS in_flight,
    count(*) FILTER (WHERE last_submit_at > :minute_ago
                     OR (status = 'queued' AND admitted_at IS NOT NULL)) AS last_minute
FROM jobs
WHERE status IN ('queued', 'submitting', 'processing') OR last_submit_at > :minute_ago
""")


@dataclass(frozen=True)
class Gate:
    max_in_flight: int
    per_minute: int
    tenant_max_in_flight: int


def admit(session: Session, gate: Gate, now: datetime, minute_ago: datetime) -> Sequence[uuid.UUID]:
    """Mark the next fair batch of queued jobs admitted (within the caller's transaction) and
    answer their ids; the caller sends their submit tasks after commit."""
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADMISSION_LOCK})
    usage = session.execute(_USAGE, {"minute_ago": minute_ago}).one()
    # `last_submit_at` keeps only a job's latest attempt, so a job retried within the minute
    # counts once: the rate is a close lower bound, which WaveSpeed's 429 backs up.
    free = min(gate.max_in_flight - usage.in_flight, gate.per_minute - usage.last_minute)
    if free <= 0:
        return []
    ids = session.scalars(
        _FAIR_CANDIDATES, {"now": now, "tenant_cap": gate.tenant_max_in_flight, "free": free}
    ).all()
    if ids:
        session.execute(
            text("UPDATE jobs SET admitted_at = :now WHERE id = ANY(:ids)"),
            {"now": now, "ids": list(ids)},
        )
    return ids
