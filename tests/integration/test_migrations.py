import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from config import Settings
from sandbox.processes import Process, free_port
from sandbox.stack import Stack
from workers.migrate import SchemaNotAtHead, alembic_config, check, require_head
from workers.sealing import Sealer, new_key

HEAD = ScriptDirectory.from_config(alembic_config("postgresql://")).get_current_head()

pytestmark = pytest.mark.integration


def test_models_and_migrations_do_not_drift(database_url: str) -> None:
    check(database_url)  # raises if autogenerate would find anything to do


def test_migrations_downgrade_and_upgrade_cleanly(database_url: str) -> None:
    config = alembic_config(database_url)
    command.downgrade(config, "base")
    command.upgrade(config, "head")
    check(database_url)


def test_an_index_build_left_invalid_by_an_interrupted_migration_is_built_again(
    database_url: str,
) -> None:
    """0020 builds its indexes concurrently: a build that was stopped leaves an invalid index
    of the name, which `IF NOT EXISTS` alone would take for done."""
    config = alembic_config(database_url)
    command.downgrade(config, "0019")
    engine = create_engine(database_url)
    valid = text(
        "SELECT indisvalid FROM pg_index JOIN pg_class ON pg_class.oid = indexrelid "
        "WHERE relname = 'ix_jobs_created_at'"
    )
    with engine.begin() as conn:  # as an interrupted build leaves it
        conn.execute(text("CREATE INDEX ix_jobs_created_at ON jobs (created_at)"))
        conn.execute(
            text("UPDATE pg_index SET indisvalid = false FROM pg_class "
                 "WHERE pg_class.oid = indexrelid AND relname = 'ix_jobs_created_at'")
        )  # fmt: skip
        assert conn.execute(valid).scalar_one() is False
    command.upgrade(config, "head")
    with engine.connect() as conn:
        assert conn.execute(valid).scalar_one() is True
    engine.dispose()
    check(database_url)


PLAIN = ("whsec_Y3VycmVudC1zZWNyZXQtZm9yLXRoZS10ZXN0", "whsec_cHJldmlvdXMtc2VjcmV0LWZvci10ZXN0")


def tenant_row(database_url: str) -> dict[str, Any]:
    engine = create_engine(database_url)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM tenants WHERE id = 'ten_old'")).mappings().one()
    engine.dispose()
    return dict(row)


def test_revision_0003_seals_plaintext_secrets_and_refuses_without_a_key(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = alembic_config(database_url)
    command.downgrade(config, "0002")
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO tenants (id, name, webhook_secret, previous_webhook_secret) "
                "VALUES ('ten_old', 'old', :current, :previous)"
            ),
            {"current": PLAIN[0], "previous": PLAIN[1]},
        )
    engine.dispose()

    # In a process of its own, as `kling migrate` runs it (a failed run leaves its engine
    # undisposed, which would warn here).
    refused = subprocess.run(
        [sys.executable, "-c", f"from workers.migrate import upgrade; upgrade({database_url!r})"],
        env={**os.environ, "SECRET_KEYS": "[]"}, capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode != 0 and "SECRET_KEYS is empty" in refused.stderr
    # Nothing changed: the rename was rolled back with the rest.
    assert tenant_row(database_url)["webhook_secret"] == PLAIN[0]

    key = new_key()
    monkeypatch.setenv("SECRET_KEYS", json.dumps([key]))
    command.upgrade(config, "head")
    row = tenant_row(database_url)
    assert not any(p in str(value) for p in PLAIN for value in row.values())
    sealer = Sealer([key])
    sealed = (row["sealed_webhook_secret"], row["sealed_previous_webhook_secret"])
    assert tuple(sealer.unseal(value) for value in sealed) == PLAIN
    check(database_url)

    command.downgrade(config, "0002")
    row = tenant_row(database_url)
    assert (row["webhook_secret"], row["previous_webhook_secret"]) == PLAIN


def at_revision(database_url: str, revision: str | None) -> None:
    """Make the database claim `revision` (none: no alembic_version at all)."""
    engine = create_engine(database_url)
    with engine.begin() as conn:
        if revision is None:
            conn.execute(text("DROP TABLE alembic_version"))
        else:
            conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    engine.dispose()


@pytest.mark.parametrize(
    ("revision", "said"),
    [
        ("0003", f"at revision 0003, this code needs {HEAD} (head); run `kling migrate` first"),
        ("0999", f"at revision 0999, this code needs {HEAD} (head); it is unknown to this code"),
        (None, f"at revision none (an empty database), this code needs {HEAD} (head)"),
    ],
)
def test_a_schema_not_at_head_is_refused_naming_both_revisions(
    settings: Settings, revision: str | None, said: str
) -> None:
    require_head(settings)  # the test's database is migrated: at head
    at_revision(settings.database_url, revision)
    with pytest.raises(SchemaNotAtHead) as refused:
        require_head(settings)
    assert said in str(refused.value)


def test_an_unreachable_database_is_not_taken_for_a_wrong_schema(settings: Settings) -> None:
    # Starting during an outage is allowed: the process answers 503 and retries meanwhile.
    gone = settings.model_copy(update={"database_url": f"postgresql+psycopg://x@{closed()}/k"})
    require_head(gone)


def closed() -> str:
    return f"127.0.0.1:{free_port()}"


def exit_of(stack: Stack, name: str, argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """The exit code and log of a process expected to refuse to start (it is stopped, and
    the test fails, if it is still running after a minute)."""
    log = stack.logs / f"{name}.log"
    process = Process(name, argv, log, env=env).start()
    assert process.popen is not None
    try:
        code = process.popen.wait(60)
    finally:
        process.stop()
    return code, log.read_text(errors="replace")


API = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--port", "0"]
WORKER = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
          "-Q", "maintenance", "-c", "1", "--loglevel", "INFO"]  # fmt: skip


def test_the_api_and_a_worker_start_at_head_and_refuse_any_other_schema(
    stack: Stack, database_url: str
) -> None:
    # Queues of their own, so the worker started here takes none of the stack's tasks.
    redis_url = re.sub(r"/\d+$", "", stack.env["REDIS_URL"]) + "/5"
    env = {**stack.env, "DATABASE_URL": database_url, "REDIS_URL": redis_url}
    stack.start_api("head-api", free_port(), env).stop()
    stack.start_worker("head-worker", concurrency=1, env=env, queues=["maintenance"]).stop()

    at_revision(database_url, "0003")
    for name, argv in (("stale-api", API), ("stale-worker", [*WORKER, "-n", "stale@%h"])):
        code, log = exit_of(stack, name, argv, env)
        assert code != 0, log
        assert f"the database schema is at revision 0003, this code needs {HEAD} (head)" in log
