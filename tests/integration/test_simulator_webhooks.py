"""Webhooks from the simulator: what they carry, that they verify, and how they retry."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator

import pytest

from sandbox.wavespeed.config import DEFAULT_WEBHOOK_SECRET
from sandbox.wavespeed.testing import (
    ReceivedWebhook,
    SimulatorClient,
    WebhookSink,
    sample_image,
    simulator_client,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def sim() -> Iterator[SimulatorClient]:
    with simulator_client(webhook_backoff_seconds=0.05) as client:
        yield client


@pytest.fixture
def image_url(sim: SimulatorClient) -> str:
    return sim.upload(sample_image(), "input.png")


def _verify(secret: str, hook: ReceivedWebhook) -> bool:
    """WaveSpeed's documented check, written out independently of the simulator's code."""
    webhook_id = hook.headers["webhook-id"]
    timestamp = hook.headers["webhook-timestamp"]
    version, _, signature = hook.headers["webhook-signature"].partition(",")
    key = secret.removeprefix("whsec_").encode()
    signed = f"{webhook_id}.{timestamp}.".encode() + hook.body
    expected = hmac.new(key, signed, hashlib.sha256).hexdigest()
    fresh = abs(time.time() - int(timestamp)) <= 300
    return version == "v3" and fresh and hmac.compare_digest(signature, expected)


def test_completed_prediction_is_delivered_signed(sim: SimulatorClient, image_url: str) -> None:
    secret = sim.http.get("/api/v3/webhook/secret").json()["data"]["secret"]
    assert secret == DEFAULT_WEBHOOK_SECRET
    with WebhookSink() as sink:
        prediction_id = sim.submit_ok(image_url, webhook=sink.url)["id"]
        (hook,) = sink.wait_for(1)
    assert _verify(secret, hook)
    assert not _verify("whsec_someone-else", hook)
    assert hook.headers["webhook-id"] == prediction_id
    assert hook.headers["content-type"] == "application/json"
    body = json.loads(hook.body)
    assert body["id"] == prediction_id
    assert body["status"] == "completed"
    assert body["input"]["image"] == image_url
    assert body["outputs"] == sim.result(prediction_id)["outputs"]
    assert isinstance(body["executionTime"], int)
    assert isinstance(body["timings"]["inference"], int)
    (attempt,) = sim.ledger()["predictions"][0]["webhook_attempts"]
    assert (attempt["status_code"], attempt["error"]) == (200, None)


def test_failed_prediction_is_delivered_with_its_code(sim: SimulatorClient) -> None:
    with WebhookSink() as sink:
        sim.submit_ok("http://127.0.0.1:9/missing.png", webhook=sink.url)
        (hook,) = sink.wait_for(1)
    body = json.loads(hook.body)
    assert (body["status"], body["code"]) == ("failed", 1402)
    assert body["error"]


def test_non_2xx_answers_are_retried_with_backoff(sim: SimulatorClient, image_url: str) -> None:
    with WebhookSink(statuses=[500, 503]) as sink:
        sim.submit_ok(image_url, webhook=sink.url)
        hooks = sink.wait_for(3)
    assert len({h.headers["webhook-id"] for h in hooks}) == 1
    attempts = sim.ledger()["predictions"][0]["webhook_attempts"]
    assert [a["status_code"] for a in attempts] == [500, 503, 200]
    assert [a["error"] for a in attempts] == ["HTTP 500", "HTTP 503", None]


def test_delivery_gives_up_after_three_retries(sim: SimulatorClient, image_url: str) -> None:
    with WebhookSink(statuses=[500] * 10) as sink:
        sim.submit_ok(image_url, webhook=sink.url)
        sink.wait_for(4)
        time.sleep(0.6)
        assert len(sink.received) == 4


def test_unreachable_receiver_is_recorded(sim: SimulatorClient, image_url: str) -> None:
    sim.submit_ok(image_url, webhook="http://127.0.0.1:9/hook")
    deadline = time.monotonic() + 5
    while len(sim.ledger()["predictions"][0]["webhook_attempts"]) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    attempts = sim.ledger()["predictions"][0]["webhook_attempts"]
    assert all(a["status_code"] is None and "ConnectError" in a["error"] for a in attempts)


def test_no_webhook_without_the_query_parameter(sim: SimulatorClient, image_url: str) -> None:
    sim.wait(sim.submit_ok(image_url)["id"])
    entry = sim.ledger()["predictions"][0]
    assert (entry["webhook_url"], entry["webhook_attempts"]) == (None, [])
