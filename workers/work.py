"""Units of work that send their messages once they have committed.

A step changes its rows and asks for the tasks that follow inside one `with units() as work:`
block. The messages wait in the unit and go to the broker after the commit; a unit that rolls
back sends nothing. A message lost after the commit (the broker away, the process killed) is
never lost work, because each one is backed by a row that the reconciler reads and sends it
again from: the job's `due_at` or `admitted_at`, a delivery's `next_attempt_at`, or, for a new
job's first task, an outbox row written in the same transaction (`send_durable`), which the
task it announced settles when it runs.

A unit that frees a place at the admission gate says so (`free_slot`); after its messages the
gate is asked once, and only when some job is waiting for it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy.exc
import structlog
from sqlalchemy.orm import Session, sessionmaker

from config import tracing
from workers import admission, outbox
from workers.db import unit_of_work
from workers.dispatch import Dispatcher, Message, publish

log = structlog.get_logger(__name__)

# The outbox row behind a message travels in it under this keyword, for its task to settle.
OUTBOX = "outbox"


@dataclass
class Work:
    """One transaction (`session`) and the messages it asks for."""

    session: Session
    max_countdown: float
    messages: list[Message] = field(default_factory=list)
    freed: bool = False
    # After the commit: why some of the messages did not go, if they did not.
    unsent: Exception | None = None
    # The trace this unit's messages belong to when it is not the current one (a WaveSpeed
    # webhook arrives in a trace of its own, but what it sets off belongs to the job's).
    trace: str | None = None

    def send(
        self,
        task: str,
        subject: uuid.UUID,
        countdown: float | None = None,
        *,
        trace: str | None = None,
        **kw: Any,
    ) -> None:
        """Send `task` for `subject` after the commit, in trace `trace` (or the unit's, or
        the current one). A wait longer than the broker should hold (`max_countdown`: Celery on
        Redis keeps ETA messages in worker memory) is not sent: the row's due time brings the
        task when it comes."""
        if countdown is None or self.holds(countdown):
            trace = trace or self.trace or tracing.current_traceparent()
            self.messages.append(Message(task, subject, countdown, kw, trace))

    def holds(self, countdown: float) -> bool:
        """Whether a wait of `countdown` seconds is sent as a countdown (see `send`)."""
        return countdown <= self.max_countdown

    def send_durable(self, task: str, subject: uuid.UUID) -> None:
        """Send `task` after the commit, backed by an outbox row committed with this unit: the
        reconciler publishes it again until the task runs and settles it."""
        row = outbox.add(self.session, task, subject)
        trace = self.trace or tracing.current_traceparent()
        self.messages.append(Message(task, subject, kwargs={OUTBOX: row}, traceparent=trace))

    def free_slot(self) -> None:
        """This unit moved a job out of the gate's count of jobs in flight."""
        self.freed = True


@dataclass
class Units:
    """Opens units of work on `sessions` whose messages go out through `dispatch`.

    `admit` runs the gate's pass after a unit that freed a slot, when a job waits for it;
    its failure is only logged, since beat runs the same pass every few seconds."""

    sessions: sessionmaker[Session]
    dispatch: Dispatcher
    max_countdown: float
    clock: Callable[[], datetime]
    admit: Callable[[], object] | None = None

    @contextmanager
    def __call__(self) -> Iterator[Work]:
        with unit_of_work(self.sessions) as session:
            work = Work(session, self.max_countdown)
            yield work
            # Lock-free and inside the same transaction: most completions find nobody waiting
            # and so cost no admission pass, and no transaction of their own, at all.
            gate = work.freed and self.admit is not None
            gate = gate and admission.anyone_waiting(session, self.clock())
        _, work.unsent = publish(self.dispatch, work.messages)
        if gate:
            self._admit()

    def _admit(self) -> None:
        assert self.admit is not None
        try:
            self.admit()
        except sqlalchemy.exc.SQLAlchemyError as exc:  # Postgres failing: beat's pass comes soon
            log.warning("work.admit_failed", error=f"{type(exc).__name__}: {exc}")


@contextmanager
def silent(sessions: sessionmaker[Session]) -> Iterator[Work]:
    """A unit of work that sends nothing: what it asks for is left to the rows that back it
    (service-layer callers without a broker of their own: tests, benchmarks)."""
    with unit_of_work(sessions) as session:
        yield Work(session, max_countdown=0.0)
