"""One test per fault knob, each showing the failure a client of the simulator sees."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sandbox.wavespeed.faults import TASK_FAILURE_MESSAGES
from sandbox.wavespeed.testing import (
    SimulatorClient,
    WebhookSink,
    sample_image,
    simulator_client,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def sim(request: pytest.FixtureRequest) -> Iterator[SimulatorClient]:
    with simulator_client(**getattr(request, "param", {})) as client:
        yield client


@pytest.fixture
def image_url(sim: SimulatorClient) -> str:
    return sim.upload(sample_image(), "input.png")


def _predictions(sim: SimulatorClient) -> list[dict[str, Any]]:
    predictions: list[dict[str, Any]] = sim.ledger()["predictions"]
    return predictions


def test_submit_429_refuses_with_retry_after_and_creates_nothing(
    sim: SimulatorClient, image_url: str
) -> None:
    sim.set_faults(submit_429=1.0)
    response = sim.submit(image_url)
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error_code"] == 429
    assert _predictions(sim) == []
    assert sim.ledger()["faults_fired"] == {"submit_429": 1}


def test_submit_500_fails_and_creates_nothing(sim: SimulatorClient, image_url: str) -> None:
    sim.set_faults(submit_500=1.0)
    response = sim.submit(image_url)
    assert response.status_code == 500
    assert "message" in response.json()
    assert _predictions(sim) == []


def test_submit_timeout_leaves_the_client_waiting_and_creates_nothing(
    sim: SimulatorClient, image_url: str
) -> None:
    sim.set_faults(submit_timeout=1.0, submit_timeout_seconds=5)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        sim.http.post(
            "/api/v3/kwaivgi/kling-v2.1-i2v-pro",
            json={"image": image_url, "prompt": "go"},
            timeout=httpx.Timeout(5, read=0.3),
        )
    assert time.monotonic() - started < 2
    assert _predictions(sim) == []


def test_submit_timeout_answers_504_after_the_delay(sim: SimulatorClient, image_url: str) -> None:
    sim.set_faults(submit_timeout=1.0, submit_timeout_seconds=0.3)
    started = time.monotonic()
    response = sim.submit(image_url)
    assert response.status_code == 504
    assert time.monotonic() - started >= 0.3
    assert _predictions(sim) == []


def test_dropped_answer_raises_in_httpx_but_the_task_runs_and_is_billed(
    sim: SimulatorClient, image_url: str
) -> None:
    sim.set_faults(submit_drop_after_create=1.0)
    started = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError):
        sim.submit(image_url)
    assert time.monotonic() - started < 1
    (prediction,) = _predictions(sim)
    assert prediction["charge_usd"] == 0.45
    assert prediction["input"]["image"] == image_url
    assert sim.wait(prediction["id"])["status"] == "completed"


def test_submit_and_result_latency_slow_the_answers(sim: SimulatorClient, image_url: str) -> None:
    sim.set_faults(submit_latency_ms=[300, 300])
    started = time.monotonic()
    assert sim.submit(image_url).status_code == 200
    assert time.monotonic() - started >= 0.3
    prediction_id = sim.submit_ok(image_url)["id"]
    sim.set_faults(result_latency_ms=[300, 300])
    started = time.monotonic()
    assert sim.http.get(f"/api/v3/predictions/{prediction_id}/result").status_code == 200
    assert time.monotonic() - started >= 0.3


def test_result_429_and_500(sim: SimulatorClient, image_url: str) -> None:
    prediction_id = sim.submit_ok(image_url)["id"]
    sim.set_faults(result_429=1.0)
    limited = sim.http.get(f"/api/v3/predictions/{prediction_id}/result")
    assert limited.status_code == 429
    assert "retry-after" in limited.headers
    sim.set_faults(result_500=1.0)
    assert sim.http.get(f"/api/v3/predictions/{prediction_id}/result").status_code == 500
    sim.set_faults()
    assert sim.wait(prediction_id)["status"] == "completed"


def test_history_500_fails_the_lookup_and_nothing_else(
    sim: SimulatorClient, image_url: str
) -> None:
    prediction_id = sim.submit_ok(image_url)["id"]
    sim.set_faults(history_500=1.0)
    down = sim.http.post("/api/v3/predictions", json={"page": 1, "page_size": 10})
    assert down.status_code == 500
    assert "message" in down.json()
    assert sim.wait(prediction_id)["status"] == "completed"  # /result still answers
    sim.set_faults()
    body = {"page": 1, "page_size": 10}
    items = sim.http.post("/api/v3/predictions", json=body).json()["data"]["items"]
    assert [item["id"] for item in items] == [prediction_id]
    assert sim.ledger()["faults_fired"] == {"history_500": 1}


def test_result_404_answers_as_for_an_unknown_prediction(
    sim: SimulatorClient, image_url: str
) -> None:
    prediction_id = sim.submit_ok(image_url)["id"]
    sim.set_faults(result_404=1.0)
    lost = sim.http.get(f"/api/v3/predictions/{prediction_id}/result")
    unknown = sim.http.get("/api/v3/predictions/0123456789abcdef/result")
    assert (lost.status_code, unknown.status_code) == (404, 404)
    assert lost.json()["error_code"] == unknown.json()["error_code"]
    sim.set_faults()
    assert sim.wait(prediction_id)["status"] == "completed"


def test_sticky_result_404_loses_the_chosen_predictions_for_good(
    sim: SimulatorClient, image_url: str
) -> None:
    ids = [sim.submit_ok(image_url)["id"] for _ in range(8)]
    sim.set_faults(result_404=0.5, result_404_sticky=True, seed=5)

    def statuses() -> dict[str, int]:
        return {i: sim.http.get(f"/api/v3/predictions/{i}/result").status_code for i in ids}

    first = statuses()
    assert set(first.values()) == {200, 404}
    assert all(statuses() == first for _ in range(3))
    sim.set_faults(result_404=0.5, result_404_sticky=True, result_500=0.0, seed=11)
    assert statuses() == first  # a new profile does not bring a lost one back
    sim.set_faults()
    assert set(statuses().values()) == {200}


def test_output_404_seconds_hides_a_fresh_output_then_serves_it(
    sim: SimulatorClient, image_url: str
) -> None:
    url = sim.wait(sim.submit_ok(image_url)["id"])["outputs"][0]
    sim.set_faults(output_404_seconds=600)
    assert sim.anon.get(url).status_code == 404
    sim.set_faults(output_404_seconds=0.2)
    time.sleep(0.3)
    assert sim.anon.get(url).status_code == 200
    assert sim.ledger()["faults_fired"] == {"output_404_seconds": 1}


@pytest.mark.parametrize("code", [1200, 1403, 5000, 5003])
def test_task_fail_ends_the_task_with_the_code_and_refunds_it(
    sim: SimulatorClient, image_url: str, code: int
) -> None:
    sim.set_faults(task_fail={str(code): 1.0})
    done = sim.wait(sim.submit_ok(image_url)["id"])
    assert (done["status"], done["code"]) == ("failed", code)
    assert done["error"] == TASK_FAILURE_MESSAGES[code]
    assert done["outputs"] == []
    deadline = time.monotonic() + 5
    while sim.ledger()["refunded_usd"] != 0.45 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sim.ledger()["refunded_usd"] == 0.45


def test_webhook_drop_never_delivers(sim: SimulatorClient, image_url: str) -> None:
    sim.set_faults(webhook_drop=1.0)
    with WebhookSink() as sink:
        prediction_id = sim.wait(sim.submit_ok(image_url, webhook=sink.url)["id"])["id"]
        time.sleep(0.3)
        assert sink.received == []
    (attempt,) = _predictions(sim)[0]["webhook_attempts"]
    assert attempt["error"] == "dropped by fault profile"
    assert prediction_id


def test_webhook_duplicate_delivers_twice_with_one_id(sim: SimulatorClient, image_url: str) -> None:
    sim.set_faults(webhook_duplicate=1.0)
    with WebhookSink() as sink:
        sim.submit_ok(image_url, webhook=sink.url)
        first, second = sink.wait_for(2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body


def test_webhook_delay_holds_the_delivery(sim: SimulatorClient, image_url: str) -> None:
    sim.set_faults(webhook_delay_ms=[500, 500])
    with WebhookSink() as sink:
        done = sim.wait(sim.submit_ok(image_url, webhook=sink.url)["id"])
        finished = time.monotonic()
        assert done["status"] == "completed"
        assert sink.received == []
        sink.wait_for(1)
        assert time.monotonic() - finished >= 0.3


def test_output_gone_after_seconds_turns_the_url_404(sim: SimulatorClient, image_url: str) -> None:
    sim.set_faults(output_gone_after_seconds=0.4)
    url = sim.wait(sim.submit_ok(image_url)["id"])["outputs"][0]
    assert sim.anon.get(url).status_code == 200
    time.sleep(0.5)
    assert sim.anon.get(url).status_code == 404


def test_output_truncate_sends_a_short_body(sim: SimulatorClient, image_url: str) -> None:
    url = sim.wait(sim.submit_ok(image_url)["id"])["outputs"][0]
    full_length = int(sim.anon.head(url).headers["content-length"])
    sim.set_faults(output_truncate=1.0)
    with pytest.raises(httpx.RemoteProtocolError), sim.anon.stream("GET", url) as response:
        assert int(response.headers["content-length"]) == full_length
        response.read()
    assert sim.ledger()["faults_fired"]["output_truncate"] == 1


def test_inference_seconds_range_slows_tasks(sim: SimulatorClient, image_url: str) -> None:
    sim.set_faults(inference_seconds=[0.4, 0.4])
    prediction_id = sim.submit_ok(image_url)["id"]
    time.sleep(0.15)
    assert sim.result(prediction_id)["status"] == "processing"
    assert sim.wait(prediction_id)["timings"]["inference"] >= 400


def test_requests_per_minute_answers_429_with_retry_after(
    sim: SimulatorClient, image_url: str
) -> None:
    sim.set_faults(requests_per_minute=2)
    assert [sim.submit(image_url).status_code for _ in range(2)] == [200, 200]
    refused = sim.submit(image_url)
    assert refused.status_code == 429
    assert 55 <= int(refused.headers["retry-after"]) <= 60
    assert len(_predictions(sim)) == 2


@pytest.mark.parametrize("sim", [{"inference_seconds": 0.4}], indirect=True)
def test_concurrency_cap_queues_tasks_as_created(sim: SimulatorClient, image_url: str) -> None:
    sim.set_faults(concurrency=1)
    first, second = (sim.submit_ok(image_url)["id"] for _ in range(2))
    time.sleep(0.2)
    assert sim.result(first)["status"] == "processing"
    assert sim.result(second)["status"] == "created"
    assert sim.wait(first)["status"] == "completed"
    time.sleep(0.1)
    assert sim.result(second)["status"] == "processing"
    assert sim.wait(second)["status"] == "completed"


def test_seed_makes_the_faults_repeat(sim: SimulatorClient, image_url: str) -> None:
    runs = []
    for _ in range(2):
        sim.set_faults(submit_500=0.5, seed=7)
        runs.append([sim.submit(image_url).status_code for _ in range(12)])
    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 500}


def test_fault_profile_admin_round_trip(sim: SimulatorClient) -> None:
    put = sim.anon.put("/_sim/faults", json={"submit_429": 0.25, "task_fail": {"5003": 0.1}})
    assert put.status_code == 200
    shown = sim.anon.get("/_sim/faults").json()
    assert (shown["submit_429"], shown["task_fail"]) == (0.25, {"5003": 0.1})
    bad = sim.anon.put("/_sim/faults", json={"submit_429": 2})
    assert bad.status_code == 400
    assert "submit_429" in bad.json()["message"]
    assert sim.anon.delete("/_sim/faults").json()["submit_429"] == 0.0


def test_upload_500_stores_nothing_and_the_next_upload_works(sim: SimulatorClient) -> None:
    sim.set_faults(upload_500=1.0)
    body = {"filename": "a.png", "size": 3, "content_type": "image/png"}
    assert sim.http.post("/api/v3/media/uploads", json=body).status_code == 500
    binary = sim.http.post("/api/v3/media/upload/binary", files={"file": ("a.png", b"abc")})
    assert binary.status_code == 500
    assert sim.ledger()["uploads"] == []
    sim.set_faults()
    assert sim.http.post("/api/v3/media/uploads", json=body).status_code == 200
    assert sim.ledger()["faults_fired"] == {"upload_500": 2}
