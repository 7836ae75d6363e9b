"""Finds work whose message is gone (broker flushed, worker killed) and asks for it again.

Run by beat every few seconds, possibly on several hosts at once: rows are claimed with
SKIP LOCKED and every task it sends is idempotent, so overlap costs a duplicate message at most.

A job that looks overdue may only be waiting behind a backlog. While its queue still holds
messages the sweep for that queue allows `reconcile_backlog_grace_seconds` more lateness: its
consumers are busy, and re-sending would only lengthen the queue that made the job late
(measured in docs/benchmarks.md: as many re-sends as jobs, many times over, once a backlog
outgrew the grace). A flushed or restarted broker empties the queues, so a lost message is
found at the first sweep after its queue drained; under a backlog that never drains, within
the longer grace.
"""

from __future__ import annotations

from datetime import timedelta

import structlog
from sqlalchemy.orm import Session, sessionmaker

from workers import callbacks, dispatch, jobs, metrics
from workers.db import unit_of_work
from workers.models import Job
from workers.outbox import relay
from workers.pipeline import Pipeline
from workers.states import JobState

log = structlog.get_logger(__name__)


def reconcile(pipeline: Pipeline) -> dict[str, int]:
    """One sweep; answers how many items of each kind it re-sent, and how many jobs the
    admission gate let through (retries whose backoff ended, capacity freed elsewhere)."""
    sessions, send, settings = pipeline.sessions, pipeline.dispatch, pipeline.settings
    now = pipeline.clock()
    counts = {
        "outbox": relay(
            sessions, send, older_than=now - timedelta(seconds=settings.outbox_grace_seconds)
        )
    }
    # (state, column that shows progress, how stale it may get, task, when to look again)
    sweeps = [
        (JobState.PROCESSING, Job.next_poll_at, settings.poll_overdue_grace_seconds, dispatch.POLL),
        (
            JobState.SUBMITTING,
            Job.last_submit_at,
            settings.wavespeed_read_timeout + settings.poll_overdue_grace_seconds,
            dispatch.RECOVER,
        ),
        (JobState.STORING, Job.updated_at, settings.store_stall_seconds, dispatch.STORE),
        # Admitted, but the submit message never arrived.
        (JobState.QUEUED, Job.admitted_at, settings.outbox_grace_seconds, dispatch.SUBMIT),
    ]
    backlog = {q: send.waiting(q) for q in sorted({dispatch.ROUTES[t] for *_, t in sweeps})}
    for state, column, grace, task in sweeps:
        if backlog[dispatch.ROUTES[task]]:
            metrics.RECONCILER_DEFERRED.labels(str(state)).inc()
            grace += settings.reconcile_backlog_grace_seconds
        counts[str(state)] = _sweep(
            sessions, send, state, column, now - timedelta(seconds=grace), task
        )
    with unit_of_work(sessions) as session:
        deliveries = callbacks.due(session, now)
    for delivery_id in deliveries:
        send(dispatch.NOTIFY, delivery_id)
    counts["callbacks"] = len(deliveries)
    for kind, count in counts.items():
        metrics.RECONCILER_RESENT.labels(kind).inc(count)
    counts["admitted"] = pipeline.admit()
    if any(counts.values()):
        log.info("reconcile.resent", **counts, backlog={q: n for q, n in backlog.items() if n})
    return counts


def _sweep(
    sessions: sessionmaker[Session],
    send: dispatch.Dispatcher,
    state: JobState,
    column: object,
    before: object,
    task: str,
) -> int:
    with unit_of_work(sessions) as session:
        ids = jobs.overdue(session, state, column, before)  # type: ignore[arg-type]
        # Touch the rows so the next sweep does not resend before this message had its chance.
        jobs.touch(session, ids)
    for job_id in ids:
        send(task, job_id)
    return len(ids)
