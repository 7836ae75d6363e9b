"""WaveSpeed's webhook: verified, deduplicated, and a short-cut past a long poll countdown."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sandbox.processes import free_port
from sandbox.stack import Stack
from tests.support import SimulatorAdmin, wait_for
from workers import tenants
from workers.db import make_engine, make_session_factory, unit_of_work
from workers.sealing import Sealer
from workers.webhook_in import sign

pytestmark = pytest.mark.integration


def signed_headers(secret: str, webhook_id: str, body: bytes) -> dict[str, str]:
    timestamp = str(int(time.time()))
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": f"v3,{sign(secret, webhook_id, timestamp, body)}",
        "content-type": "application/json",
    }


def test_unsigned_or_forged_webhooks_are_refused(stack: Stack, stack_info: dict[str, Any]) -> None:
    url = f"{stack_info['api_url']}/v1/wavespeed/webhook"
    body = json.dumps({"id": "p-x", "status": "completed"}).encode()
    assert httpx.post(url, content=body).status_code == 401
    forged = signed_headers("whsec_not-the-secret", "p-x", body)
    assert httpx.post(url, content=body, headers=forged).status_code == 401
    genuine = signed_headers(stack.env["WAVESPEED_WEBHOOK_SECRET"], "p-x", body)
    assert httpx.post(url, content=body, headers=genuine).status_code == 204
    assert httpx.post(url, content=body, headers=genuine).status_code == 204  # duplicate: fine


@pytest.fixture
def slow_polling_deployment(
    stack: Stack, database_url: str, sealer: Sealer
) -> Iterator[dict[str, str]]:
    """An API and a worker of their own whose first poll is 5 minutes away: only the webhook
    can finish a job quickly."""
    port = free_port()
    redis_url = re.sub(r"/\d+$", "", stack.env["REDIS_URL"]) + "/8"
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "POLL_FIRST_DELAY_SECONDS": '{"5": 300, "10": 300}',
        "RECONCILE_INTERVAL_SECONDS": "300",
    }
    engine = make_engine(database_url)
    with unit_of_work(make_session_factory(engine)) as session:
        _, token = tenants.create_key(session, tenants.create_tenant(session, "webhook", sealer))
    engine.dispose()
    api = stack.start_api("webhook-api", port, env)
    worker = stack.start_worker("webhook-worker", concurrency=1, env=env)
    yield {"api_url": f"http://127.0.0.1:{port}", "api_key": token}
    worker.stop()
    api.stop()


def test_the_webhook_finishes_a_job_long_before_its_first_poll(
    slow_polling_deployment: dict[str, str], simulator: SimulatorAdmin, portrait: bytes
) -> None:
    simulator.set_faults(inference_seconds=[1, 1])
    headers = {"Authorization": f"Bearer {slow_polling_deployment['api_key']}"}
    with httpx.Client(
        base_url=slow_polling_deployment["api_url"], headers=headers, timeout=60
    ) as api:
        upload = api.post("/v1/uploads", files={"file": ("p.png", portrait, "image/png")})
        created = api.post(
            "/v1/generations",
            json={"upload_id": upload.json()["upload_id"], "prompt": "slow push-in"},
        ).json()

        def completed() -> dict[str, Any] | None:
            job = api.get(f"/v1/generations/{created['id']}").json()
            return job if job["status"] == "completed" else None

        job = wait_for(completed, timeout=60)
    deliveries = simulator.prediction(job["prediction_id"])["webhook_attempts"]
    assert deliveries and deliveries[0]["status_code"] == 204
