"""Conformance: WaveSpeed's official Python SDK, unchanged, works against the simulator."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import av
import pytest
import requests
import wavespeed

from sandbox.wavespeed.config import DEFAULT_API_KEY, MODEL_ID
from sandbox.wavespeed.testing import SimulatorClient, sample_image, simulator_client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def sim() -> Iterator[SimulatorClient]:
    with simulator_client(inference_seconds=0.1) as client:
        yield client


@pytest.fixture
def sdk(sim: SimulatorClient) -> wavespeed.Client:
    return wavespeed.Client(api_key=DEFAULT_API_KEY, base_url=sim.base_url, retry_interval=0.01)


def test_upload_run_and_get_result(
    sdk: wavespeed.Client, sim: SimulatorClient, tmp_path: Path
) -> None:
    picture = tmp_path / "portrait.png"
    picture.write_bytes(sample_image(400, 400))
    image_url = sdk.upload(str(picture))
    assert requests.get(image_url, timeout=10).content == picture.read_bytes()

    output = sdk.run(MODEL_ID, {"image": image_url, "prompt": "slow orbit"}, poll_interval=0.05)
    (video_url,) = output["outputs"]
    video = requests.get(video_url, timeout=10).content
    with av.open(io.BytesIO(video)) as container:
        assert container.duration == 5_000_000

    prediction_id = sim.ledger()["predictions"][0]["id"]
    result = sdk.get_result(prediction_id)
    assert result["code"] == 200
    assert result["data"]["status"] == "completed"
    assert result["data"]["outputs"] == [video_url]


def test_upload_of_a_file_object(sdk: wavespeed.Client) -> None:
    stream = io.BytesIO(sample_image(320, 320))
    stream.name = "from-memory.png"
    url = sdk.upload(stream)
    # Named as WaveSpeed's CDN names an upload (its time and letters), keeping the extension.
    assert re.search(r"/images/[0-9]{19}_[A-Za-z0-9]{8}\.png$", url), url
    assert requests.get(url, timeout=10).content == stream.getvalue()


def test_sync_mode_run(sdk: wavespeed.Client, sim: SimulatorClient) -> None:
    image_url = sim.upload(sample_image())
    output = sdk.run(MODEL_ID, {"image": image_url, "prompt": "pan left"}, enable_sync_mode=True)
    assert output["outputs"][0].endswith(".mp4")


def test_failed_task_raises_with_the_task_error(sdk: wavespeed.Client) -> None:
    with pytest.raises(RuntimeError, match=r"failed .*download"):
        sdk.run(MODEL_ID, {"image": "http://127.0.0.1:9/x.png", "prompt": "go"}, poll_interval=0.05)


def test_validation_error_surfaces_the_400(sdk: wavespeed.Client) -> None:
    with pytest.raises(RuntimeError, match=r"HTTP 400.*duration"):
        sdk.run(MODEL_ID, {"image": "http://x/a.png", "prompt": "go", "duration": 7})


def test_sdk_retries_result_polls_through_injected_errors(
    sdk: wavespeed.Client, sim: SimulatorClient
) -> None:
    image_url = sim.upload(sample_image())
    sim.set_faults(result_500=0.3, result_429=0.3, seed=3)
    output = sdk.run(MODEL_ID, {"image": image_url, "prompt": "tilt up"}, poll_interval=0.05)
    assert output["outputs"]
    fired = sim.ledger()["faults_fired"]
    assert fired.get("result_500", 0) + fired.get("result_429", 0) > 0


def test_dropped_submit_answer_is_an_error_and_never_a_second_task(
    sdk: wavespeed.Client, sim: SimulatorClient
) -> None:
    image_url = sim.upload(sample_image())
    sim.set_faults(submit_drop_after_create=1.0)
    with pytest.raises(requests.exceptions.RequestException):
        sdk.run(MODEL_ID, {"image": image_url, "prompt": "go"}, max_retries=3)
    assert len(sim.ledger()["predictions"]) == 1
