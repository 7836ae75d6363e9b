"""The product end to end: HTTP API -> Celery worker -> simulator -> S3 -> Postgres."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import av
import boto3
import httpx
import psycopg
import pytest

from tests.support import SimulatorAdmin, image_bytes, wait_for

pytestmark = pytest.mark.integration

PROMPT = "Moody night street scene. Light rain, camera slow orbit around the subject, 5 seconds."


def wait_terminal(api: httpx.Client, job_id: str, timeout: float = 90) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = api.get(f"/v1/generations/{job_id}").json()
        return job if job["status"] in ("completed", "failed", "cancelled") else None

    return dict(wait_for(done, timeout=timeout, interval=0.5))


def s3_object(info: dict[str, Any], key: str) -> bytes:
    s3 = boto3.client(
        "s3", endpoint_url=info["s3_endpoint_url"], region_name="us-east-1",
        aws_access_key_id="sandbox", aws_secret_access_key="sandbox",
    )  # fmt: skip
    try:
        return bytes(s3.get_object(Bucket=info["s3_bucket"], Key=key)["Body"].read())
    finally:
        s3.close()


def count_jobs(info: dict[str, Any]) -> tuple[int, int]:
    dsn = info["database_url"].replace("+psycopg", "")
    with psycopg.connect(dsn) as conn:
        jobs = conn.execute("SELECT count(*) FROM jobs").fetchone()
        outbox = conn.execute("SELECT count(*) FROM outbox").fetchone()
    assert jobs is not None and outbox is not None
    return int(jobs[0]), int(outbox[0])


def test_upload_then_generate_stores_a_playable_video(
    api: httpx.Client, stack_info: dict[str, Any], portrait: bytes, simulator: SimulatorAdmin
) -> None:
    upload = api.post("/v1/uploads", files={"file": ("me.png", portrait, "image/png")})
    assert upload.status_code == 201, upload.text
    created = api.post(
        "/v1/generations",
        json={"upload_id": upload.json()["upload_id"], "prompt": PROMPT, "duration": 5},
    )
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "queued"

    job = wait_terminal(api, created.json()["id"])
    assert job["status"] == "completed", job["error"]
    video = job["video"]
    stored = s3_object(stack_info, video["key"])
    assert hashlib.sha256(stored).hexdigest() == video["sha256"]
    assert simulator.prediction(job["prediction_id"])["output_sha256"] == video["sha256"]
    assert video["bytes"] == len(stored) and video["codec"] == "h264"
    with av.open(io.BytesIO(stored)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
    assert frames == 120 and video["duration"] == pytest.approx(5.0, abs=0.1)
    assert job["cost_usd"] == "0.4500" and job["submitted_at"] and job["completed_at"]

    redirect = api.get(f"/v1/generations/{job['id']}/video")
    assert redirect.status_code == 307
    assert httpx.get(redirect.headers["location"]).content == stored


URL = "https://x.test/a.png"


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({"prompt": PROMPT}, "body", "invalid"),
        ({"image_url": URL, "prompt": ""}, "prompt", "too_short"),
        ({"image_url": URL, "prompt": "p" * 2501}, "prompt", "too_long"),
        ({"image_url": URL, "prompt": "p", "duration": 7}, "duration", "not_allowed"),
        (
            {"image_url": URL, "prompt": "p", "guidance_scale": 1.5},
            "guidance_scale",
            "out_of_range",
        ),
        ({"image_url": "ftp://x.test/a.png", "prompt": "p"}, "image_url", "invalid_url"),
        ({"image_url": URL, "prompt": "p", "colour": "red"}, "colour", "unknown_field"),
    ],
)
def test_bad_requests_are_refused_and_create_nothing(
    api: httpx.Client, stack_info: dict[str, Any], body: dict[str, Any], field: str, code: str
) -> None:
    before = count_jobs(stack_info)
    answer = api.post("/v1/generations", json=body)
    assert answer.status_code == 422
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    # A rule of the body's shape, or one of this deployment's (ALLOWED_DURATIONS) by name.
    assert problem["code"] in ("validation_error", code)
    assert {"field": field, "code": code} in [
        {"field": e["field"], "code": e["code"]} for e in problem["errors"]
    ]
    assert count_jobs(stack_info) == before


def test_an_image_too_small_is_refused_before_anything_is_charged(
    api: httpx.Client, stack_info: dict[str, Any], simulator: SimulatorAdmin
) -> None:
    charged = len(simulator.ledger()["predictions"])
    before = count_jobs(stack_info)
    answer = api.post("/v1/uploads", files={"file": ("s.png", image_bytes(200, 200), "image/png")})
    assert answer.status_code == 422
    assert answer.json()["errors"][0] == {
        "field": "file", "code": "image_too_small", "message": "image is 200x200; at least 300x300",
    }  # fmt: skip
    assert count_jobs(stack_info) == before
    assert len(simulator.ledger()["predictions"]) == charged


def test_unknown_image_url_is_refused(api: httpx.Client, stack_info: dict[str, Any]) -> None:
    before = count_jobs(stack_info)
    url = f"{stack_info['simulator_url']}/no/such/image.png"
    answer = api.post("/v1/generations", json={"image_url": url, "prompt": "p"})
    assert answer.status_code == 422 and answer.json()["code"] == "image_unreachable"
    assert count_jobs(stack_info) == before


def test_requests_without_the_key_are_refused(stack_info: dict[str, Any]) -> None:
    answer = httpx.post(f"{stack_info['api_url']}/v1/generations", json={})
    assert answer.status_code == 401 and answer.json()["code"] == "unauthorized"


def test_unknown_generation_is_404(api: httpx.Client) -> None:
    answer = api.get("/v1/generations/00000000-0000-0000-0000-000000000000")
    assert answer.status_code == 404 and answer.json()["code"] == "not_found"
