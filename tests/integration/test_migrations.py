import json
import os
import subprocess
import sys
from typing import Any

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from workers.migrate import alembic_config, check
from workers.sealing import Sealer, new_key

pytestmark = pytest.mark.integration


def test_models_and_migrations_do_not_drift(database_url: str) -> None:
    check(database_url)  # raises if autogenerate would find anything to do


def test_migrations_downgrade_and_upgrade_cleanly(database_url: str) -> None:
    config = alembic_config(database_url)
    command.downgrade(config, "base")
    command.upgrade(config, "head")
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
