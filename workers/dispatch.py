"""Task names, their queues, and the one way the pipeline talks to the broker: ask for a task
to run, and ask how many messages wait in a queue."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import kombu.exceptions
import redis
import structlog

from config import tracing

log = structlog.get_logger(__name__)

SUBMIT = "generation.submit"
RECOVER = "generation.recover"
POLL = "generation.poll"
STORE = "generation.store"
WITHDRAW = "generation.withdraw"
NOTIFY = "generation.notify"
REPLY = "generation.reply"
# Producers' generation requests over the broker (`api.inbox`), on a queue of their own.
REQUEST = "generation.request"
RECONCILE = "maintenance.reconcile"
BULK = "maintenance.bulk"

QUEUES = ("submit", "poll", "store", "notify", "maintenance", "requests")

ROUTES: dict[str, str] = {
    SUBMIT: "submit",
    RECOVER: "submit",
    POLL: "poll",
    STORE: "store",
    # A short WaveSpeed call, like a poll.
    WITHDRAW: "poll",
    NOTIFY: "notify",
    REPLY: "notify",
    REQUEST: "requests",
    RECONCILE: "maintenance",
    BULK: "maintenance",
}


class Dispatcher(Protocol):
    """Publishes a task for a job. Called only after the change that asked for it committed."""

    def __call__(
        self, task: str, job_id: uuid.UUID, *, countdown: float | None = None, **kwargs: Any
    ) -> None: ...

    def waiting(self, queue: str) -> int:
        """Messages ready in `queue` that no worker has taken yet (countdowns held by a
        worker are not counted)."""
        ...

    def reply(self, task: str, queue: str, body: dict[str, Any], message_id: str) -> None:
        """Publish a producer's own task (`workers.replies`), `message_id` its task id and
        its `webhook-id` header."""
        ...


# What a publish raises when the broker is away. Nothing wider: a task's soft time limit
# (`SoftTimeLimitExceeded`) or a bug must still stop the step.
PUBLISH_ERRORS = (kombu.exceptions.KombuError, redis.RedisError, OSError)


@dataclass(frozen=True)
class Message:
    task: str
    subject: uuid.UUID
    countdown: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    # The trace the message belongs to: its subject's, which need not be the one current
    # when it is published (the outbox relay and the reconciler work for many jobs at once).
    traceparent: str | None = None


def publish(dispatch: Dispatcher, messages: Sequence[Message]) -> tuple[int, Exception | None]:
    """Send `messages` in order; answers how many went, and why the rest did not. The first
    that fails stops the rest (the broker is away): each is left to the row that backs it."""
    for sent, message in enumerate(messages):
        try:
            with tracing.within(message.traceparent):
                dispatch(
                    message.task, message.subject, countdown=message.countdown, **message.kwargs
                )
        except PUBLISH_ERRORS as exc:
            log.warning(
                "dispatch.publish_failed", task=message.task, subject=str(message.subject),
                left=len(messages) - sent, error=f"{type(exc).__name__}: {exc}",
            )  # fmt: skip
            return sent, exc
    return len(messages), None


class CeleryDispatcher:
    """Sends by name, so the API can publish without importing the worker's task modules.

    Countdowns are clamped to `max_countdown` (Celery on Redis holds ETA messages in worker
    memory; a longer wait belongs in a row the reconciler reads). With `retry` off a publish
    is tried once, bounded by the broker's socket timeouts: what a request waiting on it
    wants, since the outbox publishes it later anyway."""

    def __init__(self, celery: Any, *, max_countdown: float = 300.0, retry: bool = True) -> None:
        self._celery = celery
        self._max_countdown = max_countdown
        self._retry = retry

    def __call__(
        self, task: str, job_id: uuid.UUID, *, countdown: float | None = None, **kwargs: Any
    ) -> None:
        if countdown is not None:
            countdown = min(max(0.0, countdown), self._max_countdown)
        headers: dict[str, Any] = {}
        with tracing.publishing(task, headers):
            self._celery.send_task(
                task, args=[str(job_id)], kwargs=kwargs, countdown=countdown,
                queue=ROUTES[task], retry=self._retry, headers=headers,
            )  # fmt: skip

    def reply(self, task: str, queue: str, body: dict[str, Any], message_id: str) -> None:
        # The producer's own task: it carries our trace, for a producer that traces too.
        headers: dict[str, Any] = {"webhook-id": message_id}
        with tracing.publishing(task, headers):
            self._celery.send_task(
                task, kwargs=body, queue=queue, task_id=message_id, headers=headers,
                retry=self._retry,
            )  # fmt: skip

    def waiting(self, queue: str) -> int:
        # A non-passive declare answers the message count on any kombu transport (on Redis:
        # LLEN of the queue's lists) and, unlike a passive one, does not fail on an empty queue.
        with self._celery.connection_or_acquire() as connection:
            declared = connection.default_channel.queue_declare(queue=queue)
        return int(declared.message_count)
