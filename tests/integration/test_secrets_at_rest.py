"""Tenant signing secrets on a real Postgres: stored sealed, opened only to sign and to show."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook

from config import Settings
from sandbox.receiver import Receiver, serve
from tests.integration.flow import new_job
from workers import callbacks, tenants
from workers.db import unit_of_work
from workers.models import Tenant, WebhookDelivery
from workers.pipeline import Pipeline
from workers.sealing import Sealer, SealingError, new_key

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
        with unit_of_work(pipeline.sessions) as session:
            delivery_id = callbacks.record(session, job_id, callbacks.COMPLETED, pipeline.clock())
            secret = tenants.webhook_secret(tenants.find_tenant(session, "flow"), pipeline.sealer)
        assert delivery_id is not None

        # A worker whose keys do not open the secret sends nothing rather than a callback
        # that would fail verification, and the delivery waits for a worker that can.
        for keys in ([new_key()], []):
            with pytest.raises(SealingError, match="SECRET_KEYS"):
                replace(pipeline, sealer=Sealer(keys)).notify(delivery_id)
        assert receiver.received == []
        with pipeline.sessions() as session:
            waiting = session.get_one(WebhookDelivery, delivery_id)
            assert (waiting.status, waiting.attempts) == ("pending", 0)

        pipeline.notify(delivery_id)
        [received] = receiver.received
        event = Webhook(secret).verify(received.body, received.headers)
        assert event["data"]["id"] == str(job_id)


def kling(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "api.cli", *args]
    return subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True)


def test_the_cli_prints_a_new_secret_once_and_stores_it_sealed(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    env = {"DATABASE_URL": settings.database_url, "SECRET_KEYS": json.dumps([new_key()])}
    created = kling(env, "tenants", "create", "cli-made", "--no-with-key")
    assert created.returncode == 0, created.stderr
    out = json.loads(created.stdout)
    assert out["webhook_secret"].startswith("whsec_")
    assert out["webhook_secret"] not in stored_row(sessions, out["tenant_id"])

    env["SECRET_KEYS"] = "[]"
    refused = kling(env, "tenants", "create", "cli-keyless", "--no-with-key")
    assert refused.returncode == 1 and "SECRET_KEYS is empty" in refused.stderr
