"""The producer-facing API on the running stack: tenants and keys, idempotency, batch, listing,
cancel, history, budgets, the URL guard, and signed callbacks."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest
import redis
from sqlalchemy import func, update
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from config.settings import settings_from
from sandbox.processes import free_port
from sandbox.receiver import Receiver, serve
from sandbox.stack import Stack
from tests.support import SimulatorAdmin, wait_for
from workers import tenants
from workers.db import make_engine, make_session_factory, unit_of_work
from workers.models import Job, Tenant
from workers.pipeline import utcnow
from workers.sealing import Sealer

pytestmark = pytest.mark.integration

PROMPT = "slow push-in, hair moving in the wind"


@dataclass
class Producer:
    tenant_id: str
    key_id: uuid.UUID
    api: httpx.Client
    upload_id: str


@pytest.fixture(scope="module")
def sessions(stack: Stack) -> Iterator[Any]:
    engine = make_engine(stack.env["DATABASE_URL"], pool_size=2)
    yield make_session_factory(engine)
    engine.dispose()


def new_producer(
    stack: Stack, sessions: Any, portrait: bytes, budget: Decimal | None = None
) -> Producer:
    sealer = Sealer.from_settings(settings_from(stack.env))
    with unit_of_work(sessions) as session:
        name = f"p-{uuid.uuid4().hex[:10]}"
        tenant = tenants.create_tenant(session, name, sealer, budget_usd=budget)
        key, token = tenants.create_key(session, tenant)
    api = httpx.Client(
        base_url=stack.info["api_url"], headers={"Authorization": f"Bearer {token}"}, timeout=60
    )
    upload = api.post("/v1/uploads", files={"file": ("p.png", portrait, "image/png")})
    assert upload.status_code == 201, upload.text
    return Producer(tenant.id, key.id, api, upload.json()["upload_id"])


@pytest.fixture
def producer(stack: Stack, sessions: Any, portrait: bytes) -> Iterator[Producer]:
    made = new_producer(stack, sessions, portrait)
    yield made
    made.api.close()


@pytest.fixture
def other(stack: Stack, sessions: Any, portrait: bytes) -> Iterator[Producer]:
    made = new_producer(stack, sessions, portrait)
    yield made
    made.api.close()


def create(producer: Producer, **body: Any) -> httpx.Response:
    payload = {"upload_id": producer.upload_id, "prompt": PROMPT, **body}
    return producer.api.post("/v1/generations", json=payload)


def wait_status(producer: Producer, job_id: str, *statuses: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job = producer.api.get(f"/v1/generations/{job_id}").json()
        return job if job["status"] in statuses else None

    return dict(wait_for(reached, timeout=90, interval=0.3))


# -- tenants and keys ---------------------------------------------------------------------


def test_a_tenant_never_sees_another_tenants_things(producer: Producer, other: Producer) -> None:
    job = create(producer).json()
    for path in (
        f"/v1/generations/{job['id']}",
        f"/v1/generations/{job['id']}/events",
        f"/v1/generations/{job['id']}/video",
    ):
        answer = other.api.get(path)
        assert answer.status_code == 404 and answer.json()["code"] == "not_found"
    assert other.api.post(f"/v1/generations/{job['id']}/cancel").status_code == 404
    assert job["id"] not in [g["id"] for g in other.api.get("/v1/generations").json()["data"]]
    borrowed = create(other, upload_id=producer.upload_id)
    assert borrowed.status_code == 422 and borrowed.json()["code"] == "upload_not_found"


def test_a_revoked_key_is_refused(producer: Producer, sessions: Any) -> None:
    assert producer.api.get("/v1/generations").status_code == 200
    with unit_of_work(sessions) as session:
        assert tenants.revoke_key(session, producer.key_id, utcnow())
    answer = producer.api.get("/v1/generations")
    assert answer.status_code == 401 and answer.json()["code"] == "unauthorized"


# -- idempotency, batch, list ------------------------------------------------------------


def test_idempotency_key_makes_retries_safe(producer: Producer) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = {"upload_id": producer.upload_id, "prompt": PROMPT, "metadata": {"order": "A-1"}}
    first = producer.api.post("/v1/generations", json=body, headers=key)
    again = producer.api.post("/v1/generations", json=body, headers=key)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    changed = producer.api.post("/v1/generations", json={**body, "duration": 10}, headers=key)
    assert changed.status_code == 409 and changed.json()["code"] == "idempotency_conflict"
    listed = producer.api.get("/v1/generations", params={"metadata": "order:A-1"}).json()
    assert [g["id"] for g in listed["data"]] == [first.json()["id"]]


def test_batch_accepts_and_refuses_each_item_on_its_own(producer: Producer) -> None:
    items = [
        {"upload_id": producer.upload_id, "prompt": "pan left"},
        {"upload_id": producer.upload_id, "prompt": ""},
        {"upload_id": "nope", "prompt": "tilt up"},
        {"upload_id": producer.upload_id, "prompt": "orbit", "duration": 10},
    ]
    answer = producer.api.post("/v1/generations/batch", json={"items": items})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert (result["accepted"], result["refused"]) == (2, 2)
    assert [item["status"] for item in result["items"]] == [201, 422, 422, 201]
    assert result["items"][1]["problem"]["errors"][0]["field"] == "prompt"
    assert result["items"][2]["problem"]["code"] == "upload_not_found"
    assert result["items"][3]["generation"]["input"]["duration"] == 10


def test_a_priority_is_kept_on_the_job_and_a_batch_item_may_carry_its_own(
    producer: Producer,
) -> None:
    urgent = create(producer, prompt=PROMPT, priority="high")
    assert urgent.status_code == 201 and urgent.json()["priority"] == "high"
    items = [
        {"upload_id": producer.upload_id, "prompt": "pan left", "priority": "low"},
        {"upload_id": producer.upload_id, "prompt": "tilt up", "priority": "soon"},
    ]
    result = producer.api.post("/v1/generations/batch", json={"items": items}).json()
    assert result["items"][0]["generation"]["priority"] == "low"
    assert result["items"][1]["problem"]["errors"][0]["field"] == "priority"
    job = producer.api.get(f"/v1/generations/{urgent.json()['id']}").json()
    assert job["priority"] == "high"


def test_a_deadline_is_on_the_record_and_the_charge_is_told_honestly(producer: Producer) -> None:
    made = create(producer, deadline_within_seconds=3600)
    assert made.status_code == 201, made.text
    record = made.json()
    assert record["deadline"] and record["charged"] in ("false", "unknown")
    assert wait_status(producer, record["id"], "completed")["charged"] == "true"
    tomorrow = (utcnow() + timedelta(days=1)).isoformat()
    refusals = {
        "deadline_within_seconds": create(producer, deadline=tomorrow, deadline_within_seconds=60),
        "start_deadline": create(producer, start_within_seconds=7200, deadline_within_seconds=60),
    }
    for field, answer in refusals.items():
        assert answer.status_code == 422, answer.text
        assert answer.json()["errors"][0]["field"] == field
    assert [r.json()["code"] for r in refusals.values()] == ["conflict", "after_deadline"]
    longer = create(producer, duration=15)  # priced, but not in ALLOWED_DURATIONS
    assert longer.status_code == 422 and longer.json()["code"] == "not_allowed"
    assert longer.json()["errors"][0]["field"] == "duration"


def test_a_tenant_over_its_max_queued_is_refused_429_and_nothing_is_created(
    producer: Producer, sessions: Any
) -> None:
    with unit_of_work(sessions) as session:
        owner = session.get_one(Tenant, producer.tenant_id)
        tenants.update_quotas(session, owner, {"submits_per_minute": 1, "max_queued": 1})
    first = create(producer).json()
    wait_status(producer, first["id"], "submitting", "processing", "storing", "completed")
    waiting = create(producer).json()  # the minute's one submit is taken: it stays queued
    assert producer.api.get(f"/v1/generations/{waiting['id']}").json()["status"] == "queued"
    refused = create(producer, prompt="one too many")
    assert refused.status_code == 429, refused.text
    assert refused.json()["code"] == "queue_full"
    assert refused.json()["errors"][0]["field"] == "max_queued"
    assert int(refused.headers["Retry-After"]) >= 1
    batch = producer.api.post(
        "/v1/generations/batch", json={"items": [{"upload_id": producer.upload_id, "prompt": "p"}]}
    ).json()
    assert batch["items"][0]["problem"]["code"] == "queue_full"
    listed = producer.api.get("/v1/generations").json()["data"]
    assert [job["id"] for job in listed] == [waiting["id"], first["id"]]


def test_a_bulk_cancel_runs_in_the_workers_and_reports_how_many_it_cancelled(
    producer: Producer, other: Producer, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(inference_seconds=[60, 60])
    nightly = [create(producer, metadata={"batch": "nightly"}).json()["id"] for _ in range(3)]
    spared = create(producer, metadata={"batch": "daytime"}).json()["id"]
    theirs = create(other, metadata={"batch": "nightly"}).json()["id"]
    answer = producer.api.post("/v1/generations/cancel", json={"metadata": {"batch": "nightly"}})
    assert answer.status_code == 202, answer.text
    location = answer.headers["Location"]

    def finished() -> dict[str, Any] | None:
        action = producer.api.get(location).json()
        return action if action["status"] != "pending" else None

    action = wait_for(finished)
    assert (action["status"], action["matched"], action["done"]) == ("done", 3, 3)
    for job_id in nightly:
        assert producer.api.get(f"/v1/generations/{job_id}").json()["status"] == "cancelled"
    assert producer.api.get(f"/v1/generations/{spared}").json()["status"] != "cancelled"
    assert other.api.get(f"/v1/generations/{theirs}").json()["status"] != "cancelled"
    assert other.api.get(location).status_code == 404  # another tenant's action
    bad = producer.api.post("/v1/generations/cancel", json={"status": ["completed"]})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "status.0"
    too_many = producer.api.post("/v1/webhook-deliveries/replay", json={"max_items": 10**6})
    assert too_many.status_code == 422 and too_many.json()["errors"][0]["field"] == "max_items"


def test_a_deleted_generation_is_a_tombstone_and_a_running_one_is_not_deleted(
    producer: Producer, other: Producer, simulator: SimulatorAdmin
) -> None:
    done = create(producer, metadata={"order": "D-1"}).json()
    wait_status(producer, done["id"], "completed")
    assert other.api.delete(f"/v1/generations/{done['id']}").status_code == 404
    answer = producer.api.delete(f"/v1/generations/{done['id']}")
    assert answer.status_code == 200, answer.text
    tomb = answer.json()
    assert tomb["deleted_at"] and (tomb["video"], tomb["metadata"]) == (None, {})
    assert (tomb["status"], tomb["charged"], tomb["cost_usd"]) == ("completed", "true", "0.4500")
    assert producer.api.get(f"/v1/generations/{done['id']}/video").status_code == 404
    wait_for(lambda: simulator.prediction(tomb["prediction_id"])["status"] == "deleted")
    again = producer.api.delete(f"/v1/generations/{done['id']}").json()
    assert again["deleted_at"] == tomb["deleted_at"]
    simulator.set_faults(inference_seconds=[60, 60])
    running = create(producer).json()
    refused = producer.api.delete(f"/v1/generations/{running['id']}")
    assert refused.status_code == 409 and refused.json()["code"] == "not_finished"


def test_a_finished_job_is_retried_as_a_new_job_with_the_same_inputs(
    producer: Producer, other: Producer
) -> None:
    first = create(producer, metadata={"order": "R-1"}, priority="low").json()
    running = producer.api.post(f"/v1/generations/{first['id']}/retry")
    if running.status_code == 409:  # still on its way: a running job is not retried
        assert running.json()["code"] == "not_finished"
    done = wait_status(producer, first["id"], "completed", "failed")
    key = {"Idempotency-Key": uuid.uuid4().hex}
    again = producer.api.post(f"/v1/generations/{first['id']}/retry", headers=key)
    assert again.status_code == 201, again.text
    retried = again.json()
    assert retried["id"] != first["id"] and retried["retry_of"] == first["id"]
    assert (retried["input"], retried["metadata"], retried["priority"]) == (
        done["input"], {"order": "R-1"}, "low",
    )  # fmt: skip
    repeat = producer.api.post(f"/v1/generations/{first['id']}/retry", headers=key)
    assert (repeat.status_code, repeat.json()["id"]) == (200, retried["id"])
    history = producer.api.get(f"/v1/generations/{first['id']}/events").json()
    assert f"retried as {retried['id']}" in [e["reason"] for e in history["events"]]
    assert other.api.post(f"/v1/generations/{first['id']}/retry").status_code == 404
    assert wait_status(producer, retried["id"], "completed")["video"]


def test_batch_is_bounded(producer: Producer) -> None:
    too_many = [{"upload_id": producer.upload_id, "prompt": "p"}] * 501
    answer = producer.api.post("/v1/generations/batch", json={"items": too_many})
    assert answer.status_code == 422 and answer.json()["errors"][0]["code"] == "too_long"


def test_list_pages_are_stable_while_jobs_arrive(producer: Producer) -> None:
    made = [create(producer, metadata={"run": "paging"}).json()["id"] for _ in range(5)]
    seen: list[str] = []
    page = producer.api.get("/v1/generations", params={"limit": 2, "metadata": "run:paging"}).json()
    seen += [g["id"] for g in page["data"]]
    create(producer, metadata={"run": "paging"})  # arrives mid-listing: newest, so not in the tail
    while page["next_cursor"]:
        params = {"limit": 2, "metadata": "run:paging", "cursor": page["next_cursor"]}
        page = producer.api.get("/v1/generations", params=params).json()
        seen += [g["id"] for g in page["data"]]
    assert seen == list(reversed(made))


def test_list_filters_by_status_and_time(producer: Producer) -> None:
    job = create(producer).json()
    producer.api.post(f"/v1/generations/{job['id']}/cancel")
    cancelled = producer.api.get("/v1/generations", params={"status": "cancelled"}).json()
    assert job["id"] in [g["id"] for g in cancelled["data"]]
    later = producer.api.get("/v1/generations", params={"created_after": "2999-01-01T00:00:00Z"})
    assert later.json()["data"] == []
    bad = producer.api.get("/v1/generations", params={"cursor": "garbage"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "cursor"


# -- cancel, history -----------------------------------------------------------------------


def test_cancel_and_history(producer: Producer, simulator: SimulatorAdmin) -> None:
    simulator.set_faults(inference_seconds=[30, 30])
    job = create(producer).json()
    wait_status(producer, job["id"], "processing")
    cancelled = producer.api.post(f"/v1/generations/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["charged"] == "unknown"
    prediction_id = cancelled["prediction_id"]
    assert f"prediction {prediction_id} is deleted" in cancelled["error"]["message"]
    # A worker deletes it at WaveSpeed, and the history says so.
    wait_for(lambda: simulator.prediction(prediction_id)["status"] == "deleted")

    def events() -> list[dict[str, Any]] | None:
        got = producer.api.get(f"/v1/generations/{job['id']}/events").json()["events"]
        return got if "deleted (" in (got[-1]["reason"] or "") else None

    history = wait_for(events)
    assert [e["to_state"] for e in history] == [
        "queued", "submitting", "processing", "cancelled", "cancelled",
    ]  # fmt: skip


# -- budgets -------------------------------------------------------------------------------


def test_a_store_that_failed_for_good_is_restored_on_request(
    producer: Producer, sessions: Any, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(output_truncate=1.0)  # the CDN cuts every download short
    job = create(producer).json()
    wait_status(producer, job["id"], "storing")
    assert producer.api.post(f"/v1/generations/{job['id']}/restore").status_code == 409
    with unit_of_work(sessions) as session:  # its deadline passes while it keeps failing
        session.execute(
            update(Job).where(Job.id == uuid.UUID(job["id"])).values(store_deadline_at=func.now())
        )
    failed = wait_status(producer, job["id"], "failed")
    assert failed["error"]["code"] == "storage_failed"
    simulator.reset_faults()
    restored = producer.api.post(f"/v1/generations/{job['id']}/restore")
    assert restored.status_code == 200 and restored.json()["status"] == "storing"
    done = wait_status(producer, job["id"], "completed")
    assert done["video"] and done["error"] is None


def test_budget_counts_jobs_in_flight_and_refuses_with_402(
    stack: Stack, sessions: Any, portrait: bytes, simulator: SimulatorAdmin
) -> None:
    simulator.set_faults(inference_seconds=[30, 30])
    producer = new_producer(stack, sessions, portrait, budget=Decimal("1.00"))
    try:
        assert create(producer).status_code == 201  # $0.45
        assert create(producer).status_code == 201  # $0.90 committed
        refused = create(producer)
        assert refused.status_code == 402
        assert refused.json()["code"] == "budget_exceeded"
        assert "$1.00" in refused.json()["detail"]
        assert len(producer.api.get("/v1/generations").json()["data"]) == 2
    finally:
        producer.api.close()


# -- URL guard -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.7/image.png",
        "http://[::ffff:192.168.0.1]/image.png",
        "http://100.64.0.1/image.png",
    ],
)
def test_image_urls_to_private_addresses_are_refused(producer: Producer, url: str) -> None:
    answer = producer.api.post("/v1/generations", json={"image_url": url, "prompt": PROMPT})
    assert answer.status_code == 422
    error = answer.json()["errors"][0]
    assert (error["field"], error["code"]) == ("image_url", "url_not_allowed")


def test_callback_urls_to_private_addresses_are_refused(producer: Producer) -> None:
    answer = create(producer, webhook_url="http://169.254.169.254/hook")
    assert answer.status_code == 422 and answer.json()["errors"][0]["field"] == "webhook_url"


# -- callbacks -----------------------------------------------------------------------------


def verify(secret: str, received: Any) -> dict[str, Any]:
    return dict(Webhook(secret).verify(received.body, received.headers))


def test_callback_is_signed_retried_with_the_same_id_and_replayable(
    producer: Producer, simulator: SimulatorAdmin
) -> None:
    secret = producer.api.get("/v1/webhook-secret").json()["secret"]
    attempts: list[int] = []

    def first_fails(_: Any) -> int:
        attempts.append(1)
        return 500 if len(attempts) == 1 else 204

    with serve(Receiver(status_for=first_fails)) as receiver:
        job = create(
            producer,
            webhook_url=receiver.url,
            webhook_events=["generation.completed", "generation.processing"],
        ).json()
        wait_status(producer, job["id"], "completed")
        wait_for(lambda: len([r for r in receiver.received if r.status == 204]) >= 2, timeout=30)
        events = [verify(secret, r) for r in receiver.received]
        assert {e["type"] for e in events} == {"generation.processing", "generation.completed"}
        completed = [
            r for r in receiver.received if verify(secret, r)["type"] == "generation.completed"
        ]
        assert verify(secret, completed[-1])["data"]["video"]["sha256"]
        # The receiver answers before the worker records the outcome: wait for the record.
        delivery = wait_for(lambda: completed_delivery(producer, job["id"], "succeeded"))
        ids = {
            r.headers["webhook-id"]
            for r in receiver.received
            if verify(secret, r)["type"] == "generation.completed"
        }
        assert ids == {delivery["webhook_id"]}

        # Counted before the replay: its callback may arrive before the POST returns.
        count = len(receiver.bodies_for(delivery["webhook_id"]))
        replayed = producer.api.post(f"/v1/webhook-deliveries/{delivery['id']}/replay")
        assert replayed.status_code == 200
        wait_for(lambda: len(receiver.bodies_for(delivery["webhook_id"])) > count, timeout=30)
        assert all(
            verify(secret, r)["data"]["id"] == job["id"]
            for r in receiver.bodies_for(delivery["webhook_id"])
        )


def completed_delivery(producer: Producer, job_id: str, status: str) -> dict[str, Any] | None:
    history = producer.api.get(f"/v1/generations/{job_id}/events").json()
    delivery = next(d for d in history["deliveries"] if d["event"] == "generation.completed")
    return delivery if delivery["status"] == status else None


def test_callbacks_verify_with_either_secret_during_rotation(
    producer: Producer, sessions: Any
) -> None:
    old = producer.api.get("/v1/webhook-secret").json()["secret"]
    rotated = producer.api.post("/v1/webhook-secret/rotate").json()
    new = rotated["secret"]
    assert new != old and rotated["previous_secret_valid_until"]
    with sessions() as session:  # what the API wrote holds neither secret
        row = session.get_one(Tenant, producer.tenant_id)
        stored = f"{row.sealed_webhook_secret} {row.sealed_previous_webhook_secret}"
    assert old not in stored and new not in stored and "whsec_" not in stored
    with serve(Receiver()) as receiver:
        job = create(producer, webhook_url=receiver.url).json()
        wait_status(producer, job["id"], "completed")
        wait_for(lambda: receiver.received, timeout=30)
        assert verify(old, receiver.received[0])["data"]["id"] == job["id"]
        assert verify(new, receiver.received[0])["data"]["id"] == job["id"]
        with pytest.raises(WebhookVerificationError):
            verify("whsec_" + "A" * 32, receiver.received[0])


def test_410_stops_deliveries_to_that_url(producer: Producer) -> None:
    with serve(Receiver(status_for=lambda _: 410)) as receiver:
        first = create(producer, webhook_url=receiver.url).json()
        wait_status(producer, first["id"], "completed")
        wait_for(lambda: receiver.received, timeout=30)
        second = create(producer, webhook_url=receiver.url).json()
        wait_status(producer, second["id"], "completed")
        history = producer.api.get(f"/v1/generations/{second['id']}/events").json()
        assert [d["status"] for d in history["deliveries"]] == ["gone"]
        assert len(receiver.received) == 1


def test_readyz_checks_every_dependency(stack_info: dict[str, Any]) -> None:
    answer = httpx.get(f"{stack_info['api_url']}/readyz")
    assert answer.status_code == 200
    assert answer.json() == {
        "status": "ready", "checks": {"postgres": "ok", "redis": "ok", "s3": "ok"},
    }  # fmt: skip


def test_readyz_gives_back_every_connection_it_takes(stack: Stack) -> None:
    # An API of its own, so that only /readyz runs in it while it is counted.
    port = free_port()
    api = stack.start_api("readyz-api", port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert client.get("/readyz").status_code == 200  # the pools' first connections
            before, accepted = held_connections(stack, api.pid), redis_connections_accepted(stack)
            for _ in range(50):
                assert client.get("/readyz").status_code == 200
            after = held_connections(stack, api.pid)
            accepted = redis_connections_accepted(stack) - accepted
    finally:
        api.stop()
    # A call that closes its session and reuses the process's one client holds nothing more
    # after 50 calls than after one, and opens no Redis connection of its own each time.
    assert after["postgres"] <= before["postgres"] + 1, (before, after)
    assert after["redis"] <= before["redis"], (before, after)
    assert accepted < 25, accepted  # the stack's worker and beat may open a few meanwhile


def held_connections(stack: Stack, pid: int | None) -> dict[str, int]:
    """Postgres backends and Redis clients, as the servers list them, that are connections
    of process `pid`."""
    ports = {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp") if c.raddr}
    dsn = stack.env["DATABASE_URL"].replace("+psycopg", "")
    with psycopg.connect(dsn) as conn:
        backends = [row[0] for row in conn.execute("SELECT client_port FROM pg_stat_activity")]
    with redis.Redis.from_url(stack.env["REDIS_URL"], socket_timeout=10) as broker:
        clients = [int(c["addr"].rsplit(":", 1)[1]) for c in broker.client_list()]
    return {
        "postgres": sum(port in ports for port in backends),
        "redis": sum(port in ports for port in clients),
    }


def redis_connections_accepted(stack: Stack) -> int:
    with redis.Redis.from_url(stack.env["REDIS_URL"], socket_timeout=10) as broker:
        return int(broker.info("stats")["total_connections_received"])


def test_an_api_without_secret_keys_starts_and_refuses_only_the_secret_routes(
    stack: Stack, producer: Producer
) -> None:
    secret = producer.api.get("/v1/webhook-secret").json()["secret"]
    port = free_port()
    api = stack.start_api("keyless-api", port, {"SECRET_KEYS": "[]"})
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers=producer.api.headers, timeout=30
        ) as keyless:
            assert keyless.get("/v1/generations").status_code == 200
            for answer in (
                keyless.get("/v1/webhook-secret"),
                keyless.post("/v1/webhook-secret/rotate"),
            ):
                assert answer.status_code == 503, answer.text
                assert answer.headers["content-type"].startswith("application/problem+json")
                assert answer.json()["code"] == "signing_secret_unavailable"
                assert "SECRET_KEYS" in answer.json()["detail"]
    finally:
        api.stop()
    log = (Path(stack.info["logs"]) / "keyless-api.log").read_text()
    assert "secrets.unavailable" in log and "SECRET_KEYS is empty" in log
    # The refused rotation changed nothing: the stack's API still shows the same secret.
    assert producer.api.get("/v1/webhook-secret").json()["secret"] == secret
