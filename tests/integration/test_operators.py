"""Operators of the console: tokens and session ids stored only as hashes, sessions that end,
an audit log; a tenant's key is never an operator's token."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from tests.support import kling
from workers import operators, tenants
from workers.db import unit_of_work
from workers.models import AuditEntry, Operator, OperatorSession, Tenant
from workers.pipeline import utcnow

pytestmark = pytest.mark.integration


def test_an_operator_signs_in_with_its_token_only_while_enabled(
    sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    now = utcnow()
    with unit_of_work(sessions) as db:
        made, token = operators.create(db, "alice")
        _, key = tenants.create_key(db, db.get_one(Tenant, tenant.id))
    with unit_of_work(sessions) as db:
        row = db.get_one(Operator, made.id)
        assert token not in (row.token_hash, row.name) and len(row.token_hash) == 64
        assert operators.authenticate(db, key) is None  # a tenant key is no operator token
        found = operators.authenticate(db, token)
        assert found is not None
        sid, csrf = operators.start_session(db, found, now)
        stored = db.scalars(select(OperatorSession)).one()
        assert stored.id_hash != sid
        operators.audit(db, "alice", "job.cancel", "some-job", status="cancelled")
    with unit_of_work(sessions) as db:
        assert operators.signed_in(db, sid, now) == operators.SignedIn("alice", csrf)
        assert operators.signed_in(db, sid, now + operators.SESSION_TTL) is None  # expired
        assert operators.csrf_ok(csrf, csrf) and not operators.csrf_ok(csrf, "other")
        assert operators.disable(db, "alice", now)
    with unit_of_work(sessions) as db:
        assert operators.signed_in(db, sid, now) is None
        assert operators.authenticate(db, token) is None
        assert not operators.disable(db, "alice", now)
        entry = db.scalars(select(AuditEntry)).one()
        assert (entry.operator, entry.action, entry.detail) == (
            "alice", "job.cancel", {"status": "cancelled"},
        )  # fmt: skip


def test_an_action_that_commits_on_its_own_is_on_record_before_it_runs(
    sessions: sessionmaker[Session],
) -> None:
    """Cancel, restore and retry commit on their own: their entry is written first, so no
    action is ever done without one, then completed with how it turned out, or why not."""

    def entries() -> list[tuple[str, dict[str, Any]]]:
        with sessions() as db:
            found = db.scalars(select(AuditEntry).order_by(AuditEntry.id))
            return [(entry.action, entry.detail) for entry in found]

    with operators.audited(sessions, "alice", "job.cancel", "job-1") as outcome:
        assert entries() == [("job.cancel", {"pending": True})]
        outcome["status"] = "cancelled"
    with pytest.raises(RuntimeError), operators.audited(sessions, "alice", "job.retry", "job-2"):
        raise RuntimeError("Postgres went away mid-retry")
    assert entries() == [
        ("job.cancel", {"status": "cancelled"}), ("job.retry", {"failed": "RuntimeError"}),
    ]  # fmt: skip


def test_names_are_checked_and_unique(sessions: sessionmaker[Session]) -> None:
    with unit_of_work(sessions) as db:
        operators.create(db, "bob")
        with pytest.raises(operators.OperatorError):
            operators.create(db, "bob")
        with pytest.raises(operators.OperatorError):
            operators.create(db, "Bob Smith")


def test_a_new_session_sweeps_expired_ones(sessions: sessionmaker[Session]) -> None:
    now = utcnow()
    with unit_of_work(sessions) as db:
        made, _ = operators.create(db, "carol")
        operators.start_session(db, made, now - operators.SESSION_TTL - timedelta(minutes=1))
    with unit_of_work(sessions) as db:
        operators.start_session(db, db.get_one(Operator, made.id), now)
    with sessions() as db:
        assert len(db.scalars(select(OperatorSession)).all()) == 1


def test_the_cli_prints_a_token_once_and_disables_it(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    env = {"DATABASE_URL": settings.database_url}
    made = kling(env, "operators", "create", "dana")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)["token"]
    with sessions() as db:
        assert operators.authenticate(db, token) is not None
        assert token not in json.dumps([o.token_hash for o in db.scalars(select(Operator))])
    assert kling(env, "operators", "create", "dana").returncode == 1
    disabled = kling(env, "operators", "disable", "dana")
    assert disabled.returncode == 0, disabled.stderr
    with sessions() as db:
        assert operators.authenticate(db, token) is None
    assert kling(env, "operators", "disable", "dana").returncode == 1
