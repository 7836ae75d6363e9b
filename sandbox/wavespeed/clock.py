"""Time as the simulator reports it: timezone-aware UTC, ISO 8601 with a `Z`."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def iso(moment: datetime | None) -> str | None:
    """`2025-05-19T06:09:15.948268Z`, WaveSpeed's timestamp shape; None stays None."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    """An ISO 8601 timestamp as aware UTC; a naive one is taken to be UTC already."""
    parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def millis_between(start: datetime | None, end: datetime | None) -> int:
    """Whole milliseconds from `start` to `end`, 0 if either is missing."""
    if start is None or end is None:
        return 0
    return max(0, round((end - start).total_seconds() * 1000))
