"""Queries on the job aggregate: creation, conditional transitions, reads. The only place
that writes `jobs` and `job_events`."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Interval,
    Row,
    Table,
    bindparam,
    exists,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from workers import metrics
from workers.models import (
    Job,
    JobEvent,
    QuarantinedTask,
)
from workers.states import JobState, can_transition

# The hot statements run as Core on the session's connection: the ORM's bulk-update layer
# over them cost about a quarter of each transition's CPU and gave nothing back (no object
# is synchronised: `synchronize_session=False` everywhere). Values are given by attribute
# name and mapped to columns here (`metadata_` is column `metadata`). The ones every job
# runs are built once, with bound parameters (`Transition`, `_GET`, the claims).
_JOBS = cast(Table, Job.__table__)
_COLUMN = {attr.key: attr.columns[0].key for attr in Job.__mapper__.column_attrs}
_EVENTS = cast(Table, JobEvent.__table__)
_EVENT_COLUMNS = ["job_id", "from_state", "to_state", "reason"]
# The bound parameters every statement built once for one job takes.
_JOB_ID = bindparam("job_id", type_=_JOBS.c.id.type)
_REASON = bindparam("reason", type_=_EVENTS.c.reason.type)


def _columns(values: dict[str, Any]) -> dict[str, Any]:
    return {_COLUMN[name]: value for name, value in values.items()}


def _execute(session: Session, statement: Any, params: dict[str, Any] | None = None) -> Any:
    """Run a Core statement in the session's transaction, after what the session holds
    unflushed (as its own `execute` would: a row added just before is there to be seen)."""
    session.flush()
    return session.connection().execute(statement, params)


def _recorded(
    change: Any, left: ColumnElement[Any], dst: JobState, reason: ColumnElement[str] | None,
    *, answer: bool = False,
) -> Any:  # fmt: skip
    """The conditional UPDATE `change` of one job that also adds to its history, when it
    matches, that it went from `left` (read from the row as it was) to `dst` for the bound
    `reason` (or for `reason` read from the row as the change left it): one statement, and
    one round trip, instead of two. It answers a row if it matched: the job as the change
    left it with `answer`, else the event's id."""
    answered = [*_JOBS.c] if answer else [_JOBS.c.id]
    if reason is not None:
        answered.append(reason.label("reason"))
    moved = change.returning(*answered, left.label("from_state")).cte("moved")
    said = _REASON if reason is None else moved.c.reason
    event = select(moved.c.id, moved.c.from_state, literal(dst.value), said)
    recorded = insert(_EVENTS).from_select(_EVENT_COLUMNS, event)
    if not answer:
        return recorded.returning(_EVENTS.c.id)
    # Postgres runs a data-modifying WITH whether or not the query reads it.
    job = aliased(Job, moved)
    return select(job).add_cte(recorded.cte("recorded")).execution_options(populate_existing=True)


class JobNotFound(LookupError):
    """A task or request named a job id that is not in the database."""


def db_in(seconds: float) -> ColumnElement[datetime]:
    """The database's `now()` plus `seconds`. Due times and cutoffs are all on the database's
    clock, so workers whose clocks disagree still agree on what is due."""
    return func.now() + timedelta(seconds=seconds)


_GET = select(Job).where(Job.id == _JOB_ID).execution_options(populate_existing=True)


def get(session: Session, job_id: uuid.UUID) -> Job:
    """The job as it is in the database now (what the session held of it is refreshed)."""
    job = session.execute(_GET, {"job_id": job_id}).scalar_one_or_none()
    if job is None:
        raise JobNotFound(str(job_id))
    return job


def create(session: Session, job: Job) -> Job:
    """Insert a queued job and its first event into the caller's transaction, so both commit
    (or vanish) together with the job's first task (`Work.send_durable`)."""
    job.status = JobState.QUEUED
    session.add(job)
    session.flush()
    session.add(
        JobEvent(job_id=job.id, from_state=None, to_state=JobState.QUEUED, reason="accepted")
    )
    session.flush()
    metrics.TRANSITIONS.labels(JobState.QUEUED).inc()
    return job


class Transition:
    """A conditional move of one job from `src` to `dst` (while `when` holds), setting
    `values` and adding the event to its history, as one statement built once.

    What differs from call to call is a bound parameter: the job always, the reason unless
    the transition reads it from the row it moved (`reason`, an expression over the job's
    columns as the move left them), and any `bindparam(name)` in `when` or `values`, given
    by name when it runs. The steps every job takes keep theirs in a module constant, so a
    job pays for executing it, not for building it and its cache key again (about half of
    a statement's CPU here); `transition` builds one for a single use.

    One conditional UPDATE: of two workers racing on the same job exactly one wins, and a
    duplicate or late message finds the row elsewhere and changes nothing.
    """

    def __init__(
        self,
        src: JobState | Sequence[JobState],
        dst: JobState,
        *,
        when: ColumnElement[bool] | None = None,
        reason: ColumnElement[str] | None = None,
        **values: Any,
    ) -> None:
        sources = [src] if isinstance(src, JobState) else list(src)
        assert all(can_transition(s, dst) for s in sources), (sources, dst)
        self.dst = dst
        self._reason = reason
        # A new step starts with no failures and no resends of its own.
        values = {"step_failures": 0, "resends": 0, **values}
        change = update(_JOBS).values(status=dst, updated_at=func.now(), **_columns(values))
        left: ColumnElement[Any]
        if len(sources) == 1:
            # Matched, the job can only have left this state: nothing to read back.
            change = change.where(_JOBS.c.id == _JOB_ID, _JOBS.c.status == sources[0])
            left = literal(sources[0].value)
            if when is not None:
                change = change.where(when)
        else:
            # Lock the row and read its current state in the same statement, so the event
            # records the state the job really left.
            locked = select(_JOBS.c.id, _JOBS.c.status).where(_JOBS.c.id == _JOB_ID)
            if when is not None:
                locked = locked.where(when)
            old = locked.with_for_update().subquery()
            change = change.where(_JOBS.c.id == old.c.id, old.c.status.in_(sources))
            left = old.c.status
        self._change, self._left = change, left

    @functools.cached_property
    def statement(self) -> Any:
        """The move, answering the event's id if it happened."""
        return _recorded(self._change, self._left, self.dst, self._reason)

    @functools.cached_property
    def params(self) -> frozenset[str]:
        """Its own `bindparam`s: an UPDATE would take any other name that is a column's as one
        more value to set, and a misspelt one would be dropped without a word. Compiled once,
        and only for a transition that takes some (`transition`'s one-use ones take none)."""
        return frozenset(self.statement.compile(dialect=postgresql.dialect()).params)

    def __call__(
        self, session: Session, job_id: uuid.UUID, *, reason: str | None = None, **params: Any
    ) -> bool:
        """Whether the job moved; `params` are the values of the statement's own
        `bindparam`s. `reason` is given unless the transition reads its own."""
        params = self._params(job_id, reason, params)
        return self._counted(_execute(session, self.statement, params).first())

    def moved(
        self, session: Session, job_id: uuid.UUID, *, reason: str | None = None, **params: Any
    ) -> Job | None:
        """As calling it, but answers the job as the move left it (None if it did not move):
        a step that goes on to announce the job reads it in the same round trip."""
        params = self._params(job_id, reason, params)
        job = session.execute(self._answering, params).scalar_one_or_none()
        self._counted(job)
        return job

    @functools.cached_property
    def _answering(self) -> Any:
        """The move, answering the job as it left it."""
        return _recorded(self._change, self._left, self.dst, self._reason, answer=True)

    def _params(
        self, job_id: uuid.UUID, reason: str | None, params: dict[str, Any]
    ) -> dict[str, Any]:
        if params and (unknown := params.keys() - self.params):
            raise TypeError(f"not parameters of this transition: {sorted(unknown)}")
        if (reason is None) == (self._reason is None):
            raise TypeError("a reason is given exactly when the transition has none of its own")
        given = {} if reason is None else {"reason": reason}
        return {"job_id": job_id, **given, **params}

    def _counted(self, moved: object) -> bool:
        if moved is None:
            return False
        metrics.TRANSITIONS.labels(self.dst).inc()
        return True


def transition(
    session: Session,
    job_id: uuid.UUID,
    src: JobState | Sequence[JobState],
    dst: JobState,
    *,
    reason: str,
    when: ColumnElement[bool] | None = None,
    **values: Any,
) -> bool:
    """Move a job from `src` to `dst` if, and only if, it is still in `src` (and `when` holds),
    with a statement built for this call (`Transition`)."""
    return Transition(src, dst, when=when, **values)(session, job_id, reason=reason)


def update_fields(
    session: Session,
    job_id: uuid.UUID,
    state: JobState,
    *,
    when: ColumnElement[bool] | None = None,
    note: str | None = None,
    **values: Any,
) -> bool:
    """Change fields of a job that is still in `state` (and matches `when`), without a
    transition; `note` records why in the job's history (a retry of its step, say). A try
    of the step that ran and recorded its failure is progress: its message got through, so
    the resends so far (counted against `reconcile_max_resends`) start again from zero."""
    if "step_failures" in values:
        values.setdefault("resends", 0)
    query = update(_JOBS).where(_JOBS.c.id == job_id, _JOBS.c.status == state)
    if when is not None:
        query = query.where(when)
    query = query.values(updated_at=func.now(), **_columns(values))
    if note:
        recorded = _recorded(query, literal(state.value), state, None)
        return _execute(session, recorded, {"reason": note}).first() is not None
    return _execute(session, query.returning(_JOBS.c.id)).first() is not None


def note(session: Session, job_id: uuid.UUID, reason: str) -> None:
    """Add `reason` to the job's history without changing it (nothing if there is no job)."""
    session.execute(
        insert(JobEvent).from_select(
            ["job_id", "from_state", "to_state", "reason"],
            select(Job.id, Job.status, Job.status, literal(reason)).where(Job.id == job_id),
        )
    )


def events(session: Session, job_id: uuid.UUID) -> Sequence[JobEvent]:
    return session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
    ).all()


def state_changes(session: Session, job_id: uuid.UUID, after: int) -> Sequence[JobEvent]:
    """The job's transitions after event `after`, oldest first (notes left out). They are
    written under the job's row lock, so their ids follow the order they committed in."""
    return session.scalars(
        select(JobEvent)
        .where(
            JobEvent.job_id == job_id,
            JobEvent.id > after,
            JobEvent.from_state.is_distinct_from(JobEvent.to_state),
        )
        .order_by(JobEvent.id)
    ).all()


@dataclass(frozen=True, slots=True)
class Chain:
    """A processing job as the poll that took its chain sees it, read back by the claim: the
    columns a poll and what it settles read, as plain values. Every check of every job
    claims, and the ORM's row of all 55 columns cost that claim half its CPU."""

    id: uuid.UUID
    tenant_id: str
    prediction_id: str | None
    poll_seq: int
    due_at: datetime | None
    step_failures: int
    resends: int
    submit_attempts: int
    submitted_at: datetime | None
    created_at: datetime


def _chain_claim(condition: ColumnElement[bool] | None = None, **values: Any) -> Any:
    """A claim of a processing job's poll chain (`_JOB_ID`), bumping `poll_seq`, that answers
    the `Chain` and the database's time."""
    claim = update(_JOBS).where(_JOBS.c.id == _JOB_ID, _JOBS.c.status == JobState.PROCESSING)
    return (
        (claim if condition is None else claim.where(condition))
        .values(updated_at=func.now(), poll_seq=_JOBS.c.poll_seq + 1, **values)
        .returning(*(_JOBS.c[field.name] for field in fields(Chain)), func.now())
    )


_POLL_SEQ = bindparam("seq", type_=_JOBS.c.poll_seq.type)
# The chain `seq` goes on, and books its next check (`next_check` from now) in the same
# statement: a poll that finds the prediction still running has nothing more to write. A
# chain with no `seq` takes over from any other; it cannot know its next check yet.
_CONTINUE_CHAIN = _chain_claim(
    _JOBS.c.poll_seq == _POLL_SEQ, due_at=func.now() + bindparam("next_check", type_=Interval())
)
_TAKE_CHAIN = _chain_claim()
# A store reads most of the job, once a job, so its claim answers the ORM's row. The ORM's
# bulk UPDATE on purpose: the same UPDATE as a CTE read back through `aliased` (as
# `Transition.moved` is) cost less alone, but made the API's WaveSpeed webhooks 13 times
# costlier under load, for a reason not yet found (docs/benchmarks.md, 2026-12-07).
_CLAIM_STORE = (
    update(Job)
    .where(Job.id == _JOB_ID, Job.status == JobState.STORING, Job.due_at <= func.now())
    .values(updated_at=func.now(), due_at=func.now() + bindparam("lease", type_=Interval()))
    .returning(Job, func.now())
    .execution_options(synchronize_session=False, populate_existing=True)
)


def continue_poll_chain(
    session: Session, job_id: uuid.UUID, seq: int, next_check: float
) -> tuple[Chain, datetime] | None:
    """Take the poll chain of a processing job if the caller's `seq` is current (bumping
    `poll_seq`), and book the chain's next check `next_check` seconds from now (its
    `due_at`). Answers the row and the database's time, or None when the job moved on or
    another chain owns it."""
    params = {"job_id": job_id, "seq": seq, "next_check": timedelta(seconds=next_check)}
    return _chain(session, _CONTINUE_CHAIN, params)


def take_poll_chain(session: Session, job_id: uuid.UUID) -> tuple[Chain, datetime] | None:
    """Take the poll chain of a processing job over from any other (a webhook, the
    reconciler's resend), bumping `poll_seq`; nothing is booked. Answers the row and the
    database's time, or None when the job is not processing."""
    return _chain(session, _TAKE_CHAIN, {"job_id": job_id})


def _chain(session: Session, claim: Any, params: dict[str, Any]) -> tuple[Chain, datetime] | None:
    row = _execute(session, claim, params).first()
    return (Chain(*row[:-1]), row[-1]) if row is not None else None


def claim_store(
    session: Session, job_id: uuid.UUID, lease_seconds: float
) -> tuple[Job, datetime] | None:
    """Take a storing job whose try is due, for `lease_seconds`: a duplicate message, or one
    that comes before a retry is due, finds nothing to do. Answers the row and the
    database's time."""
    lease = timedelta(seconds=lease_seconds)
    row = session.execute(_CLAIM_STORE, {"job_id": job_id, "lease": lease}).first()
    return (row[0], row[1]) if row is not None else None


def record_miss(
    session: Session,
    job_id: uuid.UUID,
    attempt: int,
    looked_at: datetime,
    *,
    posted_before: datetime,
    missed_before: datetime,
    state: JobState = JobState.SUBMITTING,
) -> int | None:
    """Count a history lookup of submit `attempt` of a job in `state` (a stopped one's too),
    begun at `looked_at`, that did not find it, if it proves something: the attempt was
    claimed before `posted_before` (its POST can no longer arrive) and any earlier miss began
    before `missed_before`. Answers the misses so far, or None when this lookup came too
    early to count."""
    row = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status == state,
            Job.submit_attempts == attempt,
            Job.last_submit_at <= posted_before,
            Job.last_miss_at.is_(None) | (Job.last_miss_at <= missed_before),
        )
        .values(
            recover_misses=Job.recover_misses + 1, last_miss_at=looked_at, updated_at=func.now()
        )
        .returning(Job.recover_misses)
        .execution_options(synchronize_session=False)
    ).first()
    return int(row[0]) if row is not None else None


def db_now(session: Session) -> datetime:
    """The database's clock: the one every worker agrees on."""
    return session.execute(select(func.now())).scalar_one()


def by_prediction(session: Session, prediction_id: str) -> Job | None:
    return session.scalars(select(Job).where(Job.prediction_id == prediction_id)).first()


def overdue(
    session: Session, state: JobState, column: Any, grace_seconds: float, limit: int = 500
) -> Sequence[Row[uuid.UUID, int, int, str | None]]:
    """Jobs in `state` whose `column` and last touch are both more than `grace_seconds` in
    the past (by the database's clock), skipping rows another reconciler holds and jobs put
    aside for an operator: their id, submit attempt, resends so far and traceparent."""
    before = func.now() - timedelta(seconds=grace_seconds)
    return session.execute(
        select(Job.id, Job.submit_attempts, Job.resends, Job.traceparent)
        .where(
            Job.status == state,
            column < before,
            Job.updated_at < before,
            ~quarantined(Job.id),
        )
        .order_by(column)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()


def quarantined(subject: Any) -> ColumnElement[bool]:
    """Whether a task for `subject` (a job or delivery id) is put aside, unreleased."""
    return exists().where(
        QuarantinedTask.subject_id == subject, QuarantinedTask.released_at.is_(None)
    )


_SET_NEXT_POLL = (
    update(_JOBS)
    .where(_JOBS.c.id == _JOB_ID, _JOBS.c.status == JobState.PROCESSING)
    .where(_JOBS.c.poll_seq == _POLL_SEQ)
    .values(
        due_at=func.now() + bindparam("delay", type_=Interval()),
        step_failures=bindparam("failures", type_=_JOBS.c.step_failures.type),
        resends=0,
        updated_at=func.now(),
    )
    .returning(_JOBS.c.id)
)


def set_next_poll(
    session: Session, job_id: uuid.UUID, seq: int, delay: float, failures: int = 0
) -> bool:
    """Record when the chain `seq` checks next, and the refusals in a row so far (the poll
    ran: resends start again from zero); False if the job moved on or the chain died."""
    params = {"job_id": job_id, "seq": seq, "delay": timedelta(seconds=delay), "failures": failures}
    return _execute(session, _SET_NEXT_POLL, params).first() is not None


def touch(session: Session, job_ids: Sequence[uuid.UUID]) -> None:
    """Mark jobs as just resent, counting it, so a sweep does not resend the same work every
    tick and a step resent for ever is noticed."""
    if job_ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(job_ids))
            .values(updated_at=func.now(), resends=Job.resends + 1)
            .execution_options(synchronize_session=False)
        )


def matching(
    session: Session, states: Sequence[JobState], condition: ColumnElement[bool], limit: int
) -> Sequence[uuid.UUID]:
    """Ids of jobs in `states` matching `condition`, locked, skipping rows another worker
    holds."""
    return session.scalars(
        select(Job.id)
        .where(Job.status.in_(states), condition)
        .order_by(Job.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()


def for_tenant(session: Session, tenant_id: str, job_id: uuid.UUID) -> Job | None:
    """The job if it belongs to the tenant: another tenant's job is as good as absent."""
    job = session.get(Job, job_id, populate_existing=True)
    return job if job is not None and job.tenant_id == tenant_id else None
