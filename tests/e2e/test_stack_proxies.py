"""A stack whose apps reach PostgreSQL, Redis, S3 and the simulator only through fault
proxies, while the harness reads the real services directly; and a second worker host behind
proxies of its own. The services are the session stack's (a database and a Redis database of
this module's own), so only the apps and the proxy process start here."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis

from sandbox.stack import SERVICE_URLS, Stack
from tests.support import SimulatorAdmin, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SHARED = ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_BUCKET",
          "WAVESPEED_BASE_URL", "WAVESPEED_API_KEY", "WAVESPEED_WEBHOOK_SECRET")  # fmt: skip


@pytest.fixture(scope="module")
def proxied(stack: Stack) -> Iterator[Stack]:
    base = stack.direct_env
    name = f"kling_proxied_{uuid.uuid4().hex[:8]}"
    admin_dsn = base["DATABASE_URL"].replace("+psycopg", "").rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    environ = {
        **os.environ,
        **{key: base[key] for key in SHARED},
        "DATABASE_URL": base["DATABASE_URL"].rsplit("/", 1)[0] + f"/{name}",
        "REDIS_URL": re.sub(r"/\d+$", "", base["REDIS_URL"]) + "/9",  # its own queues
    }
    # Not under pytest's tmp_path (mode 0700), as for the session stack.
    root = Path(tempfile.mkdtemp(prefix="kling-test-proxied-"))
    built = Stack(root, environ=environ, worker_concurrency=1, proxied=set(SERVICE_URLS))
    built.up()
    yield built
    built.down()
    with redis.Redis.from_url(environ["REDIS_URL"]) as queues:
        queues.flushdb()
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    shutil.rmtree(root, ignore_errors=True)


def test_apps_get_the_proxies_and_the_harness_the_real_services(proxied: Stack) -> None:
    for service, setting in SERVICE_URLS.items():
        proxy = proxied.proxies[service]
        assert proxied.env[setting] == proxy.rewrite(proxied.direct_env[setting])
        assert proxied.env[setting] != proxied.direct_env[setting]
        assert proxied.info["proxies"][service] == proxy.address
    assert proxied.info["database_url"] == proxied.direct_env["DATABASE_URL"]


@pytest.fixture
def proxied_api(proxied: Stack) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {proxied.info['api_key']}"}
    with httpx.Client(base_url=proxied.info["api_url"], headers=headers, timeout=60) as client:
        yield client


@pytest.fixture
def sim(proxied: Stack) -> Iterator[SimulatorAdmin]:
    admin = SimulatorAdmin(proxied.direct_env["WAVESPEED_BASE_URL"])
    yield admin
    admin.close()


def create_job(api: httpx.Client, portrait: bytes) -> str:
    upload = api.post("/v1/uploads", files={"file": ("me.png", portrait, "image/png")})
    assert upload.status_code == 201, upload.text
    body = {"upload_id": upload.json()["upload_id"], "prompt": "slow push-in", "duration": 5}
    created = api.post("/v1/generations", json=body)
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def job_of(api: httpx.Client, job_id: str) -> dict[str, Any]:
    return dict(api.get(f"/v1/generations/{job_id}").json())


def finished(api: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = job_of(api, job_id)
        return job if job["status"] in ("completed", "failed") else None

    return dict(wait_for(done, timeout=timeout, interval=0.25))


def test_a_job_runs_end_to_end_through_every_proxy(
    proxied: Stack, proxied_api: httpx.Client, sim: SimulatorAdmin, portrait: bytes
) -> None:
    api = proxied_api
    job = finished(api, create_job(api, portrait))
    assert job["status"] == "completed", job
    for service, stats in proxied.proxy_stats().items():
        up = stats["by_mode"]["up"]
        assert up["connections"] > 0 and up["bytes_downstream"] > 0, service
    # The simulator handed out its CDN URL on the address the worker reached it at: the proxy.
    output_url = sim.prediction(job["prediction_id"])["output_url"]
    assert output_url.startswith(f"http://{proxied.proxies['simulator'].address}/")


def test_a_job_does_not_finish_while_its_worker_is_cut_off_and_does_once_let_back(
    proxied: Stack, proxied_api: httpx.Client, sim: SimulatorAdmin, portrait: bytes
) -> None:
    api = proxied_api
    job_id = create_job(api, portrait)

    def past_submit() -> dict[str, Any] | None:
        job = job_of(api, job_id)
        return None if job["status"] in ("queued", "submitting") else job

    # Cut WaveSpeed off once the submit was answered, so the job is not left ambiguous.
    submitted = wait_for(past_submit, timeout=60, interval=0.05)
    assert submitted["status"] == "processing", submitted
    cut = proxied.proxies["simulator"]
    cut.set_mode("blackhole")
    try:
        # WaveSpeed finishes on its own; the worker's polls and output fetches go nowhere.
        prediction = submitted["prediction_id"]
        wait_for(lambda: sim.prediction(prediction)["status"] == "completed", timeout=60)
        wait_for(lambda: cut.stats()["by_mode"]["blackhole"]["bytes_dropped"] > 0, timeout=30)
        time.sleep(1.0)
        held = job_of(api, job_id)
        assert held["status"] in ("processing", "storing"), held
    finally:
        cut.set_mode("up")  # the stalled connections are reset; the worker's retries get through
    job = finished(api, job_id, timeout=60)
    assert job["status"] == "completed", job


def test_a_second_worker_host_is_cut_off_on_its_own(proxied: Stack) -> None:
    host_b = proxied.new_proxies("host-b", {"redis", "postgres"})
    worker = proxied.start_worker("worker-b", concurrency=1, through=host_b)
    try:
        assert worker.env["REDIS_URL"] == host_b["redis"].rewrite(proxied.direct_env["REDIS_URL"])
        assert worker.env["S3_ENDPOINT_URL"] == proxied.env["S3_ENDPOINT_URL"]  # shared proxy
        assert host_b["redis"].stats()["live"] > 0  # the ready worker holds broker connections
        host_b["redis"].set_mode("blackhole")
        stats = proxied.proxy_stats()
        assert stats["host-b.redis"]["stalled"] == stats["host-b.redis"]["live"] > 0
        assert stats["redis"]["stalled"] == 0  # the first host's broker connections flow on
        host_b["redis"].set_mode("up")
        assert host_b["redis"].stats()["by_mode"]["blackhole"]["resets"] > 0
    finally:
        worker.stop()
        proxied.apps.remove(worker)
