"""Poison messages: a task whose worker keeps dying while it runs it.

Celery on Redis redelivers a message whose worker died (`acks_late`, `reject_on_worker_lost`),
so a message that crashes or hangs its worker until the hard time limit kills it would come
back for ever, and so would the reconciler's resends of its step. Every task run for a job or
delivery is counted in Redis when it begins and uncounted when it ends, however it ends: what
remains is the runs whose process died. (A redelivered message usually finds its step claimed
and does nothing, which changes no count; the deaths add up across messages.) Past
`poison_max_deliveries` deaths the task is put aside (`workers.quarantine`) and acknowledged
without running. The count stays, so later messages for the same work are dropped too, until
an operator releases it.
"""

from __future__ import annotations

import uuid
from typing import Any

import redis
import structlog

log = structlog.get_logger(__name__)

# Long enough to span any retry schedule; a flushed Redis only forgets counts (fails open).
COUNT_TTL_SECONDS = 7 * 86400
# A run that ended uncounts itself, and a count back at zero goes: only the runs that died
# keep a key, not every task of every job for a week. Below zero (the count was flushed or
# had expired while the run ran) goes too, or it would excuse a later death.
_END = """
if redis.call('DECR', KEYS[1]) <= 0 then redis.call('DEL', KEYS[1]) end
"""


def key(task: str, subject: str) -> str:
    return f"kling:runs:{task}:{subject}"


class RunCounter:
    """Counts runs of (task, subject) that began and have not ended. Takes a redis client."""

    def __init__(self, client: Any, limit: int) -> None:
        self._redis = client
        self.limit = limit
        # EVALSHA, loading the script on the first call and after a restart of Redis.
        self._end = client.register_script(_END)

    def begin(self, task: str, subject: str) -> int:
        """Count a run that begins; answers the runs begun and not ended, this one included
        (0 when Redis cannot say: a task is never held back for want of a count). Runs of
        duplicate messages side by side count too, so the limit leaves room for a few."""
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.incr(key(task, subject))
                pipe.expire(key(task, subject), COUNT_TTL_SECONDS)
                runs, _ = pipe.execute()
        except Exception as exc:  # the count is a guard, not a dependency
            log.warning("poison.count_unavailable", error=type(exc).__name__)
            return 0
        return int(runs)

    def poisoned(self, runs: int) -> bool:
        return runs > self.limit

    def end(self, task: str, subject: str) -> None:
        try:
            try:
                self._end(keys=[key(task, subject)])
            except redis.ResponseError:
                # A server that runs no scripts (an ACL, a proxy): uncount all the same, or
                # every run that ended would count as a death. The zero waits out its TTL.
                self._redis.decr(key(task, subject))
        except Exception as exc:  # as above
            log.warning("poison.count_unavailable", error=type(exc).__name__)


def subject_of(args: tuple[Any, ...]) -> uuid.UUID | None:
    """The job or delivery a task is for: its first argument, when it is an id."""
    try:
        return uuid.UUID(str(args[0])) if args else None
    except ValueError:
        return None
