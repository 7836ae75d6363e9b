"""Where a job stands and when it should be done: its place at the admission gate and its
estimated start and completion, refreshed on every read.

- **Queue position**: the waiting jobs the gate would admit before this one, in the gate's
  own order (`workers.admission`): higher priorities first, then the weighted round-robin of
  tenants, then age. One window query ranks the waiting jobs for a whole page of records.
- **The gate's rate**: the jobs it admitted over the last five minutes, per second, once it
  admitted at least `MIN_SAMPLE` there (what it really achieved, WaveSpeed's 429s included);
  before that, the rate its caps allow: `SUBMITS_PER_MINUTE`, and `MAX_IN_FLIGHT` slots each
  held for the in-flight time observed recently.
- **The tenant's share**: its jobs ahead of this one, at the rate its own quotas allow
  (`max_in_flight` over the in-flight time, `submits_per_minute`), when that is slower.
- **Start** = now + the longer of (position / gate rate) and (place in the tenant's line /
  the tenant's rate). **Completion** = start + the submit-to-completed time observed over the
  last hour for jobs of its duration (WaveSpeed's queue, inference and our store), or, with
  no such job yet, the first poll's delay for the duration plus `STORE_GUESS_SECONDS`.

The observed times (one query) are kept for `ttl` seconds per process: a page of 100 records
costs one query for the places, plus that one at most every `ttl` seconds.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session

from config import Settings
from workers.models import Job
from workers.states import JobState

# Admissions in the window before the observed rate is trusted over the caps' rate.
MIN_SAMPLE = 10
WINDOW_SECONDS = 300.0
# A guess at the store's share of a job before any job was seen to complete.
STORE_GUESS_SECONDS = 10.0
# The id of the job a dry run would make, ranked among the real ones.
WOULD_BE = uuid.UUID(int=0)

_OBSERVED = text("""
SELECT duration,
       count(*) FILTER (WHERE last_submit_at > now() - make_interval(secs => :window)) AS recent,
       avg(extract(epoch FROM output_at - submitted_at))
           FILTER (WHERE status = 'completed') AS in_flight,
       avg(extract(epoch FROM completed_at - submitted_at))
           FILTER (WHERE status = 'completed') AS total,
       now() AS now
FROM jobs
WHERE last_submit_at > now() - interval '1 hour'
GROUP BY duration
""")

# The gate's order (`admission._FAIR_CANDIDATES`) over every waiting job, plus, for a dry
# run, the job that would be made now (`WOULD_BE`; no tenant: none).
_POSITIONS = text("""
WITH waiting AS (
    SELECT id, tenant_id, priority, created_at FROM jobs
    WHERE status = 'queued' AND admitted_at IS NULL
    UNION ALL
    SELECT CAST(:would_be AS uuid), CAST(:tenant AS varchar), CAST(:priority AS smallint), now()
    WHERE CAST(:tenant AS varchar) IS NOT NULL
), turns AS (
    SELECT waiting.*,
           row_number() OVER (PARTITION BY tenant_id ORDER BY priority, created_at, id) AS place,
           row_number() OVER (PARTITION BY tenant_id, priority ORDER BY created_at, id) AS turn
    FROM waiting
), ranked AS (
    SELECT turns.id, turns.place, tenants.max_in_flight, tenants.submits_per_minute,
           row_number() OVER (ORDER BY turns.priority, (turns.turn - 1) / tenants.weight,
                                       turns.created_at, turns.id) AS position
    FROM turns JOIN tenants ON tenants.id = turns.tenant_id
)
SELECT id, position - 1 AS ahead, place - 1 AS ahead_in_tenant, max_in_flight,
       submits_per_minute
FROM ranked WHERE id = ANY(:ids)
""")


@dataclass(frozen=True)
class Observed:
    """What the last hour says: admissions in the window, and per duration the mean
    seconds a job held a gate slot (`in_flight`) and took from submit to completed."""

    admitted: int
    in_flight: dict[int, float]
    total: dict[int, float]
    now: datetime


@dataclass(frozen=True)
class Place:
    """A waiting job's place at the gate, and its tenant's own quotas (None: the default)."""

    ahead: int
    ahead_in_tenant: int
    tenant_max_in_flight: int | None = None
    tenant_submits_per_minute: int | None = None


@dataclass(frozen=True)
class Estimate:
    queue_position: int | None = None
    estimated_start_at: datetime | None = None
    estimated_completion_at: datetime | None = None


def observe(session: Session) -> Observed | None:
    rows = session.execute(_OBSERVED, {"window": WINDOW_SECONDS}).all()
    if not rows:
        return None
    return Observed(
        admitted=sum(row.recent for row in rows),
        in_flight={row.duration: float(row.in_flight) for row in rows if row.in_flight},
        total={row.duration: float(row.total) for row in rows if row.total},
        now=rows[0].now,
    )


def places(
    session: Session,
    job_ids: Sequence[uuid.UUID],
    would_be: tuple[str, int] | None = None,
) -> dict[uuid.UUID, Place]:
    """The place of each waiting job among `job_ids` at the gate (one query); with
    `would_be` (tenant, priority), also that of the job a create would make now, under
    `WOULD_BE`."""
    ids = [*job_ids, WOULD_BE] if would_be else list(job_ids)
    if not ids:
        return {}
    tenant, priority = would_be or (None, None)
    rows = session.execute(
        _POSITIONS, {"ids": ids, "would_be": WOULD_BE, "tenant": tenant, "priority": priority}
    ).all()
    return {
        row.id: Place(row.ahead, row.ahead_in_tenant, row.max_in_flight, row.submits_per_minute)
        for row in rows
    }


class Estimator:
    """Estimates for the records a request answers. The observed times are shared by the
    process's threads and refreshed every `ttl` seconds."""

    def __init__(self, settings: Settings, ttl: float = 5.0) -> None:
        self._settings, self._ttl = settings, ttl
        self._lock = threading.Lock()
        self._observed: tuple[float, Observed | None] | None = None

    def observed(self, session: Session) -> Observed | None:
        with self._lock:
            cached = self._observed
        if cached is not None and time.monotonic() - cached[0] < self._ttl:
            return cached[1]
        fresh = observe(session)
        with self._lock:
            self._observed = (time.monotonic(), fresh)
        return fresh

    def of(
        self, session: Session, jobs: Sequence[Job], would_be: Job | None = None
    ) -> dict[uuid.UUID, Estimate]:
        """An estimate for each live job of `jobs` (and `would_be`, a job not made, whose
        place is ranked as if it were created now); ended jobs have none."""
        live = [job for job in jobs if not JobState(job.status).terminal]
        if not live and would_be is None:
            return {}
        waiting = [j.id for j in live if j.status == JobState.QUEUED and j.admitted_at is None]
        found = places(
            session, waiting, (would_be.tenant_id, would_be.priority) if would_be else None
        )
        observed = self.observed(session)
        now = observed.now if observed else datetime.now(UTC)
        answer = {job.id: self._estimate(job, found.get(job.id), observed, now) for job in live}
        if would_be is not None:
            answer[WOULD_BE] = self._estimate(would_be, found.get(WOULD_BE), observed, now)
        return answer

    def _estimate(
        self, job: Job, place: Place | None, observed: Observed | None, now: datetime
    ) -> Estimate:
        total = self._total(job.duration, observed)
        if place is None:  # admitted, at WaveSpeed, or being stored
            started = now if job.status == JobState.QUEUED else (job.last_submit_at or now)
            return Estimate(None, started, max(now, started + timedelta(seconds=total)))
        wait = max(
            place.ahead / self._gate_rate(job.duration, observed),
            place.ahead_in_tenant / self._tenant_rate(job.duration, place, observed),
        )
        start = now + timedelta(seconds=wait)
        return Estimate(place.ahead, start, start + timedelta(seconds=total))

    def _total(self, duration: int, observed: Observed | None) -> float:
        if observed and duration in observed.total:
            return observed.total[duration]
        first_poll = self._settings.poll_first_delay_seconds.get(duration, 90.0 * duration / 5)
        return first_poll + STORE_GUESS_SECONDS

    def _held(self, duration: int, observed: Observed | None) -> float:
        """Seconds a job of `duration` holds a gate slot."""
        if observed and duration in observed.in_flight:
            return max(observed.in_flight[duration], 1.0)
        return self._settings.poll_first_delay_seconds.get(duration, 90.0 * duration / 5)

    def _gate_rate(self, duration: int, observed: Observed | None) -> float:
        settings = self._settings
        caps = min(
            settings.submits_per_minute / 60,
            settings.max_in_flight / self._held(duration, observed),
        )
        if observed and observed.admitted >= MIN_SAMPLE:
            return min(caps, observed.admitted / WINDOW_SECONDS)
        return caps

    def _tenant_rate(self, duration: int, place: Place, observed: Observed | None) -> float:
        settings = self._settings
        cap = place.tenant_max_in_flight or settings.tenant_max_in_flight or settings.max_in_flight
        rate = cap / self._held(duration, observed)
        own = place.tenant_submits_per_minute
        return min(rate, own / 60) if own else rate
