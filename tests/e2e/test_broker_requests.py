"""Producers on the broker, against the running stack: `generation.request` sent with Celery's
own `send_task`, replies published as the producer's task, and the example producer that has
only `celery[redis]` installed."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from celery import Celery

from sandbox.stack import Stack
from tests.support import serving, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
REPLY = {"task": "myapp.video_ready", "queue": "myapp-e2e",
         "events": ["generation.completed", "generation.refused"]}  # fmt: skip


@pytest.fixture
def producer(stack: Stack) -> Iterator[Celery]:
    app = Celery("myapp", broker=stack.env["REDIS_URL"])
    app.conf.update(task_serializer="json", accept_content=["json"])
    yield app
    app.close()


@pytest.fixture
def picture(portrait: bytes) -> Iterator[str]:
    with serving(portrait, "image/png") as url:
        yield url


def request(app: Celery, **kwargs: Any) -> None:
    app.send_task("generation.request", kwargs=kwargs, queue="requests")


def outcome(api: httpx.Client, request_id: str) -> dict[str, Any]:
    found = wait_for(lambda: (a := api.get(f"/v1/requests/{request_id}")).is_success and a)
    return dict(found.json())


def replies(stack: Stack, queue: str) -> list[dict[str, Any]]:
    """The Celery messages waiting in `queue` (kombu's Redis list): headers and kwargs."""
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    found = []
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        found.append({"headers": message["headers"], "kwargs": kwargs})
    client.close()
    return found


def replies_of(stack: Stack, request_id: str) -> list[dict[str, Any]]:
    return [
        r
        for r in replies(stack, REPLY["queue"])
        if r["kwargs"]["data"].get("request_id") == request_id
    ]


def test_a_request_sent_three_times_is_one_job_and_its_reply_comes_back(
    producer: Celery, api: httpx.Client, stack_info: dict[str, Any], stack: Stack, picture: str
) -> None:
    request_id = f"e2e-{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        request(producer, api_key=stack_info["api_key"], request_id=request_id,
                image_url=picture, prompt="slow push-in", reply=REPLY)  # fmt: skip
    taken = outcome(api, request_id)
    assert taken["status"] == "accepted"
    listed = api.get("/v1/generations", params={"request_id": request_id}).json()["data"]
    assert [job["id"] for job in listed] == [taken["job_id"]]
    wait_for(lambda: api.get(f"/v1/generations/{taken['job_id']}").json()["status"] == "completed")
    (reply,) = wait_for(lambda: replies_of(stack, request_id))
    assert reply["headers"]["task"] == "myapp.video_ready"
    assert reply["kwargs"]["type"] == "generation.completed"
    feed = api.get("/v1/events", params={"types": "generation.completed", "limit": 500}).json()
    ids = {e["id"] for e in feed["data"] if e["data"]["id"] == taken["job_id"]}
    assert {reply["headers"]["id"], reply["headers"]["webhook-id"]} == ids


def test_refusals_garbage_and_strangers_over_the_broker(
    producer: Celery, api: httpx.Client, stack_info: dict[str, Any], stack: Stack, picture: str
) -> None:
    before = api.get("/v1/generations", params={"limit": 100}).json()["data"]
    key = stack_info["api_key"]
    refused, other_queue = f"e2e-{uuid.uuid4().hex[:8]}", f"e2e-{uuid.uuid4().hex[:8]}"
    request(producer, api_key=key, request_id=refused, image_url=picture, prompt="",
            reply=REPLY)  # fmt: skip
    request(producer, api_key=key, request_id=other_queue, image_url=picture, prompt="x",
            reply={"task": "billing.charge", "queue": "submit"})  # fmt: skip
    request(producer, api_key="kl_stolen", request_id="x", image_url=picture, prompt="x")
    producer.send_task("generation.request", args=["garbage"], queue="requests")
    problem = outcome(api, refused)["problem"]
    assert problem["errors"][0]["field"] == "prompt"
    assert outcome(api, other_queue)["problem"]["errors"][0]["field"] == "reply.queue"
    (reply,) = wait_for(lambda: replies_of(stack, refused))
    assert reply["kwargs"]["type"] == "generation.refused"
    assert reply["kwargs"]["data"]["problem"] == problem
    assert api.get("/v1/requests/x").status_code == 404  # nothing made under a stolen key
    after = api.get("/v1/generations", params={"limit": 100}).json()["data"]
    assert len(after) == len(before)


def test_the_example_producer_runs_with_only_celery_installed(
    stack: Stack, stack_info: dict[str, Any], tmp_path: Path, picture: str
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "celery[redis]>=5.4"], check=True, timeout=600)
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    names = {p["name"].lower() for p in json.loads(installed.stdout)}
    assert names.isdisjoint({"sqlalchemy", "boto3", "av", "fastapi", "httpx", "kling-pipeline"})
    env = {
        **os.environ,
        "BROKER_URL": stack.env["REDIS_URL"],
        "KLING_API_KEY": stack_info["api_key"],
    }
    run = subprocess.run(
        [str(venv / "bin" / "python"), str(ROOT / "examples" / "celery_producer" / "producer.py"),
         "--image-url", picture, "--count", "20", "--timeout", "240"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 20, (run.stdout[-1500:], run.stderr[-3000:])
    assert {line["type"] for line in lines} == {"generation.completed"}
    assert len({line["request_id"] for line in lines}) == 20
    assert all(line["webhook_id"].startswith("msg_") for line in lines)
