"""The admission gate: which queued jobs may go to WaveSpeed now.

WaveSpeed caps concurrent tasks and submissions per minute per account tier. Rather than let
every submit message hit the cap and bounce, queued jobs wait in Postgres and this pump admits
as many as the gate allows: higher priorities first (a person waiting before a nightly batch),
then fairly, round-robin across tenants (a tenant of weight W takes W jobs a turn) and oldest
first within a tenant, so one tenant's 10,000-job batch cannot starve another tenant's single
job. A tenant's own quotas (`tenants.max_in_flight`, `submits_per_minute`) bound its share,
and the account's caps bound the sum. One advisory lock
serialises the pump across every worker host, so the caps hold however many run it.

Only a *parked* job (one whose own submit message already came and found it waiting) needs a
message from the gate. An unparked one still has its message on the way, and that message
claims it: so a burst of new jobs through an open gate costs one submit message each, not two.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session

from config.settings import Priority

ADMISSION_LOCK = 0x6B6C696E67  # "kling": one pump at a time across every worker host

# A job's priority as the gate orders it (`jobs.priority`), and back.
PRIORITIES: dict[Priority, int] = {"high": 0, "normal": 1, "low": 2}
PRIORITY_NAMES: dict[int, Priority] = {rank: name for name, rank in PRIORITIES.items()}

# In flight: submitting or processing at WaveSpeed, or admitted and about to be submitted.
# Two kinds hold no slot, so that a few of them cannot stop every admission: a job put aside
# for an operator, and an unanswered submit in recovery (past its time limit), which may be
# settled only at the recover deadline; if WaveSpeed did create it, a job admitted over the
# cap waits in WaveSpeed's queue rather than failing.
_FAIR_CANDIDATES = text("""
WITH in_flight AS (
    SELECT tenant_id, count(*) AS n FROM jobs
    WHERE (status = 'processing'
           OR (status = 'submitting'
               AND (last_submit_at IS NULL OR last_submit_at >= :recovering_before))
           OR (status = 'queued' AND admitted_at IS NOT NULL))
      AND NOT EXISTS (SELECT 1 FROM quarantined_tasks q
                      WHERE q.subject_id = jobs.id AND q.released_at IS NULL)
    GROUP BY tenant_id
), recent AS (
    -- Submits of the last minute, and admissions about to be, against a tenant's own rate.
    SELECT tenant_id, count(*) AS n FROM jobs
    WHERE last_submit_at > :minute_ago OR (status = 'queued' AND admitted_at IS NOT NULL)
    GROUP BY tenant_id
), waiting AS (
    SELECT id, tenant_id, created_at, priority,
           -- Its place in its tenant's own line, which the tenant's cap counts...
           row_number() OVER (PARTITION BY tenant_id ORDER BY priority, created_at, id) AS place,
           -- ...and its turn among the tenant's jobs of its priority: the round-robin.
           row_number() OVER (PARTITION BY tenant_id, priority ORDER BY created_at, id) AS turn
    FROM jobs
    WHERE status = 'queued' AND admitted_at IS NULL AND (not_before IS NULL OR not_before <= :now)
      -- Past its start deadline and never submitted: it expires instead (Pipeline.expire_due).
      AND (start_deadline_at IS NULL OR start_deadline_at > now() OR submit_attempts > 0)
      -- Past its own deadline: it fails instead.
      AND (deadline_at IS NULL OR deadline_at > now())
)
SELECT waiting.id
FROM waiting
JOIN tenants ON tenants.id = waiting.tenant_id
LEFT JOIN in_flight USING (tenant_id)
LEFT JOIN recent USING (tenant_id)
WHERE waiting.place + coalesce(in_flight.n, 0) <= coalesce(tenants.max_in_flight, :tenant_cap)
  AND (tenants.submits_per_minute IS NULL
       OR waiting.place + coalesce(recent.n, 0) <= tenants.submits_per_minute)
-- Weighted round-robin: a tenant of weight W has W jobs in each turn.
ORDER BY waiting.priority, (waiting.turn - 1) / tenants.weight, waiting.created_at, waiting.id
LIMIT :free
""")

_USAGE = text("""
SELECT
    count(*) FILTER (WHERE (status = 'processing'
                            OR (status = 'submitting'
               AND (last_submit_at IS NULL OR last_submit_at >= :recovering_before))
                            OR (status = 'queued' AND admitted_at IS NOT NULL))
                           AND NOT EXISTS (SELECT 1 FROM quarantined_tasks q
                                           WHERE q.subject_id = jobs.id
                                             AND q.released_at IS NULL)) AS in_flight,
    count(*) FILTER (WHERE last_submit_at > :minute_ago
                     OR (status = 'queued' AND admitted_at IS NOT NULL)) AS last_minute
FROM jobs
WHERE status IN ('queued', 'submitting', 'processing') OR last_submit_at > :minute_ago
""")


# Cheap and lock-free: most calls (one after every completion) find nobody waiting.
_ANY_WAITING = text("""
SELECT EXISTS (
    SELECT 1 FROM jobs
    WHERE status = 'queued' AND admitted_at IS NULL AND (not_before IS NULL OR not_before <= :now)
)
""")

# Marks the batch admitted and tells which of them were parked (and so need a message).
_MARK_ADMITTED = text("""
UPDATE jobs SET admitted_at = :now, parked_at = NULL
FROM (SELECT id, parked_at FROM jobs WHERE id = ANY(:ids) FOR UPDATE) AS before
WHERE jobs.id = before.id
RETURNING jobs.id, before.parked_at IS NOT NULL AS parked
""")


# Records that a queued, unadmitted job has no submit message on its way any more.
_PARK = text("""
UPDATE jobs SET parked_at = :now WHERE id = :id AND status = 'queued' AND admitted_at IS NULL
""")


@dataclass(frozen=True)
class Usage:
    """The gate's two budgets as they stand: predictions in flight, and submits in the last
    minute (admitted jobs count in both: their submit is on its way)."""

    in_flight: int
    last_minute: int


@dataclass(frozen=True)
class Admitted:
    job_id: uuid.UUID
    # No submit message is on its way to this job: the caller must send one.
    needs_message: bool


@dataclass(frozen=True)
class Gate:
    max_in_flight: int
    per_minute: int
    tenant_max_in_flight: int
    # A submit claimed longer ago than this is in recovery (`submit_time_limit_seconds`).
    recovery_after: timedelta = timedelta(seconds=90)


def usage(session: Session, gate: Gate, now: datetime, minute_ago: datetime) -> Usage:
    """What the gate counts against `gate.max_in_flight` and `gate.per_minute`."""
    row = session.execute(
        _USAGE, {"minute_ago": minute_ago, "recovering_before": now - gate.recovery_after}
    ).one()
    return Usage(in_flight=int(row.in_flight), last_minute=int(row.last_minute))


def anyone_waiting(session: Session, now: datetime) -> bool:
    """Whether some queued job waits for the gate to admit it."""
    return bool(session.scalar(_ANY_WAITING, {"now": now}))


def admit(
    session: Session,
    gate: Gate,
    now: datetime,
    minute_ago: datetime,
    park: uuid.UUID | None = None,
) -> list[Admitted]:
    """Mark the next fair batch of queued jobs admitted (within the caller's transaction) and
    answer them; the caller sends the submit tasks the parked ones need after commit.

    `park` is a queued job whose own submit message just found it unadmitted: it is parked
    first, under the gate's lock, so the gate sends it a message whenever it admits it later.
    """
    if park is None and not anyone_waiting(session, now):
        return []
    # The lock comes before any job row: admitting locks its candidates' rows under it, so a
    # row locked first (by parking) would invert the order and deadlock with another gate pass.
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADMISSION_LOCK})
    if park is not None:
        session.execute(_PARK, {"now": now, "id": park})
    recovering_before = now - gate.recovery_after
    used = usage(session, gate, now, minute_ago)
    # `last_submit_at` keeps only a job's latest attempt, so a job retried within the minute
    # counts once: the rate is a close lower bound, which WaveSpeed's 429 backs up.
    free = min(gate.max_in_flight - used.in_flight, gate.per_minute - used.last_minute)
    if free <= 0:
        return []
    ids = session.scalars(
        _FAIR_CANDIDATES,
        {"now": now, "tenant_cap": gate.tenant_max_in_flight, "free": free,
         "recovering_before": recovering_before, "minute_ago": minute_ago},
    ).all()  # fmt: skip
    if not ids:
        return []
    rows = session.execute(_MARK_ADMITTED, {"now": now, "ids": list(ids)}).all()
    parked = {row.id: row.parked for row in rows}
    # In the gate's fair order, which the UPDATE's RETURNING does not keep.
    return [Admitted(job_id, parked[job_id]) for job_id in ids]
