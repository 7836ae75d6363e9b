"""Requests that wait for a job to change (`Prefer: wait=N`, the SSE stream), woken by
PostgreSQL's LISTEN/NOTIFY instead of polling.

Every state change of a job inserts a `job_events` row whose trigger (migration 0014) sends
`NOTIFY job_state, '<job id>'`; PostgreSQL delivers it only when the transaction commits, so
a waiter never wakes before the change is readable. One connection per API process listens,
on the event loop. A waiter is an `asyncio.Event` in a dict: while it waits it holds no
thread and no database connection, whatever the number of waiters.

A notification can be missed while the listening connection is down, so every waiter is
woken whenever the listener is lost and when it connects again (it re-reads its job and
finds any change), and while it is down waiters look again every `fallback_seconds` instead
of only at their end. The process listens only while someone waits (`JobWatch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TypeVar

import anyio
import psycopg
import structlog
from sqlalchemy.engine import make_url

from workers.intake import Refusal

log = structlog.get_logger(__name__)

CHANNEL = "job_state"
# How the listening connection shows in pg_stat_activity.
APPLICATION = "kling-api-waiters"
# A comment line this often keeps proxies from closing a quiet event stream.
KEEPALIVE_SECONDS = 15.0

T = TypeVar("T")


def libpq_dsn(database_url: str) -> str:
    """The SQLAlchemy URL the settings hold, as psycopg's own connection string."""
    url = make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


class WaiterSlots:
    """At most `limit` waiting requests and event streams per tenant in this process. Used on
    the event loop only, so a plain counter is enough."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: defaultdict[str, int] = defaultdict(int)

    def check(self, tenant_id: str) -> None:
        """Refuse (429 `too_many_waiters`) a tenant that holds all its slots."""
        if self._held[tenant_id] >= self.limit:
            raise Refusal(
                429, "Prefer", "too_many_waiters",
                f"at most {self.limit} waiting requests and event streams at once per tenant",
                headers={"Retry-After": "1"},
            )  # fmt: skip

    @contextmanager
    def slot(self, tenant_id: str) -> Iterator[None]:
        self.check(tenant_id)
        self._held[tenant_id] += 1
        try:
            yield
        finally:
            self._held[tenant_id] -= 1
            if not self._held[tenant_id]:
                del self._held[tenant_id]


class JobWatch:
    """Wakes the waiters of a job when it changes state. `run` is the listener, a task of the
    API's lifespan; `watch` registers a waiter.

    The process listens only while someone waits (and `linger` seconds after): a listening
    connection is woken, and counts a transaction, for every notification of every job, so
    an API process nobody waits on costs the database nothing."""

    def __init__(
        self,
        database_url: str,
        *,
        check_every: float = 30.0,
        linger: float = 30.0,
        reconnect_max: float = 10.0,
        fallback_seconds: float = 5.0,
        ready_wait: float = 3.0,
    ) -> None:
        self._dsn = libpq_dsn(database_url)
        self._check_every, self._linger = check_every, linger
        self._reconnect_max, self._ready_wait = reconnect_max, ready_wait
        self.fallback_seconds = fallback_seconds
        self._waiters: defaultdict[uuid.UUID, set[asyncio.Event]] = defaultdict(set)
        self._wanted = asyncio.Event()  # someone waits: listen
        self._ready = asyncio.Event()  # listening now
        self._idle_since = 0.0

    @property
    def listening(self) -> bool:
        return self._ready.is_set()

    @property
    def waiting(self) -> int:
        return sum(len(events) for events in self._waiters.values())

    @asynccontextmanager
    async def watch(self, job_id: uuid.UUID) -> AsyncIterator[asyncio.Event]:
        """An event set whenever `job_id` may have changed. Register *before* reading the
        job, and clear it before each read, so no change falls between a read and a wait.
        Waits (a little) for the listener to start, so the first read already counts."""
        woken = asyncio.Event()
        self._waiters[job_id].add(woken)
        self._wanted.set()
        try:
            if not self.listening:
                with contextlib.suppress(TimeoutError):  # then `patience` looks again soon
                    await asyncio.wait_for(self._ready.wait(), self._ready_wait)
            yield woken
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(woken)
                if not waiters:
                    del self._waiters[job_id]
            if not self._waiters:
                self._idle_since = time.monotonic()

    def patience(self, left: float) -> float:
        """How long a waiter may sleep now: all it has left while notifications arrive, a
        few seconds at a time while they cannot."""
        return left if self.listening else min(left, self.fallback_seconds)

    async def run(self) -> None:
        """Listen whenever someone waits, until cancelled, reconnecting with a growing pause
        after any failure."""
        pause = 0.5
        while True:
            await self._wanted.wait()
            try:
                await self._listen()
                pause = 0.5  # closed because nobody waited: start at once when asked
                continue
            except (psycopg.Error, OSError, TimeoutError) as exc:
                log.warning("waiters.listener_lost", error=type(exc).__name__)
            finally:
                self._ready.clear()
                self._wake_all()  # a notification may have been missed: look again
            await asyncio.sleep(pause)
            pause = min(pause * 2, self._reconnect_max)

    async def _listen(self) -> None:
        """Listen until nobody has waited for `linger` seconds (then close: no error)."""
        async with await psycopg.AsyncConnection.connect(
            self._dsn, autocommit=True, application_name=APPLICATION, connect_timeout=5,
            keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
        ) as conn:  # fmt: skip
            await conn.execute(f"LISTEN {CHANNEL}")
            self._ready.set()
            log.info("waiters.listening")
            self._wake_all()  # whatever changed while nobody listened
            checked = time.monotonic()
            while True:
                async for note in conn.notifies(timeout=min(self._linger, self._check_every)):
                    self._wake(note.payload)
                now = time.monotonic()
                if not self._waiters and now - self._idle_since >= self._linger:
                    self._wanted.clear()
                    log.info("waiters.idle")
                    return
                if now - checked >= self._check_every:
                    # A quiet spell: prove the connection still answers, or reconnect.
                    await asyncio.wait_for(conn.execute("SELECT 1"), timeout=5)
                    checked = now

    def _wake(self, payload: str) -> None:
        try:
            job_id = uuid.UUID(payload)
        except ValueError:
            return
        for woken in self._waiters.get(job_id, ()):
            woken.set()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for woken in waiters:
                woken.set()


async def until_changed(
    watch: JobWatch,
    job_id: uuid.UUID,
    read: Callable[[], T | None],
    changed: Callable[[T], bool],
    seconds: float,
) -> T | None:
    """Read the job (`read`, in a worker thread) until `changed` holds or `seconds` have
    passed, waking on its notifications; answers the last read (None: no such job)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    async with watch.watch(job_id) as woken:
        while True:
            woken.clear()
            value = await anyio.to_thread.run_sync(read)
            left = deadline - loop.time()
            if value is None or changed(value) or left <= 0:
                return value
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), watch.patience(left))


async def changes(
    watch: JobWatch,
    job_id: uuid.UUID,
    read_after: Callable[[int], tuple[list[tuple[int, str]], bool]],
    last: int,
    keepalive: float = KEEPALIVE_SECONDS,
) -> AsyncIterator[str]:
    """Server-Sent Events of the job's changes after event `last`: `read_after(last)` answers
    the new (id, JSON) events and whether the job has ended; the stream ends once it has and
    everything up to its end was sent. A comment line keeps a quiet connection open."""
    async with watch.watch(job_id) as woken:
        while True:
            woken.clear()
            events, ended = await anyio.to_thread.run_sync(read_after, last)
            for last, data in events:
                yield f"id: {last}\nevent: state\ndata: {data}\n\n"
            if ended:
                return
            try:
                await asyncio.wait_for(woken.wait(), watch.patience(keepalive))
            except TimeoutError:
                yield ": keep-alive\n\n"
