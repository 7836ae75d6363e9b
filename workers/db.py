"""Engine and session factory, built once per process from the settings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.orm import Session, sessionmaker

from config import tracing

if TYPE_CHECKING:
    from config import Settings

# A connection idle this long may have outlived a restart of Postgres: it is tested first.
PING_AFTER_SECONDS = 1.0


def make_engine(
    database_url: str,
    *,
    pool_size: int = 5,
    max_overflow: int = 5,
    pool_timeout: float = 5.0,
    connect_timeout: int = 5,
    ping_after: float = PING_AFTER_SECONDS,
) -> Engine:
    """An engine whose every wait is bounded: for a pooled connection (`pool_timeout`), for a
    new one (`connect_timeout`), and for a server that stopped answering mid-query (TCP
    keepalives and `tcp_user_timeout`, so a cut connection fails in seconds, not minutes)."""
    connect_args = {
        "connect_timeout": connect_timeout,
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": connect_timeout * 2000,  # milliseconds
    }
    # LIFO: a busy process keeps reusing its warmest connection, which then needs no ping.
    engine = create_engine(
        database_url, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=pool_timeout,
        pool_use_lifo=True, connect_args=connect_args,
    )  # fmt: skip
    _ping_when_idle(engine, ping_after)
    tracing.instrument_engine(engine)
    return engine


def _ping_when_idle(engine: Engine, after: float) -> None:
    """Test a pooled connection before use if it sat idle `after` seconds or more: a
    restarted Postgres leaves dead connections behind. SQLAlchemy's `pool_pre_ping` tests
    every checkout, and on psycopg its ping is a transaction of its own (autocommit): one
    more round trip, and one more commit in `pg_stat_database`, for every transaction. A
    connection that dies between two uses less than `after` apart fails its statement
    instead, which invalidates the pool; the step is retried like any Postgres error."""

    @event.listens_for(engine, "checkin")
    def _idle_from(dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since < after:
            return
        try:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            dbapi_connection.rollback()  # no transaction of its own is committed
        except Exception as exc:  # the pool discards it and every older one, then reconnects
            raise InvalidatePoolError(f"pooled connection is dead: {exc!r}") from exc


def engine_for(settings: Settings, *, pool_size: int | None = None) -> Engine:
    """The engine a process builds from its settings (`pool_size` for a small side pool)."""
    return make_engine(
        settings.database_url,
        pool_size=pool_size or settings.db_pool_size,
        max_overflow=0 if pool_size else settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_seconds,
        connect_timeout=settings.db_connect_timeout_seconds,
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def unit_of_work(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit when the block ends cleanly, roll back when it raises."""
    with factory() as session, session.begin():
        yield session
