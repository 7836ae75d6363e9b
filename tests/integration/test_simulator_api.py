"""The simulator's WaveSpeed API over real sockets: lifecycle, validation, auth, history,
deletion, uploads, money and sync mode."""

from __future__ import annotations

import hashlib
import io
import re
import time
from collections.abc import Iterator
from typing import Any

import av
import pytest

from sandbox.wavespeed.config import MODEL_ID
from sandbox.wavespeed.testing import SimulatorClient, sample_image, simulator_client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def sim_config(**overrides: Any) -> pytest.MarkDecorator:
    """Run the test against a simulator with these config overrides."""
    return pytest.mark.parametrize("sim", [overrides], indirect=True, ids=["custom-config"])


@pytest.fixture
def sim(request: pytest.FixtureRequest) -> Iterator[SimulatorClient]:
    """A fresh simulator per test (see `sim_config`)."""
    with simulator_client(**getattr(request, "param", {})) as client:
        yield client


@pytest.fixture(scope="module")
def shared_sim() -> Iterator[SimulatorClient]:
    """One simulator for the tests that only read and never change its state."""
    with simulator_client() as client:
        yield client


@pytest.fixture
def image_url(sim: SimulatorClient) -> str:
    return sim.upload(sample_image(), "input.png")


@sim_config(render_mode="full_size", inference_seconds=0.0)
def test_full_size_outputs_are_served_whole_and_match_the_ledger(
    sim: SimulatorClient, image_url: str
) -> None:
    ids = [sim.submit_ok(image_url, f"push in {n}")["id"] for n in range(2)]
    digests = set()
    for prediction_id in ids:
        done = sim.wait(prediction_id)
        video = sim.anon.get(done["outputs"][0]).raise_for_status().content
        entry = next(e for e in sim.ledger()["predictions"] if e["id"] == prediction_id)
        assert len(video) == entry["output_bytes"] > 5_000_000
        digests.add(hashlib.sha256(video).hexdigest())
        assert hashlib.sha256(video).hexdigest() == entry["output_sha256"]
        with av.open(io.BytesIO(video)) as container:
            assert container.streams.video[0].codec_context.width == 1920
    assert len(digests) == 2


@sim_config(render_mode="real", inference_seconds=0.2)
def test_submit_poll_complete_and_download_a_real_video(
    sim: SimulatorClient, image_url: str
) -> None:
    created = sim.submit_ok(image_url, "camera slow push-in", guidance_scale=0.7)
    assert created["status"] == "created"
    assert created["outputs"] == []
    assert created["urls"]["get"] == f"{sim.base_url}/api/v3/predictions/{created['id']}/result"

    done = sim.wait(created["id"])
    assert done["status"] == "completed"
    assert done["has_nsfw_contents"] == [False]
    assert done["timings"]["inference"] >= 200
    assert done["executionTime"] >= done["timings"]["inference"]
    assert done["input"]["image"] == image_url
    assert done["outputs"] == [f"{sim.base_url}/_sim/outputs/{created['id']}.mp4"]

    video = sim.anon.get(done["outputs"][0]).raise_for_status().content
    with av.open(io.BytesIO(video)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert (stream.codec_context.width, stream.codec_context.height) == (480, 270)
        assert stream.average_rate == 24
        assert container.duration == 5_000_000
        assert sum(1 for _ in container.decode(stream)) == 120

    entry = sim.ledger()["predictions"][0]
    assert entry["output_sha256"] == hashlib.sha256(video).hexdigest()
    assert entry["output_bytes"] == len(video)


@sim_config(inference_seconds=0.4)
def test_status_moves_from_created_through_processing(sim: SimulatorClient, image_url: str) -> None:
    prediction_id = sim.submit_ok(image_url)["id"]
    seen = []
    while not seen or seen[-1] not in ("completed", "failed"):
        seen.append(sim.result(prediction_id)["status"])
        time.sleep(0.02)
    assert "processing" in seen
    assert seen[-1] == "completed"
    assert seen.index("processing") < seen.index("completed")


def test_ten_second_clip_costs_double_and_lasts_ten_seconds(
    sim: SimulatorClient, image_url: str
) -> None:
    done = sim.wait(sim.submit_ok(image_url, duration="10")["id"])
    video = sim.anon.get(done["outputs"][0]).content
    with av.open(io.BytesIO(video)) as container:
        assert container.duration == 10_000_000
    assert sim.ledger()["predictions"][0]["charge_usd"] == 0.90


def test_output_urls_follow_the_address_the_client_used(sim: SimulatorClient) -> None:
    via_localhost = sim.base_url.replace("127.0.0.1", "localhost")
    other = SimulatorClient(via_localhost)
    try:
        image = other.upload(sample_image())
        assert image.startswith(via_localhost)
        done = other.wait(other.submit_ok(image)["id"])
        assert done["outputs"][0].startswith(f"{via_localhost}/_sim/outputs/")
    finally:
        other.close()


@pytest.mark.parametrize(
    ("body", "field", "error_code"),
    [
        ({"image": "http://x/a.png"}, "prompt", 1400),
        ({"prompt": "go"}, "image", 1400),
        ({"image": "http://x/a.png", "prompt": "x" * 2501}, "prompt", 1401),
        (
            {"image": "http://x/a.png", "prompt": "go", "guidance_scale": 1.5},
            "guidance_scale",
            1401,
        ),
        ({"image": "http://x/a.png", "prompt": "go", "duration": 7}, "duration", 1401),
        (
            {"image": "http://x/a.png", "prompt": "go", "negative_prompt": 3},
            "negative_prompt",
            1401,
        ),
    ],
)
def test_schema_errors_answer_400_naming_the_field(
    sim: SimulatorClient, body: dict[str, Any], field: str, error_code: int
) -> None:
    response = sim.http.post(f"/api/v3/{MODEL_ID}", json=body)
    assert response.status_code == 400
    assert field in response.json()["message"]
    assert response.json()["error_code"] == error_code
    assert sim.ledger()["predictions"] == []


def test_bad_bodies_unknown_models_and_webhook_urls(sim: SimulatorClient, image_url: str) -> None:
    bad_json = sim.http.post(
        f"/api/v3/{MODEL_ID}", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400
    assert sim.http.post(f"/api/v3/{MODEL_ID}", json=[1]).status_code == 400
    unknown = sim.http.post("/api/v3/kwaivgi/kling-v9", json={"prompt": "a", "image": image_url})
    assert unknown.status_code == 404
    assert sim.submit(image_url, webhook="ftp://x/hook").status_code == 400
    assert sim.ledger()["predictions"] == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", f"/api/v3/{MODEL_ID}"),
        ("GET", "/api/v3/predictions/abc/result"),
        ("POST", "/api/v3/predictions"),
        ("POST", "/api/v3/predictions/delete"),
        ("POST", "/api/v3/media/uploads"),
        ("POST", "/api/v3/media/upload/binary"),
        ("GET", "/api/v3/webhook/secret"),
        ("GET", "/api/v3/balance"),
    ],
)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "sim-key", "Bearer"])
def test_api_needs_the_bearer_key(
    shared_sim: SimulatorClient, method: str, path: str, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = shared_sim.anon.request(method, path, headers=headers, json={})
    assert response.status_code == 401
    assert set(response.json()) >= {"message", "error_code"}


def test_admin_endpoints_need_no_key(sim: SimulatorClient) -> None:
    for path in ("/_sim/health", "/_sim/ledger", "/_sim/faults", "/_sim/config"):
        assert sim.anon.get(path).status_code == 200


def test_unknown_prediction_is_404(sim: SimulatorClient) -> None:
    response = sim.http.get("/api/v3/predictions/0123/result")
    assert response.status_code == 404
    assert "not found" in response.json()["message"]


@pytest.mark.parametrize(
    "url_of",
    [
        lambda base: "http://127.0.0.1:9/unreachable.png",
        lambda base: f"{base}/_sim/media/does-not-exist/a.png",
        lambda base: "file:///etc/passwd",
    ],
)
def test_unfetchable_image_fails_the_task_with_1402(sim: SimulatorClient, url_of: Any) -> None:
    done = sim.wait(sim.submit_ok(url_of(sim.base_url))["id"])
    assert (done["status"], done["code"]) == ("failed", 1402)
    assert "download" in done["error"] or "URL" in done["error"]
    assert done["outputs"] == []


def _png_of_size(width: int, height: int) -> bytes:
    return sample_image(width, height)


@pytest.mark.parametrize(
    ("data", "filename", "reason"),
    [
        (b"just some text, not a picture", "notes.png", "decoded"),
        (_png_of_size(200, 200), "small.png", "smaller than 300x300"),
        (sample_image(320, 320, image_format="GIF"), "anim.gif", "not supported"),
        (_png_of_size(320, 320) + b"\0" * (10 * 1024 * 1024), "huge.png", "byte limit"),
    ],
)
def test_unacceptable_image_fails_the_task_with_1401(
    sim: SimulatorClient, data: bytes, filename: str, reason: str
) -> None:
    done = sim.wait(sim.submit_ok(sim.upload(data, filename))["id"])
    assert (done["status"], done["code"]) == ("failed", 1401)
    assert reason in done["error"]


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (sample_image(320, 320), "completed", None),
        (sample_image(320, 320) + b"\0" * (10 * 1024 * 1024), "failed", 1401),
    ],
)
def test_images_hosted_elsewhere_are_fetched_over_http(
    sim: SimulatorClient, data: bytes, status: str, code: int | None
) -> None:
    # Submitting through another host name makes the upload look foreign to the simulator,
    # so it downloads the image over HTTP instead of reading its own store.
    image_url = sim.upload(data, "remote.png")
    elsewhere = SimulatorClient(sim.base_url.replace("127.0.0.1", "localhost"))
    try:
        done = elsewhere.wait(elsewhere.submit_ok(image_url)["id"])
    finally:
        elsewhere.close()
    assert (done["status"], done.get("code")) == (status, code)


def test_a_300px_jpeg_is_accepted(sim: SimulatorClient) -> None:
    url = sim.upload(sample_image(300, 300, image_format="JPEG"), "edge.jpg")
    assert sim.wait(sim.submit_ok(url)["id"])["status"] == "completed"


def _history(sim: SimulatorClient, **body: Any) -> dict[str, Any]:
    response = sim.http.post("/api/v3/predictions", json={"page": 1, "page_size": 100, **body})
    response.raise_for_status()
    data: dict[str, Any] = response.json()["data"]
    return data


def test_history_is_newest_first_with_paging_and_filters(
    sim: SimulatorClient, image_url: str
) -> None:
    ids = [sim.submit_ok(f"{image_url}?n={n}")["id"] for n in range(4)]
    failed = sim.submit_ok("http://127.0.0.1:9/gone.png")["id"]
    for prediction_id in [*ids, failed]:
        sim.wait(prediction_id)

    everything = _history(sim)
    assert everything["total"] == 5
    assert [item["id"] for item in everything["items"]] == [failed, *reversed(ids)]
    assert everything["items"][1]["input"]["image"] == f"{image_url}?n=3"

    first, second = _history(sim, page=1, page_size=2), _history(sim, page=2, page_size=2)
    assert [i["id"] for i in first["items"] + second["items"]] == [failed, ids[3], ids[2], ids[1]]
    assert _history(sim, page=4, page_size=2)["items"] == []

    assert [i["id"] for i in _history(sim, status="failed")["items"]] == [failed]
    assert _history(sim, model=MODEL_ID)["total"] == 5
    assert _history(sim, model="other/model")["total"] == 0
    assert _history(sim, created_after="2999-01-01T00:00:00Z")["total"] == 0
    assert _history(sim, created_before="2000-01-01T00:00:00Z")["total"] == 0
    assert _history(sim, created_after="2000-01-01T00:00:00Z")["total"] == 5


def test_history_can_find_a_prediction_by_its_image_url(
    sim: SimulatorClient, image_url: str
) -> None:
    wanted = sim.submit_ok(f"{image_url}?job=42")["id"]
    sim.submit_ok(f"{image_url}?job=43")
    found = [i["id"] for i in _history(sim)["items"] if i["input"]["image"].endswith("job=42")]
    assert found == [wanted]


def test_history_rejects_bad_filters(sim: SimulatorClient) -> None:
    response = sim.http.post("/api/v3/predictions", json={"page": 1, "page_size": 101})
    assert response.status_code == 400
    assert "page_size" in response.json()["message"]
    assert sim.http.post("/api/v3/predictions", json={"page_size": 10}).status_code == 400


def test_delete_removes_predictions_and_their_outputs(sim: SimulatorClient, image_url: str) -> None:
    done = sim.wait(sim.submit_ok(image_url)["id"])
    keep = sim.wait(sim.submit_ok(image_url)["id"])
    deleted = sim.http.post(
        "/api/v3/predictions/delete", json={"ids": [done["id"], done["id"], "nope"]}
    ).json()["data"]
    assert deleted == {"deleted_count": 1}
    again = sim.http.post("/api/v3/predictions/delete", json={"ids": [done["id"]]}).json()
    assert again["data"]["deleted_count"] == 0
    assert sim.result(done["id"])["status"] == "deleted"
    assert sim.anon.get(done["outputs"][0]).status_code == 404
    assert [i["id"] for i in _history(sim)["items"]] == [keep["id"]]
    assert sim.http.post("/api/v3/predictions/delete", json={"ids": "x"}).status_code == 400


def _entry(sim: SimulatorClient, prediction_id: str) -> dict[str, Any]:
    return next(e for e in sim.ledger()["predictions"] if e["id"] == prediction_id)


@sim_config(inference_seconds=30.0, delete_refund_unstarted=1.0, delete_refund_processing=0.5)
def test_deleting_refunds_by_the_rule_for_where_the_task_stood(
    sim: SimulatorClient, image_url: str
) -> None:
    sim.set_faults(concurrency=1)
    running = sim.submit_ok(image_url)["id"]
    waiting = sim.submit_ok(image_url)["id"]  # behind the one slot: not started
    _wait_status(sim, running, "processing")
    answer = sim.http.delete(f"/api/v3/predictions/{waiting}").json()["data"]
    assert answer["status"] == "deleted"
    sim.http.post("/api/v3/predictions/delete", json={"ids": [running]}).raise_for_status()
    assert sim.result(running)["status"] == "deleted"
    assert _entry(sim, waiting)["refunded_usd"] == _entry(sim, waiting)["charge_usd"]
    assert _entry(sim, running)["refunded_usd"] == round(_entry(sim, running)["charge_usd"] / 2, 2)
    assert sim.http.delete("/api/v3/predictions/nope").status_code == 404


@sim_config(inference_seconds=0.5, delete_stop_seconds=3.0)
def test_a_processing_task_asked_to_stop_runs_on_and_may_complete(
    sim: SimulatorClient, image_url: str
) -> None:
    prediction_id = sim.submit_ok(image_url)["id"]
    _wait_status(sim, prediction_id, "processing")
    deleted = sim.http.post("/api/v3/predictions/delete", json={"ids": [prediction_id]})
    assert deleted.json()["data"]["deleted_count"] == 1
    assert sim.wait(prediction_id)["status"] == "completed"  # it finished before it stopped
    assert _entry(sim, prediction_id)["refunded_usd"] == 0.0  # completed work stays charged
    _wait_status(sim, prediction_id, "deleted", timeout=10.0)
    assert _entry(sim, prediction_id)["refunded_usd"] == 0.0


def _wait_status(
    sim: SimulatorClient, prediction_id: str, status: str, timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while sim.result(prediction_id)["status"] != status:
        assert time.monotonic() < deadline, f"{prediction_id} never became {status}"
        time.sleep(0.05)


def test_ticket_upload_put_and_download(sim: SimulatorClient) -> None:
    data = sample_image(320, 320)
    ticket = sim.http.post(
        "/api/v3/media/uploads",
        json={"filename": "cat.png", "size": len(data), "content_type": "image/png"},
    ).json()["data"]
    upload = ticket["upload"]
    assert upload["method"] == "PUT"
    assert sim.anon.get(ticket["download_url"]).status_code == 404

    wrong = upload["url"].rsplit("token=", 1)[0] + "token=forged"
    assert sim.anon.put(wrong, content=data, headers=upload["headers"]).status_code == 403
    assert (
        sim.anon.put(upload["url"], content=data[:-1], headers=upload["headers"]).status_code == 400
    )
    assert sim.anon.put(upload["url"], content=data, headers=upload["headers"]).status_code == 200

    downloaded = sim.anon.get(ticket["download_url"])
    assert downloaded.content == data
    assert downloaded.headers["content-type"] == "image/png"
    assert sim.wait(sim.submit_ok(ticket["download_url"])["id"])["status"] == "completed"
    # A fragment is never sent: the image is read all the same.
    named = sim.submit_ok(ticket["download_url"] + "#/job-1.png")["id"]
    assert sim.wait(named)["status"] == "completed"


def test_download_urls_are_shaped_like_wavespeeds_and_do_not_keep_the_name(
    sim: SimulatorClient,
) -> None:
    """`.../media/<account>/images/<time_ns>_<8 letters>.<ext>`, as WaveSpeed's CDN names an
    upload (`https://d1q70pf5vjeyhc.cloudfront.net/media/92d2...62/images/17647...93_r5ZX531Z.jpeg`)."""
    data = sample_image(320, 320)
    ticket = sim.http.post(
        "/api/v3/media/uploads",
        json={"filename": "job-7.PNG", "size": len(data), "content_type": "image/png"},
    ).json()["data"]
    binary = sim.http.post("/api/v3/media/upload/binary", files={"file": ("j.jpg", data)})
    shape = re.compile(r"/_sim/media/[0-9a-f]{32}/images/[0-9]{19}_[A-Za-z0-9]{8}\.(png|jpg)$")
    for url in (ticket["download_url"], binary.json()["data"]["download_url"]):
        assert shape.search(url), url
        # Not `"j.jpg" not in url`: the random part ends in a "j" once in 62.
        assert "job-7" not in url and not url.endswith("/j.jpg")
    account = {
        url.split("/")[-3]
        for url in (ticket["download_url"], binary.json()["data"]["download_url"])
    }
    assert len(account) == 1
    uploads = sim.ledger()["uploads"]
    assert [(u["filename"], u["bytes"]) for u in uploads] == [
        ("job-7.PNG", None),
        ("j.jpg", len(data)),
    ]
    assert ticket["download_url"].endswith(uploads[0]["path"])


def test_ticket_needs_a_filename(sim: SimulatorClient) -> None:
    response = sim.http.post("/api/v3/media/uploads", json={"size": 3})
    assert response.status_code == 400
    assert "filename" in response.json()["message"]


def test_binary_upload_and_download(sim: SimulatorClient) -> None:
    data = sample_image(310, 310, image_format="JPEG")
    response = sim.http.post("/api/v3/media/upload/binary", files={"file": ("p.jpg", data)})
    body = response.json()["data"]
    assert body["size"] == len(data)
    downloaded = sim.anon.get(body["download_url"])
    assert downloaded.content == data
    assert downloaded.headers["content-type"] == "image/jpeg"
    no_file = sim.http.post("/api/v3/media/upload/binary", files={"other": ("p.jpg", data)})
    assert no_file.status_code == 400


def test_webhook_secret_and_balance(sim: SimulatorClient, image_url: str) -> None:
    secret = sim.http.get("/api/v3/webhook/secret").json()["data"]["secret"]
    assert secret.startswith("whsec_")
    assert sim.http.get("/api/v3/balance").json()["data"]["balance"] == 10_000.0
    sim.wait(sim.submit_ok(image_url)["id"])
    assert sim.http.get("/api/v3/balance").json()["data"]["balance"] == 9999.55


@sim_config(refund_delay_seconds=0.5)
def test_ledger_charges_at_acceptance_and_refunds_failures_later(
    sim: SimulatorClient, image_url: str
) -> None:
    sim.wait(sim.submit_ok(image_url, duration=10)["id"])
    failed = sim.wait(sim.submit_ok("http://127.0.0.1:9/x.png")["id"])
    ledger = sim.ledger()
    assert (ledger["charged_usd"], ledger["refunded_usd"]) == (1.35, 0.0)
    assert ledger["balance"] == pytest.approx(10_000 - 1.35)

    time.sleep(0.8)
    ledger = sim.ledger()
    assert (ledger["charged_usd"], ledger["refunded_usd"]) == (1.35, 0.45)
    assert ledger["balance"] == pytest.approx(10_000 - 0.90)
    entry = next(p for p in ledger["predictions"] if p["id"] == failed["id"])
    assert (entry["status"], entry["code"], entry["refunded_usd"]) == ("failed", 1402, 0.45)
    for key in ("created_at", "started_at", "completed_at"):
        assert ledger["predictions"][0][key].endswith("Z")


@sim_config(initial_balance_usd=0.50)
def test_an_empty_account_is_refused_with_403(sim: SimulatorClient, image_url: str) -> None:
    assert sim.submit(image_url).status_code == 200
    refused = sim.submit(image_url)
    assert refused.status_code == 403
    assert "balance" in refused.json()["message"].lower()


def test_sync_mode_answers_the_finished_prediction(sim: SimulatorClient, image_url: str) -> None:
    data = sim.submit_ok(image_url, enable_sync_mode=True)
    assert data["status"] == "completed"
    assert data["outputs"][0].endswith(".mp4")


@sim_config(inference_seconds=0.6, sync_timeout_seconds=0.1)
def test_sync_mode_timeout_answers_5004_and_the_task_keeps_running(
    sim: SimulatorClient, image_url: str
) -> None:
    response = sim.submit(image_url, enable_sync_mode=True)
    assert response.status_code == 200
    data = response.json()["data"]
    assert (data["status"], data["code"]) == ("processing", 5004)
    assert "Sync mode timed out" in data["error"]
    assert sim.wait(data["id"])["status"] == "completed"


def test_outputs_support_byte_ranges_and_head(sim: SimulatorClient, image_url: str) -> None:
    url = sim.wait(sim.submit_ok(image_url)["id"])["outputs"][0]
    whole = sim.anon.get(url).content
    head = sim.anon.head(url)
    assert int(head.headers["content-length"]) == len(whole)
    part = sim.anon.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206
    assert part.content == whole[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(whole)}"
    assert sim.anon.get(url, headers={"Range": f"bytes={len(whole)}-"}).status_code == 416


def test_runtime_config_changes_the_render(sim: SimulatorClient, image_url: str) -> None:
    changed = sim.anon.put(
        "/_sim/config", json={"render_mode": "real", "resolution": "160x90"}
    ).json()
    assert changed["resolution"] == [160, 90]
    assert "api_key" not in changed and "webhook_secret" not in changed
    video = sim.anon.get(sim.wait(sim.submit_ok(image_url)["id"])["outputs"][0]).content
    with av.open(io.BytesIO(video)) as container:
        assert container.streams.video[0].codec_context.width == 160
    bad = sim.anon.put("/_sim/config", json={"resolution": "161x90"})
    assert bad.status_code == 400


def test_reset_forgets_everything(sim: SimulatorClient, image_url: str) -> None:
    sim.wait(sim.submit_ok(image_url)["id"])
    sim.set_faults(submit_500=1.0)
    sim.anon.post("/_sim/reset").raise_for_status()
    ledger = sim.ledger()
    assert (ledger["predictions"], ledger["balance"], ledger["faults_fired"]) == ([], 10_000.0, {})
    assert sim.anon.get("/_sim/faults").json()["submit_500"] == 0.0
