"""Finds work whose message is gone (broker flushed, worker killed) and asks for it again.

Run by beat every few seconds, possibly on several hosts at once: rows are claimed with
SKIP LOCKED and every task it sends is idempotent, so overlap costs a duplicate message at most.
Each job's step is due at `due_at`; a step more than its grace overdue is resent. Every resend
is counted on the row, and a step resent `reconcile_max_resends` times is put aside for an
operator (`kling quarantine`) instead of being resent for ever. Cutoffs are on the database's
clock.

A job that looks overdue may only be waiting behind a backlog. While its queue still holds
messages the sweep for that queue allows `reconcile_backlog_grace_seconds` more lateness: its
consumers are busy, and re-sending would only lengthen the queue that made the job late
(measured in docs/benchmarks.md: as many re-sends as jobs, many times over, once a backlog
outgrew the grace). A flushed or restarted broker empties the queues, so a lost message is
found at the first sweep after its queue drained; under a backlog that never drains, within
the longer grace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy.orm import Session

from workers import (
    bulk,
    callbacks,
    dispatch,
    jobs,
    metrics,
    quarantine,
    replies,
    retention,
    webhook_in,
)
from workers.dispatch import RECOVER
from workers.models import Job
from workers.outbox import relay
from workers.pipeline import Pipeline
from workers.states import JobState
from workers.work import Work

log = structlog.get_logger(__name__)

# WaveSpeed retries a webhook for minutes; its id is remembered far longer than that.
WEBHOOK_ID_RETENTION_SECONDS = 3 * 86400.0


@dataclass(frozen=True)
class Sweep:
    """Jobs in `state` whose `column` is `grace` seconds past get `task` again."""

    state: JobState
    column: Any
    grace: float
    task: str


def sweeps(pipeline: Pipeline) -> list[Sweep]:
    settings = pipeline.settings
    return [
        Sweep(JobState.PROCESSING, Job.due_at, settings.poll_overdue_grace_seconds, dispatch.POLL),
        # Due once the POST must have answered, or when the next history lookup is.
        Sweep(JobState.SUBMITTING, Job.due_at, settings.poll_overdue_grace_seconds, RECOVER),
        # Due when a failed try may run again, or when a running try's lease ends.
        Sweep(JobState.STORING, Job.due_at, settings.outbox_grace_seconds, dispatch.STORE),
        # Admitted, but the submit message never arrived.
        Sweep(JobState.QUEUED, Job.admitted_at, settings.outbox_grace_seconds, dispatch.SUBMIT),
        # Stopped, or deleted, with a prediction still to delete at WaveSpeed
        # (`Pipeline.withdraw`).
        *(
            Sweep(state, Job.due_at, settings.poll_overdue_grace_seconds, dispatch.WITHDRAW)
            for state in (JobState.CANCELLED, JobState.FAILED, JobState.COMPLETED)
        ),
    ]


def reconcile(pipeline: Pipeline) -> dict[str, int]:
    """One sweep; answers how many items of each kind it re-sent, and how many jobs the
    admission gate let through (retries whose backoff ended, capacity freed elsewhere)."""
    sessions, send, settings = pipeline.sessions, pipeline.dispatch, pipeline.settings
    plan = sweeps(pipeline)
    tasks = {s.task for s in plan} | {dispatch.BULK, dispatch.REPLY}
    backlog = {q: send.waiting(q) for q in sorted({dispatch.ROUTES[t] for t in tasks})}

    def grace(base: float, task: str) -> float:
        """Lateness allowed to `task`'s work: more while its queue still holds a backlog."""
        queued = backlog[dispatch.ROUTES[task]]
        return base + (settings.reconcile_backlog_grace_seconds if queued else 0.0)

    # A new job's outbox row is settled by its submit task: under a backlog of submits, it
    # is late only because that queue is, like the sweeps' work.
    outbox_grace = grace(settings.outbox_grace_seconds, dispatch.SUBMIT)
    counts = {"outbox": relay(sessions, send, older_than=outbox_grace)}
    for sweep in plan:
        if backlog[dispatch.ROUTES[sweep.task]]:
            metrics.RECONCILER_DEFERRED.labels(str(sweep.state)).inc()
        counts[str(sweep.state)] = _sweep(pipeline, sweep, grace(sweep.grace, sweep.task))
    with pipeline.work() as work:
        now = pipeline.clock()
        deliveries = callbacks.due(work.session, now)
        webhook_in.prune(work.session, WEBHOOK_ID_RETENTION_SECONDS)
        for delivery_id in deliveries:
            work.send(dispatch.NOTIFY, delivery_id)
        reply_grace = grace(settings.outbox_grace_seconds, dispatch.REPLY)
        lost = replies.due(work.session, now, reply_grace, settings.reply_max_attempts)
        for reply_id in lost:
            work.send(dispatch.REPLY, reply_id)
        bulk_grace = grace(settings.outbox_grace_seconds, dispatch.BULK)
        actions = bulk.stalled(work.session, bulk_grace, settings.reconcile_max_resends)
        for action_id in actions:
            work.send(dispatch.BULK, action_id)
    _stop_if_unsent(work)
    counts["callbacks"] = len(deliveries)
    counts["replies"] = len(lost)
    counts["bulk"] = len(actions)
    for kind, count in counts.items():
        metrics.RECONCILER_RESENT.labels(kind).inc(count)
    counts["expired"] = pipeline.expire_due()
    counts["admitted"] = pipeline.admit()
    # Last: its S3 calls must not hold up the gate.
    counts["deleted"] = retention.sweep(pipeline)
    if any(counts.values()):
        log.info("reconcile.resent", **counts, backlog={q: n for q, n in backlog.items() if n})
    return counts


def _sweep(pipeline: Pipeline, sweep: Sweep, grace: float) -> int:
    cap = pipeline.settings.reconcile_max_resends
    with pipeline.work() as work:
        rows = jobs.overdue(work.session, sweep.state, sweep.column, grace)
        resend = [row for row in rows if row.resends < cap]
        for row in rows:
            if row.resends >= cap:
                _put_aside(work.session, sweep, row.id, row.resends)
        # Touch the rows so the next sweep does not resend before this message had its chance.
        jobs.touch(work.session, [row.id for row in resend])
        for row in resend:
            # A recover message names the attempt it is for, so a late one finds itself stale.
            extra = {"attempt": row.submit_attempts} if sweep.task == RECOVER else {}
            work.send(sweep.task, row.id, trace=row.traceparent, **extra)
    _stop_if_unsent(work)
    return len(resend)


def _stop_if_unsent(work: Work) -> None:
    """The broker refused a resend: end this tick rather than count more resends, each a
    step towards putting a job aside, for messages that cannot go out."""
    if work.unsent is not None:
        raise work.unsent


def _put_aside(session: Session, sweep: Sweep, job_id: Any, resends: int) -> None:
    reason = f"{sweep.state} step resent {resends} times without progress"
    if quarantine.put_aside(session, sweep.task, job_id, reason, resends):
        jobs.note(session, job_id, f"{sweep.task} put aside: {reason}")
