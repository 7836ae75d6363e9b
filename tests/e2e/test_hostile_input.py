"""Hostile input at the API's edge, on the running stack: every refusal names the field and
its rule with a stable code, stores and enqueues nothing, and is never a 5xx."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from sandbox.stack import Stack
from tests.support import png_claiming, serving, stored_counts
from workers.webhook_in import sign

pytestmark = pytest.mark.integration

PROMPT = "slow push-in, hair moving in the wind"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def upload_id(stack_info: dict[str, Any], portrait: bytes) -> str:
    headers = {"Authorization": f"Bearer {stack_info['api_key']}"}
    answer = httpx.post(
        f"{stack_info['api_url']}/v1/uploads", headers=headers, timeout=60,
        files={"file": ("p.png", portrait, "image/png")},
    )  # fmt: skip
    assert answer.status_code == 201, answer.text
    return str(answer.json()["upload_id"])


def errors(answer: httpx.Response) -> list[tuple[str, str]]:
    assert answer.headers["content-type"] == "application/problem+json", answer.text
    return [(e["field"], e["code"]) for e in answer.json()["errors"]]


def test_non_finite_numbers_are_refused_by_the_schema(
    api: httpx.Client, stack: Stack, upload_id: str
) -> None:
    # Python's JSON parser reads NaN and Infinity; PostgreSQL's JSONB refuses them.
    before = stored_counts(stack)
    start = f'{{"upload_id": "{upload_id}", "prompt": "{PROMPT}"'
    nan = api.post("/v1/generations", content=start + ', "metadata": {"x": NaN}}', headers=JSON)
    inf = api.post("/v1/generations", content=start + ', "guidance_scale": Infinity}', headers=JSON)
    assert (nan.status_code, errors(nan)) == (422, [("metadata.x", "not_finite")])
    assert (inf.status_code, errors(inf)) == (422, [("guidance_scale", "not_finite")])
    assert stored_counts(stack) == before


def test_a_batch_item_with_nan_gets_its_own_422(
    api: httpx.Client, stack: Stack, upload_id: str
) -> None:
    good = f'{{"upload_id": "{upload_id}", "prompt": "{PROMPT}"}}'
    bad = f'{{"upload_id": "{upload_id}", "prompt": "{PROMPT}", "metadata": {{"x": -Infinity}}}}'
    jobs_before = stored_counts(stack)[0]
    batch = f'{{"items": [{good}, {bad}]}}'
    answer = api.post("/v1/generations/batch", content=batch, headers=JSON)
    assert answer.status_code == 200, answer.text
    first, second = answer.json()["items"]
    assert first["status"] == 201
    assert second["status"] == 422
    assert [(e["field"], e["code"]) for e in second["problem"]["errors"]] == [
        ("metadata.x", "not_finite")
    ]
    assert stored_counts(stack)[0] == jobs_before + 1


def test_metadata_over_its_bounds_is_refused(api: httpx.Client, upload_id: str) -> None:
    body = {"upload_id": upload_id, "prompt": PROMPT}
    many = api.post("/v1/generations", json={**body, "metadata": {str(i): i for i in range(51)}})
    big = api.post(
        "/v1/generations", json={**body, "metadata": {f"k{i}": "v" * 500 for i in range(20)}}
    )
    assert (many.status_code, errors(many)) == (422, [("metadata", "too_many_keys")])
    assert (big.status_code, errors(big)) == (422, [("metadata", "too_large")])


@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (9000, 9000)])
def test_an_image_whose_header_claims_too_many_pixels_is_refused(
    api: httpx.Client, stack: Stack, width: int, height: int
) -> None:
    bomb = png_claiming(width, height)
    before = stored_counts(stack)
    uploaded = api.post("/v1/uploads", files={"file": ("bomb.png", bomb, "image/png")})
    with serving(bomb, "image/png") as url:
        fetched = api.post("/v1/generations", json={"image_url": url, "prompt": PROMPT})
    assert (uploaded.status_code, errors(uploaded)) == (422, [("file", "image_too_large")])
    assert (fetched.status_code, errors(fetched)) == (422, [("image_url", "image_too_large")])
    assert stored_counts(stack) == before


def test_hostile_wavespeed_webhook_headers_are_refused_not_a_500(
    stack: Stack, stack_info: dict[str, Any]
) -> None:
    url = f"{stack_info['api_url']}/v1/wavespeed/webhook"
    timestamp = str(int(time.time()))
    secret = stack.env["WAVESPEED_WEBHOOK_SECRET"]
    long_id = "p" * 65  # genuinely signed, but longer than the dedupe column
    body = json.dumps({"id": long_id, "status": "completed"}).encode()
    non_ascii = {
        "webhook-id": "p-x", "webhook-timestamp": timestamp,
        "webhook-signature": "v3,caf\u00e9".encode(),  # raw bytes on the wire
    }  # fmt: skip
    too_long = {
        "webhook-id": long_id, "webhook-timestamp": timestamp,
        "webhook-signature": f"v3,{sign(secret, long_id, timestamp, body)}",
    }  # fmt: skip
    for headers in (non_ascii, too_long):
        answer = httpx.post(url, content=body, headers=headers)
        assert answer.status_code == 401, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
