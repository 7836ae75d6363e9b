"""Operations on the real embedded stack: Prometheus metrics move, logs carry context and no
secret ever reaches them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from config.settings import settings_from
from sandbox.processes import free_port
from sandbox.stack import Stack
from tests.e2e.test_generation import PROMPT, wait_terminal
from tests.support import SimulatorAdmin, wait_for
from tests.unit.test_compose import SERVICES, option
from workers.dispatch import QUEUES

pytestmark = pytest.mark.integration


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample at `url`, keyed by name and labels."""
    text = httpx.get(url, timeout=10).raise_for_status().text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def run_job(api: httpx.Client, portrait: bytes, request_id: str) -> dict[str, Any]:
    upload = api.post("/v1/uploads", files={"file": ("me.png", portrait, "image/png")})
    assert upload.status_code == 201, upload.text
    created = api.post(
        "/v1/generations",
        json={"upload_id": upload.json()["upload_id"], "prompt": PROMPT, "duration": 5},
        headers={"x-request-id": request_id},
    )
    assert created.status_code == 201, created.text
    job = wait_terminal(api, created.json()["id"])
    assert job["status"] == "completed", job["error"]
    return job


def test_metrics_move_when_a_job_completes(
    api: httpx.Client,
    stack: Stack,
    stack_info: dict[str, Any],
    portrait: bytes,
    simulator: SimulatorAdmin,
) -> None:
    urls = stack_info["metrics_urls"]
    api_before, worker_before = scrape(urls["api"]), scrape(urls["worker"])

    job = run_job(api, portrait, uuid.uuid4().hex)

    # The worker's pool children did the work; its main process reports all of them. The job
    # reads `completed` a moment before the worker counts it, hence the wait.
    expected = [
        (
            "kling_wavespeed_requests_total",
            {"operation": "submit", "outcome": "ok", "status": "2xx"},
            1,
        ),
        (
            "kling_wavespeed_requests_total",
            {"operation": "result", "outcome": "ok", "status": "2xx"},
            1,
        ),
        ("kling_job_transitions_total", {"state": "completed"}, 1),
        ("kling_s3_store_bytes_total", {}, job["video"]["bytes"]),
        ("kling_s3_store_seconds_count", {}, 1),
        ("kling_spend_usd_total", {}, 0.45 - 1e-9),  # a float sum of many prices
        ("kling_submit_latency_seconds_count", {}, 1),
        ("kling_end_to_end_latency_seconds_count", {}, 1),
    ]

    def short() -> list[str]:
        after = scrape(urls["worker"])
        return [
            name for name, labels, least in expected
            if moved(worker_before, after, name, **labels) < least
        ]  # fmt: skip

    with contextlib.suppress(AssertionError):
        wait_for(lambda: not short(), timeout=15, interval=0.5)
    assert not short()

    # The API created the job and reads the backlog at scrape time.
    api_after = scrape(urls["api"])
    assert moved(api_before, api_after, "kling_job_transitions_total", state="queued") >= 1
    assert value(api_after, "kling_jobs", state="completed") >= 1
    for queue in QUEUES:
        assert ("kling_queue_depth", frozenset({("queue", queue)})) in api_after
    # The gate as the pipeline runs it: its caps, and what it counts against them.
    gate = settings_from(stack.env)
    assert value(api_after, "kling_gate_max_in_flight") == gate.max_in_flight
    assert value(api_after, "kling_gate_submits_per_minute") == gate.submits_per_minute
    assert ("kling_gate_in_flight", frozenset()) in api_after
    assert ("kling_gate_submits_last_minute", frozenset()) in api_after


def test_metrics_ask_for_the_metrics_token_once_one_is_set(
    stack: Stack, stack_info: dict[str, Any]
) -> None:
    token = secrets.token_urlsafe(24)
    port = free_port()
    api = stack.start_api("metrics-token-api", port, {"METRICS_TOKEN": token})
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        for authorization in (
            None,
            "Bearer wrong-token",
            f"Bearer {token}x",
            f"Basic {token}",
            f"Bearer {stack_info['api_key']}",  # a tenant's key is no metrics token
        ):
            headers = {"Authorization": authorization} if authorization else {}
            refused = httpx.get(url, headers=headers, timeout=10)
            assert refused.status_code == 401, authorization
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert refused.headers["www-authenticate"] == "Bearer"
            assert refused.json()["code"] == "unauthorized"
            assert "kling_" not in refused.text
        allowed = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert allowed.status_code == 200 and "kling_jobs" in allowed.text
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
    finally:
        api.stop()
    # Without a token (the stack's own API) the metrics stay open.
    assert httpx.get(stack_info["metrics_urls"]["api"], timeout=10).status_code == 200
    log = (Path(stack_info["logs"]) / "metrics-token-api.log").read_text(errors="replace")
    assert token not in log


def test_the_compose_worker_health_check_passes_only_while_that_worker_consumes(
    stack: Stack,
) -> None:
    service = SERVICES["worker-store"]
    command = service["command"]
    # Run as the container's shell runs it: `$$` is compose's escape, HOSTNAME Docker's.
    script = service["healthcheck"]["test"][1].replace("$$", "$")
    env = {
        **stack.env,
        "REDIS_URL": re.sub(r"/\d+$", "", stack.env["REDIS_URL"]) + "/4",  # queues of its own
        "HOSTNAME": socket.gethostname(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60
        )

    worker = stack.start_worker(
        "health-worker", concurrency=1, env=env, node=option(command, "-n"),
        queues=option(command, "-Q").split(","),
    )  # fmt: skip
    try:
        healthy = check()
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert "pong" in healthy.stdout
    finally:
        worker.stop()
    # Gone (as a worker that lost the broker is, to it): no answer, and the check fails.
    unhealthy = check()
    assert unhealthy.returncode != 0
    assert "No nodes replied" in unhealthy.stdout + unhealthy.stderr


def test_logs_carry_the_job_context_and_no_secret(
    api: httpx.Client,
    stack: Stack,
    stack_info: dict[str, Any],
    portrait: bytes,
    simulator: SimulatorAdmin,
) -> None:
    request_id = uuid.uuid4().hex
    wrong_key = f"kl_wrong_{uuid.uuid4().hex}"
    refused = httpx.get(
        f"{stack_info['api_url']}/v1/generations",
        headers={"Authorization": f"Bearer {wrong_key}"},
    )
    assert refused.status_code == 401
    job = run_job(api, portrait, request_id)

    lines = _json_lines(Path(stack_info["logs"]) / "worker.log")
    ours = [r for r in lines if r.get("job_id") == job["id"]]
    # The request that created the job leads its first tasks (a WaveSpeed webhook, itself a
    # request, may lead the later ones).
    assert request_id in {r.get("request_id") for r in ours}
    stored = next(r for r in ours if r.get("event") == "store.done")
    assert stored["prediction_id"] == job["prediction_id"]
    assert stored["tenant_id"] == stack_info["tenant_id"]
    assert stored["task"] == "generation.store"

    secrets = [
        stack_info["api_key"],
        wrong_key,
        stack_info["webhook_secret"],
        stack.env["WAVESPEED_API_KEY"],
        stack.env["WAVESPEED_WEBHOOK_SECRET"],
        "X-Amz-Signature",
        "X-Amz-Credential",
        *json.loads(stack.env["SECRET_KEYS"]),
    ]
    for name in ("api.log", "worker.log", "beat.log"):
        text = (Path(stack_info["logs"]) / name).read_text(errors="replace")
        leaked = [s for s in secrets if s in text]
        assert not leaked, f"{name} logs {leaked}"


def _json_lines(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]
