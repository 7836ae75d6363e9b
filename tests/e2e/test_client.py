"""The client library producers use, against the running stack."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import av
import httpx
import pytest

from api.client import ApiError, AsyncKlingClient, InvalidWebhook, KlingClient, verify_webhook
from sandbox.receiver import Receiver, serve
from sandbox.stack import Stack
from tests.support import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def kling(stack_info: dict[str, Any]) -> Any:
    with httpx.Client(timeout=60) as http:
        yield KlingClient(http, stack_info["api_url"], stack_info["api_key"])


def test_sync_client_round_trip(kling: KlingClient, tmp_path: Path) -> None:
    upload_id = kling.upload(ROOT / "examples" / "portrait.png")
    job = kling.create(upload_id=upload_id, prompt="tilt up", metadata={"suite": "client"})
    seen: list[str] = []
    done = kling.wait(job["id"], timeout=120, on_change=lambda j: seen.append(j["status"]))
    assert done["status"] == "completed" and seen[-1] == "completed"
    size = kling.download(job["id"], tmp_path / "clip.mp4")
    with av.open(io.BytesIO((tmp_path / "clip.mp4").read_bytes())) as container:
        assert container.streams.video[0].frames == 120
    assert size == done["video"]["bytes"]
    listed = kling.list(metadata={"suite": "client"}, limit=5)
    assert job["id"] in [g["id"] for g in listed["data"]]
    batch = kling.create_batch([{"upload_id": upload_id, "prompt": "pan left"}, {"prompt": ""}])
    assert (batch["accepted"], batch["refused"]) == (1, 1)
    cancelled = kling.cancel(batch["items"][0]["generation"]["id"])
    assert cancelled["status"] in ("cancelled", "completed")


def test_sync_client_raises_problems(kling: KlingClient) -> None:
    with pytest.raises(ApiError) as caught:
        kling.create(image_url="http://169.254.169.254/x.png", prompt="p")
    assert caught.value.status == 422 and caught.value.code == "url_not_allowed"


def test_async_client_round_trip(stack_info: dict[str, Any], kling: KlingClient) -> None:
    upload_id = kling.upload(ROOT / "examples" / "portrait.png")

    async def scenario() -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=60) as http:
            client = AsyncKlingClient(http, stack_info["api_url"], stack_info["api_key"])
            jobs = await asyncio.gather(
                *(client.create(upload_id=upload_id, prompt=f"orbit {i}") for i in range(3))
            )
            done = await asyncio.gather(*(client.wait(j["id"], timeout=120) for j in jobs))
            return {"statuses": [j["status"] for j in done]}

    assert asyncio.run(scenario())["statuses"] == ["completed"] * 3


def test_verify_webhook_accepts_ours_and_refuses_forgeries(
    kling: KlingClient, stack_info: dict[str, Any]
) -> None:
    upload_id = kling.upload(ROOT / "examples" / "portrait.png")
    with serve(Receiver()) as receiver:
        job = kling.create(upload_id=upload_id, prompt="pull-out", webhook_url=receiver.url)
        wait_for(lambda: receiver.received, timeout=120)
    received = receiver.received[0]
    event = verify_webhook(stack_info["webhook_secret"], received.body, received.headers)
    assert event["type"] == "generation.completed" and event["data"]["id"] == job["id"]
    with pytest.raises(InvalidWebhook):
        verify_webhook(stack_info["webhook_secret"], received.body + b" ", received.headers)


def test_the_readme_example_runs(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "producer.mp4"
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "producer.py"),
         "--stack", str(stack.root / "stack.json"), "--out", str(out)],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "callback generation.completed verified" in run.stdout
    assert out.stat().st_size > 0
