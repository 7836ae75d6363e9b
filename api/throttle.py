"""Load bounds of the API: a rate limit per API key (in Redis, shared by every API process),
and per-tenant bounds on batches and image fetches running at once (per process).

One key cannot flood the API, and one tenant's big batches cannot fill the threads every
request shares: what they would take is refused with 429 and a `Retry-After` instead.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import structlog
from limits import RateLimitItem, parse
from limits.storage import RedisStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from workers.intake import Refusal

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Verdict:
    """What a rate-limit check found: whether to go ahead, and the `RateLimit` headers."""

    allowed: bool
    headers: dict[str, str]


class KeyRateLimit:
    """`rate` (e.g. "600/minute") per API key, counted in Redis with a sliding window: a
    burst may spend what the window allows, then requests are paced at the rate.

    Redis that cannot answer in time lets requests through (logged): the limit protects the
    API, and an outage of it must not turn into an outage of creates."""

    def __init__(self, redis_url: str, rate: str, timeout: float) -> None:
        self.item: RateLimitItem = parse(rate)
        storage = RedisStorage(
            redis_url, key_prefix="kling:ratelimit", socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )  # fmt: skip
        self._limiter = SlidingWindowCounterRateLimiter(storage)

    def hit(self, key: str, cost: int = 1) -> Verdict:
        """Spend `cost` of `key`'s allowance, if it has that much left."""
        try:
            allowed = self._limiter.hit(self.item, key, cost=cost)
            stats = self._limiter.get_window_stats(self.item, key)
        except Exception as exc:  # fail open, as above
            log.warning("ratelimit.unavailable", error=type(exc).__name__)
            return Verdict(True, {})
        reset = max(0, int(stats.reset_time - time.time()) + 1)
        headers = {
            "RateLimit-Limit": str(self.item.amount),
            "RateLimit-Remaining": str(max(0, stats.remaining)),
            "RateLimit-Reset": str(reset),
        }
        if not allowed:
            headers["Retry-After"] = str(reset)
        return Verdict(allowed, headers)


class TenantSlots:
    """At most `limit` of something per tenant at once in this process; who would exceed it
    waits up to `wait` seconds for a slot, then is refused with 429 `code`."""

    def __init__(self, limit: int, wait: float, *, field: str, code: str, what: str) -> None:
        self._limit, self._wait = limit, wait
        self._field, self._code, self._what = field, code, what
        self._lock = threading.Lock()
        self._slots: defaultdict[str, threading.BoundedSemaphore] = defaultdict(
            lambda: threading.BoundedSemaphore(limit)
        )

    @contextmanager
    def slot(self, tenant_id: str) -> Iterator[None]:
        with self._lock:
            semaphore = self._slots[tenant_id]
        if not semaphore.acquire(timeout=self._wait):
            raise Refusal(
                429, self._field, self._code,
                f"at most {self._limit} {self._what} at once per tenant; retry shortly",
                headers={"Retry-After": "1"},
            )  # fmt: skip
        try:
            yield
        finally:
            semaphore.release()
