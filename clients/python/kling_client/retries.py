"""When a call is sent again, and after how long."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

import httpx

# Errors that prove the request never reached the API: sending it again cannot do anything
# twice, whatever the call.
NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def new_idempotency_key() -> str:
    """A fresh `Idempotency-Key`: one per logical create, reused for every try of it."""
    return f"kc-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Retries:
    """How often a call is tried (`attempts`, the first included) and the pauses between:
    exponential from `backoff` up to `max_backoff`, with full jitter so that many clients
    refused at once do not come back at once, and never shorter than a `Retry-After` (capped
    by `max_retry_after`).

    A call that is safe to send again (a read, a cancel, a create with an `Idempotency-Key`)
    is retried after a transport error or one of `statuses`. Any other call is retried only
    when it certainly did nothing: it never reached the API, or was refused with 429."""

    attempts: int = 4
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 60.0
    statuses: frozenset[int] = frozenset({429, 500, 502, 503, 504})

    @classmethod
    def none(cls) -> Retries:
        return cls(attempts=1)

    def pause(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before try `attempt + 1`."""
        ceiling = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        jittered = random.uniform(0, ceiling)
        if retry_after is None:
            return jittered
        return max(jittered, min(retry_after, self.max_retry_after))

    def after_status(self, status: int, replayable: bool, attempt: int) -> bool:
        if attempt >= self.attempts or status not in self.statuses:
            return False
        return replayable or status == 429

    def after_error(self, exc: httpx.TransportError, replayable: bool, attempt: int) -> bool:
        if attempt >= self.attempts:
            return False
        return replayable or isinstance(exc, NEVER_SENT)
