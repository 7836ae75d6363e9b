"""Alembic, driven from code so the CLI, the stack and the tests share one configuration."""

from __future__ import annotations

from pathlib import Path

import structlog
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.exc import OperationalError

from config import Settings
from workers.db import make_engine

log = structlog.get_logger(__name__)

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


class SchemaNotAtHead(RuntimeError):
    """The database's schema is not the one this code's migrations end at."""


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # Dated file names, so the history reads in order in a directory listing.
    config.set_main_option(
        "file_template", "%%(year)d_%%(month).2d_%%(day).2d_%%(hour).2d%%(minute).2d_%%(slug)s"
    )
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")


def check(database_url: str) -> None:
    """Raise if the models and the migrations have drifted apart."""
    command.check(alembic_config(database_url))


def require_head(settings: Settings) -> None:
    """Raise `SchemaNotAtHead` unless the database is at the head revision, naming both.

    A database that cannot be reached is let through with a warning: the process starts and
    copes as it does with any outage (503s, retries), and its readiness says Postgres is down."""
    engine = make_engine(
        settings.database_url, pool_size=1, max_overflow=0,
        connect_timeout=settings.db_connect_timeout_seconds,
    )  # fmt: skip
    try:
        with engine.connect() as connection:
            current = _revisions(connection)
    except OperationalError as exc:
        log.warning("schema.check.unavailable", error=type(exc).__name__)
        return
    finally:
        engine.dispose()
    script = ScriptDirectory.from_config(alembic_config(settings.database_url))
    head = set(script.get_heads())
    if current != head:
        raise SchemaNotAtHead(_mismatch(current, head, script))


def _revisions(connection: Connection) -> set[str]:
    # Alembic's default table, which migrations/env.py keeps. Read here rather than through
    # alembic's MigrationContext, which logs its set-up at INFO in every process that starts.
    if not inspect(connection).has_table("alembic_version"):
        return set()
    return set(connection.scalars(text("SELECT version_num FROM alembic_version")))


def _mismatch(current: set[str], head: set[str], script: ScriptDirectory) -> str:
    found = ", ".join(sorted(current)) or "none (an empty database)"
    wanted = ", ".join(sorted(head))
    known = {rev.revision for rev in script.walk_revisions()}
    if current - known:  # migrated by code newer than this
        advice = "it is unknown to this code: run the release that migrated it"
    else:
        advice = "run `kling migrate` first"
    return f"the database schema is at revision {found}, this code needs {wanted} (head); {advice}"
