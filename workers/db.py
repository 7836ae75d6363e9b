"""Engine and session factory, built once per process from the settings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from config import Settings


def make_engine(
    database_url: str,
    *,
    pool_size: int = 5,
    max_overflow: int = 5,
    pool_timeout: float = 5.0,
    connect_timeout: int = 5,
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
    # pre_ping: a restarted Postgres leaves dead pooled connections behind; test before use.
    return create_engine(
        database_url, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=pool_timeout,
        pool_pre_ping=True, connect_args=connect_args,
    )  # fmt: skip


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
