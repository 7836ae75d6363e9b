"""Tenant signing secrets on a real Postgres: stored sealed, opened only to sign and to show,
and moved to a new key without a moment where a callback cannot be signed."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook

from config import Settings
from sandbox.receiver import Receiver, serve
from tests.integration.flow import new_job
from tests.support import kling
from workers import callbacks, jobs, tenants
from workers.announce import job_event
from workers.db import unit_of_work
from workers.models import CallbackDelivery, Tenant
from workers.pipeline import Pipeline
from workers.runtime import build_callbacks
from workers.sealing import Sealer, SealingError, new_key
from workers.work import silent

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def stored_row(sessions: sessionmaker[Session], tenant_id: str) -> str:
    """Every column of the tenant's row as Postgres holds it, as one string."""
    with sessions() as session:
        row = session.execute(text("SELECT * FROM tenants WHERE id = :id"), {"id": tenant_id})
        return " ".join(str(value) for value in row.one())


def load(sessions: sessionmaker[Session], tenant_id: str) -> Tenant:
    with sessions() as session:
        return session.get_one(Tenant, tenant_id)


def test_the_database_holds_no_signing_secret(
    sessions: sessionmaker[Session], sealer: Sealer
) -> None:
    with unit_of_work(sessions) as session:
        tenant = tenants.create_tenant(session, "sealed", sealer)
        previous = tenants.webhook_secret(tenant, sealer)
        current = tenants.rotate_secret(session, tenant, sealer, NOW, timedelta(hours=1))
    row = stored_row(sessions, tenant.id)
    assert previous not in row and current not in row and "whsec_" not in row
    assert tenants.signing_secrets(load(sessions, tenant.id), sealer, NOW) == [current, previous]


def test_a_callback_signed_from_the_sealed_secret_verifies_and_no_key_means_no_callback(
    pipeline: Pipeline, portrait: bytes
) -> None:
    with serve(Receiver()) as receiver:
        job_id = new_job(pipeline, portrait, webhook_url=receiver.url)
        with silent(pipeline.sessions) as work:
            delivery_id = job_event(
                work, jobs.get(work.session, job_id), callbacks.COMPLETED, pipeline.clock()
            ).delivery
            flow = tenants.find_tenant(work.session, "flow")
            secret = tenants.webhook_secret(flow, pipeline.sealer)
        assert delivery_id is not None

        # A worker whose keys do not open the secret sends nothing rather than a callback
        # that would fail verification, and the delivery waits for a worker that can.
        for keys in ([new_key()], []):
            with pytest.raises(SealingError, match="SECRET_KEYS"):
                build_callbacks(replace(pipeline, sealer=Sealer(keys))).deliver(delivery_id)
        assert receiver.received == []
        with pipeline.sessions() as session:
            waiting = session.get_one(CallbackDelivery, delivery_id)
            assert (waiting.status, waiting.attempts) == ("pending", 0)

        build_callbacks(pipeline).deliver(delivery_id)
        [received] = receiver.received
        event = Webhook(secret).verify(received.body, received.headers)
        assert event["data"]["id"] == str(job_id)


def reseal_all(sessions: sessionmaker[Session], sealer: Sealer, limit: int) -> int:
    rewritten, after = 0, ""
    while after is not None:
        with unit_of_work(sessions) as session:
            count, after = tenants.reseal_secrets(session, sealer, after, limit)
        rewritten += count
    return rewritten


def test_a_new_key_first_then_reseal_leaves_every_secret_readable_with_the_new_key_alone(
    sessions: sessionmaker[Session],
) -> None:
    old, new = new_key(), new_key()
    with unit_of_work(sessions) as session:
        made = [tenants.create_tenant(session, f"k-{i}", Sealer([old])) for i in range(5)]
        tenants.rotate_secret(session, made[0], Sealer([old]), NOW, timedelta(hours=1))
    ids = [tenant.id for tenant in made]
    before = {i: tenants.signing_secrets(load(sessions, i), Sealer([old]), NOW) for i in ids}
    assert len(before[ids[0]]) == 2  # one tenant is inside a rotation's overlap

    both = Sealer([new, old])
    assert {i: tenants.signing_secrets(load(sessions, i), both, NOW) for i in ids} == before
    assert reseal_all(sessions, both, limit=2) == 5  # in batches of 2
    assert reseal_all(sessions, both, limit=2) == 0  # safe to run again

    alone = Sealer([new])
    assert {i: tenants.signing_secrets(load(sessions, i), alone, NOW) for i in ids} == before
    with pytest.raises(SealingError):
        tenants.signing_secrets(load(sessions, ids[0]), Sealer([old]), NOW)


def test_a_reseal_waits_for_a_rotation_in_flight_and_keeps_what_it_wrote(
    sessions: sessionmaker[Session],
) -> None:
    old, new = new_key(), new_key()
    with unit_of_work(sessions) as session:
        tenant_id = tenants.create_tenant(session, "racing", Sealer([old])).id
    both = Sealer([new, old])
    resealed: list[int] = []
    with unit_of_work(sessions) as session:
        # An API request rotating the secret: its transaction is still open.
        tenant = session.get_one(Tenant, tenant_id)
        rotated = tenants.rotate_secret(session, tenant, both, NOW, timedelta(hours=1))
        thread = threading.Thread(target=lambda: resealed.append(reseal_all(sessions, both, 10)))
        thread.start()
        thread.join(timeout=1)
        assert thread.is_alive()  # the reseal waits on the row lock
    thread.join(timeout=10)
    # The rotation wrote both values under the first key, so nothing was left to reseal,
    # and neither its new secret nor the previous one was overwritten.
    assert resealed == [0]
    secrets = tenants.signing_secrets(load(sessions, tenant_id), Sealer([new]), NOW)
    assert secrets[0] == rotated and len(secrets) == 2


def test_the_cli_prints_a_new_secret_once_and_rotates_every_row(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    old, new = new_key(), new_key()
    env = {"DATABASE_URL": settings.database_url, "SECRET_KEYS": json.dumps([old])}
    created = kling(env, "tenants", "create", "cli-made", "--no-with-key")
    assert created.returncode == 0, created.stderr
    out = json.loads(created.stdout)
    assert out["webhook_secret"].startswith("whsec_")
    assert out["webhook_secret"] not in stored_row(sessions, out["tenant_id"])

    env["SECRET_KEYS"] = json.dumps([new, old])
    for rewritten in (1, 0):
        done = kling(env, "secrets", "rotate")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"rewritten": rewritten}
    tenant = load(sessions, out["tenant_id"])
    assert tenants.webhook_secret(tenant, Sealer([new])) == out["webhook_secret"]

    env["SECRET_KEYS"] = "[]"
    for args in (("tenants", "create", "cli-keyless", "--no-with-key"), ("secrets", "rotate")):
        refused = kling(env, *args)
        assert refused.returncode == 1 and "SECRET_KEYS is empty" in refused.stderr, args
