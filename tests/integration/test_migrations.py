import pytest
from alembic import command

from workers.migrate import alembic_config, check

pytestmark = pytest.mark.integration


def test_models_and_migrations_do_not_drift(database_url: str) -> None:
    check(database_url)  # raises if autogenerate would find anything to do


def test_migrations_downgrade_and_upgrade_cleanly(database_url: str) -> None:
    config = alembic_config(database_url)
    command.downgrade(config, "base")
    command.upgrade(config, "head")
    check(database_url)
