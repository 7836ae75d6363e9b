"""Per-tenant quotas set and read through the operator's CLI, on a real Postgres."""

from __future__ import annotations

import json

import pytest
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from tests.integration.flow import new_job
from tests.support import kling
from workers.pipeline import Pipeline

pytestmark = pytest.mark.integration


def test_quotas_are_set_shown_with_their_usage_and_cleared(
    settings: Settings, sessions: sessionmaker[Session], pipeline: Pipeline, portrait: bytes
) -> None:
    new_job(pipeline, portrait)  # the `flow` tenant, with one job queued
    env = {"DATABASE_URL": settings.database_url, "TENANT_MAX_IN_FLIGHT": "7"}
    args = ["--max-in-flight", "2", "--weight", "3", "--submits-per-minute", "5"]
    updated = kling(env, "tenants", "update", "flow", *args, "--max-queued", "10")
    assert updated.returncode == 0, updated.stderr
    quotas = json.loads(updated.stdout)["quotas"]
    assert quotas["max_in_flight"] == {"limit": 2, "own": 2, "used": 0}
    assert quotas["weight"]["limit"] == 3
    assert quotas["max_queued"] == {"limit": 10, "own": 10, "used": 1}

    cleared = kling(env, "tenants", "update", "flow", "--max-in-flight", "none")
    assert cleared.returncode == 0, cleared.stderr
    shown = json.loads(kling(env, "tenants", "show", "flow").stdout)["quotas"]
    assert shown["max_in_flight"] == {"limit": 7, "own": None, "used": 0}  # the default
    assert shown["submits_per_minute"]["own"] == 5  # the others are left as they were


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--weight", "0"], "weight must be a whole number from 1 to 100"),
        (["--max-queued", "lots"], "is not a whole number"),
        (["--budget", "-5"], "a budget is an amount of 0 or more"),
    ],
)
def test_a_quota_that_is_not_a_whole_number_from_one_is_refused_and_nothing_changes(
    settings: Settings, pipeline: Pipeline, portrait: bytes, args: list[str], said: str
) -> None:
    new_job(pipeline, portrait)
    env = {"DATABASE_URL": settings.database_url}
    before = kling(env, "tenants", "show", "flow").stdout
    refused = kling(env, "tenants", "update", "flow", *args)
    assert refused.returncode != 0
    assert said in " ".join((refused.stdout + refused.stderr).split())
    assert kling(env, "tenants", "show", "flow").stdout == before
