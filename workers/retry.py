"""Waits between tries: exponential backoff with jitter, and `Retry-After` as servers send it.

Every wait we compute or are told is bounded here, so a hostile or broken server cannot push a
retry past what date arithmetic, Celery or the reconciler can hold.
"""

from __future__ import annotations

import email.utils
import random
from datetime import UTC, datetime

# Longer than any wait we would honour; only keeps the arithmetic finite.
RETRY_AFTER_CEILING = 7 * 86400.0


def backoff(
    attempt: int,
    base: float,
    cap: float,
    retry_after: float | None = None,
    retry_after_cap: float = RETRY_AFTER_CEILING,
) -> float:
    """Exponential backoff with jitter, at most `cap`; never sooner than the server's
    `Retry-After`, which is itself clamped to `retry_after_cap`."""
    exponent = min(max(0, attempt - 1), 32)  # 2**32 base is already past any cap
    delay = min(cap, base * 2**exponent) * random.uniform(0.5, 1.0)
    return max(delay, min(retry_after or 0.0, retry_after_cap))


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """`Retry-After` in seconds, from either of its forms (delta-seconds or an HTTP date);
    None when absent or unreadable. Clamped to [0, RETRY_AFTER_CEILING]."""
    text = (value or "").strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return min(float(text), RETRY_AFTER_CEILING)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(0.0, seconds), RETRY_AFTER_CEILING)
