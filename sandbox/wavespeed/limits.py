"""Account-tier limits: submissions per minute and tasks running at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable

WINDOW_SECONDS = 60.0


class RateWindow:
    """Counts submissions over a sliding minute and refuses those over the limit."""

    def __init__(self) -> None:
        self._admitted: deque[float] = deque()

    def admit(self, limit: int | None, now: float) -> float | None:
        """None if this submission fits (it is counted); else seconds until one would."""
        if limit is None:
            return None
        while self._admitted and now - self._admitted[0] >= WINDOW_SECONDS:
            self._admitted.popleft()
        if len(self._admitted) >= limit:
            return WINDOW_SECONDS - (now - self._admitted[0])
        self._admitted.append(now)
        return None


class SlotGate:
    """A concurrency cap read afresh on every check, so a new fault profile applies at once.

    Tasks over the cap wait (their prediction stays `created`), as they queue at WaveSpeed.
    """

    def __init__(self, limit: Callable[[], int | None]) -> None:
        self._limit = limit
        self._active = 0
        self._changed = asyncio.Condition()

    @property
    def active(self) -> int:
        """Tasks holding a slot now."""
        return self._active

    def _has_room(self) -> bool:
        limit = self._limit()
        return limit is None or self._active < limit

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the body of the `async with`."""
        async with self._changed:
            await self._changed.wait_for(self._has_room)
            self._active += 1
        try:
            yield
        finally:
            async with self._changed:
                self._active -= 1
                self._changed.notify_all()

    async def limit_changed(self) -> None:
        """Let waiting tasks re-check a cap that may have grown."""
        async with self._changed:
            self._changed.notify_all()
