"""Dry runs on the running stack: every check of a create, the price and the place the job
would get, and nothing stored, enqueued or charged; refusals exactly as a create's."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from sandbox.stack import Stack
from tests.e2e.test_api import PROMPT, Producer, new_producer, sessions  # noqa: F401
from tests.support import SimulatorAdmin, image_bytes, serving, stored_counts

pytestmark = pytest.mark.integration


@pytest.fixture
def budgeted(stack: Stack, sessions: Any, portrait: bytes) -> Iterator[Producer]:  # noqa: F811
    made = new_producer(stack, sessions, portrait, budget=Decimal("1.00"))
    yield made
    made.api.close()


def test_a_dry_run_says_what_a_create_would_cost_and_makes_nothing(
    stack: Stack, budgeted: Producer, simulator: SimulatorAdmin
) -> None:
    before, ledger = stored_counts(stack), simulator.ledger()
    body = {"upload_id": budgeted.upload_id, "prompt": PROMPT, "duration": 10, "dry_run": True}
    answer = budgeted.api.post("/v1/generations", json=body)
    assert answer.status_code == 200, answer.text
    would = answer.json()
    assert would["dry_run"] is True
    assert (Decimal(would["price_usd"]), Decimal(would["budget_left_usd"])) == (
        Decimal("0.90"), Decimal("0.10"),
    )  # fmt: skip
    assert isinstance(would["queue_position"], int)
    assert would["estimated_start_at"] < would["estimated_completion_at"]
    with serving(image_bytes(640, 480), "image/png") as url:
        fetched = budgeted.api.post(
            "/v1/generations", json={"image_url": url, "prompt": PROMPT, "dry_run": True}
        )
    assert fetched.status_code == 200, fetched.text
    assert stored_counts(stack) == before  # no job, no outbox row, no staged image
    assert simulator.ledger() == ledger  # nothing sent to WaveSpeed
    assert budgeted.api.get("/v1/generations").json()["data"] == []


def _refusals(producer: Producer, body: dict[str, Any]) -> tuple[Any, Any]:
    real = producer.api.post("/v1/generations", json=body)
    dry = producer.api.post("/v1/generations", json={**body, "dry_run": True})
    return (real.status_code, real.json()), (dry.status_code, dry.json())


def test_a_dry_run_is_refused_exactly_as_a_create_would_be(
    stack: Stack, budgeted: Producer
) -> None:
    refused = [
        {"upload_id": "nosuchupload", "prompt": PROMPT},
        {"upload_id": budgeted.upload_id, "prompt": PROMPT, "duration": 7},
        {"upload_id": budgeted.upload_id, "prompt": PROMPT, "webhook_url": "http://10.0.0.1/x"},
        {"upload_id": budgeted.upload_id, "prompt": ""},
    ]
    for body in refused:
        real, dry = _refusals(budgeted, body)
        assert real[0] >= 400 and real == dry, body
    with serving(image_bytes(200, 200), "image/png") as url:
        real, dry = _refusals(budgeted, {"image_url": url, "prompt": PROMPT})
    assert real == dry and dry[1]["code"] == "image_too_small"
    # One 10 s clip fits the budget of $1.00; a second does not, dry or not.
    first = {"upload_id": budgeted.upload_id, "prompt": PROMPT, "duration": 10}
    assert budgeted.api.post("/v1/generations", json=first).status_code == 201
    real, dry = _refusals(budgeted, first)
    assert real == dry and dry[0] == 402 and dry[1]["code"] == "budget_exceeded"


def test_a_batch_may_hold_dry_runs(stack: Stack, budgeted: Producer) -> None:
    before = stored_counts(stack)
    items = [
        {"upload_id": budgeted.upload_id, "prompt": PROMPT, "dry_run": True},
        {"upload_id": "nosuchupload", "prompt": PROMPT, "dry_run": True},
    ]
    answer = budgeted.api.post("/v1/generations/batch", json={"items": items}).json()
    ok, bad = answer["items"]
    assert (ok["status"], ok["generation"], ok["dry_run"]["price_usd"]) == (200, None, "0.45")
    assert (bad["status"], bad["problem"]["code"]) == (422, "upload_not_found")
    assert stored_counts(stack) == before
