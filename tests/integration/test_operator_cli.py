"""The operator's CLI on a real Postgres: per-tenant quotas set and read, bulk actions asked
for and reported."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from tests.integration.flow import new_job, status
from tests.support import kling
from workers import bulk
from workers.pipeline import Pipeline
from workers.states import JobState

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


def test_a_bulk_cancel_from_the_cli_is_checked_by_the_api_rules_and_reported(
    settings: Settings, pipeline: Pipeline, portrait: bytes
) -> None:
    job_id = new_job(pipeline, portrait, metadata={"batch": "cli"})
    env = {"DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url}
    refused = kling(env, "bulk", "cancel", "flow", "--status", "completed")
    assert refused.returncode == 2 and "status.0" in refused.stderr
    asked = kling(env, "bulk", "cancel", "flow", "--metadata", "batch:cli", "--no-wait")
    assert asked.returncode == 0, asked.stderr
    action = json.loads(asked.stdout)
    assert action["status"] == "pending" and action["filter"]["metadata"] == {"batch": "cli"}
    bulk.run(pipeline, uuid.UUID(action["id"]))  # as the worker its message reaches does
    shown = json.loads(kling(env, "bulk", "show", action["id"]).stdout)
    assert (shown["status"], shown["done"]) == ("done", 1)
    assert status(pipeline, job_id).status == JobState.CANCELLED
