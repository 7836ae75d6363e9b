"""Fixtures shared by the integration and end-to-end tests.

One embedded stack per test session (real PostgreSQL, Redis-compatible server, S3 and the
WaveSpeed simulator, plus the API, a worker and beat). Any of DATABASE_URL, REDIS_URL,
S3_ENDPOINT_URL, WAVESPEED_BASE_URL in the environment replaces its embedded stand-in.
Each test that touches the database directly gets a database of its own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from config.settings import settings_from
from sandbox.stack import Stack
from tests.support import RecordingDispatcher, SimulatorAdmin
from workers import tenants
from workers.db import make_engine, make_session_factory, unit_of_work
from workers.models import Tenant
from workers.pipeline import Pipeline
from workers.runtime import build_guard, build_storage, build_wavespeed
from workers.sealing import Sealer

TEMPLATE_DB = "kling_test_template"


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    # Not under pytest's tmp_path: pytest keeps its base directory at mode 0700, and the
    # embedded PostgreSQL runs as its own user when the tests run as root.
    root = Path(tempfile.mkdtemp(prefix="kling-test-stack-"))
    stack = Stack(root, environ=dict(os.environ))
    stack.up()
    yield stack
    stack.down()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def stack_info(stack: Stack) -> dict[str, Any]:
    return stack.info


@pytest.fixture(scope="session")
def sealer(stack: Stack) -> Sealer:
    """Seals with the stack's own SECRET_KEYS, so its API and workers open what tests seal."""
    return Sealer.from_settings(settings_from(stack.env))


@pytest.fixture
def simulator(stack: Stack) -> Iterator[SimulatorAdmin]:
    admin = SimulatorAdmin(stack.env["WAVESPEED_BASE_URL"])
    admin.reset_faults()
    yield admin
    admin.reset_faults()
    admin.close()


def _admin_dsn(database_url: str, database: str = "postgres") -> str:
    url = make_url(database_url).set(drivername="postgresql", database=database)
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def template_db(stack: Stack) -> str:
    """A migrated database that every per-test database is cloned from (fast: a file copy)."""
    from workers.migrate import upgrade

    server = stack.env["DATABASE_URL"]
    with psycopg.connect(_admin_dsn(server), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}"')
        conn.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    url = make_url(server).set(database=TEMPLATE_DB).render_as_string(hide_password=False)
    upgrade(url)
    return url


@pytest.fixture
def database_url(stack: Stack, template_db: str) -> Iterator[str]:
    name = f"kling_test_{uuid.uuid4().hex[:12]}"
    server = stack.env["DATABASE_URL"]
    with psycopg.connect(_admin_dsn(server), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
    yield make_url(server).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(_admin_dsn(server), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def settings(stack: Stack, database_url: str) -> Any:
    return settings_from(stack.env, database_url=database_url)


@pytest.fixture
def dispatcher() -> RecordingDispatcher:
    return RecordingDispatcher()


@pytest.fixture
def api(stack_info: dict[str, Any]) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {stack_info['api_key']}"}
    with httpx.Client(base_url=stack_info["api_url"], headers=headers, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def portrait() -> bytes:
    return (Path(__file__).resolve().parent.parent / "examples" / "portrait.png").read_bytes()


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def pipeline(
    settings: Settings,
    sessions: sessionmaker[Session],
    dispatcher: RecordingDispatcher,
    sealer: Sealer,
) -> Iterator[Pipeline]:
    storage = build_storage(settings)
    guard = build_guard(settings)
    with httpx.Client(timeout=httpx.Timeout(10, connect=5)) as http:
        yield Pipeline(
            sessions=sessions,
            wavespeed=build_wavespeed(settings, http),
            storage=storage,
            http=http,
            settings=settings,
            dispatch=dispatcher,
            guard=guard,
            sealer=sealer,
        )
    guard.close()
    storage.close()


@pytest.fixture
def tenant(sessions: sessionmaker[Session], sealer: Sealer) -> Tenant:
    """A tenant in the test's own database."""
    with unit_of_work(sessions) as session:
        return tenants.create_tenant(session, f"t-{uuid.uuid4().hex[:8]}", sealer)
