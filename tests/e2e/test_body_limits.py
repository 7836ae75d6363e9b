"""The API's edge on the running stack: a `/v1` request without a live key is refused before
its body is read, a body over its route's limit is refused from its `Content-Length` or cut off
as it streams, and a caller's `X-Request-Id` is taken only when it is short and plain."""

from __future__ import annotations

import itertools
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from config.settings import settings_from
from sandbox.stack import Stack
from tests.support import chunked, raw_post, stored_counts, wait_for

pytestmark = pytest.mark.integration

FIFTY_MB = 50 * 1024 * 1024
JSON = "application/json"
MULTIPART = "multipart/form-data; boundary=b0undary"


def bearer(stack_info: dict[str, Any]) -> dict[str, str]:
    return {"authorization": f"Bearer {stack_info['api_key']}"}


def limits(stack: Stack) -> dict[str, int]:
    settings = settings_from(stack.env)
    return {
        "/v1/generations": settings.body_max_bytes,
        "/v1/generations/batch": settings.batch_body_max_bytes,
        "/v1/uploads": settings.upload_body_max_bytes,
        "/v1/wavespeed/webhook": settings.wavespeed_webhook_body_max_bytes,
    }


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/v1/uploads", MULTIPART), ("/v1/generations", JSON), ("/v1/generations/batch", JSON)],
)
@pytest.mark.parametrize("key", [None, "kp_not-a-live-key"])
def test_a_50_mb_body_without_a_live_key_is_refused_unread(
    stack_info: dict[str, Any], path: str, content_type: str, key: str | None
) -> None:
    headers = {"content-type": content_type, "content-length": str(FIFTY_MB)}
    if key:
        headers["authorization"] = f"Bearer {key}"
    # Not a byte of the body is sent: an API that waited for it would time out here.
    answer = raw_post(stack_info["api_url"], path, headers, timeout=10)
    assert answer.status == 401
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["www-authenticate"] == "Bearer"
    assert answer.headers["connection"] == "close"
    assert answer.json()["code"] == "unauthorized"
    assert answer.sent == 0


@pytest.mark.parametrize(
    "path", ["/v1/generations", "/v1/generations/batch", "/v1/uploads", "/v1/wavespeed/webhook"]
)
def test_a_declared_body_over_its_route_limit_is_refused_unread(
    stack: Stack, stack_info: dict[str, Any], path: str
) -> None:
    limit = limits(stack)[path]
    content_type = MULTIPART if path == "/v1/uploads" else JSON
    headers = {**bearer(stack_info), "content-type": content_type}
    before = stored_counts(stack)
    answer = raw_post(
        stack_info["api_url"], path, {**headers, "content-length": str(limit + 1)}, timeout=10
    )
    assert answer.status == 413
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["connection"] == "close"
    problem = answer.json()
    assert (problem["code"], problem["limit_bytes"]) == ("body_too_large", limit)
    assert str(limit) in problem["detail"]
    assert answer.sent == 0
    assert stored_counts(stack) == before


UPLOAD_PART = b'--b0undary\r\ncontent-disposition: form-data; name="file"; filename="a.png"\r\n\r\n'


@pytest.mark.parametrize(
    ("path", "content_type", "first"),
    [("/v1/generations", JSON, b'{"prompt": "'), ("/v1/wavespeed/webhook", JSON, b'{"id": "'),
     ("/v1/uploads", MULTIPART, UPLOAD_PART)],
)  # fmt: skip
def test_a_streamed_body_is_cut_off_once_it_passes_its_limit(
    stack: Stack, stack_info: dict[str, Any], path: str, content_type: str, first: bytes
) -> None:
    limit = limits(stack)[path]
    total = 64 * 1024 * 1024
    piece = b"x" * (16 * 1024)
    pieces = itertools.chain([first], (piece for _ in range(total // len(piece))))
    headers = {**bearer(stack_info), "content-type": content_type, "transfer-encoding": "chunked"}
    before = stored_counts(stack)
    answer = raw_post(stack_info["api_url"], path, headers, chunked(pieces), timeout=30)
    assert answer.status == 413
    assert answer.headers["connection"] == "close"
    assert (answer.json()["code"], answer.json()["limit_bytes"]) == ("body_too_large", limit)
    # The answer came while the body was still coming; what went out past the limit sat in
    # the socket buffers, not in the API.
    assert limit < answer.sent < total
    assert stored_counts(stack) == before


def test_bodies_within_their_limits_are_read(
    api: httpx.Client, stack: Stack, stack_info: dict[str, Any]
) -> None:
    settings = settings_from(stack.env)
    # A batch past the 1 MiB of a single create, each item refused on its own (no image).
    items = [{"prompt": "p" * 2500, "image_url": "not a url"} for _ in range(500)]
    batch = json.dumps({"items": items}).encode()
    assert settings.body_max_bytes < len(batch) < settings.batch_body_max_bytes
    answered = api.post("/v1/generations/batch", content=batch, headers={"content-type": JSON})
    assert answered.status_code == 200, answered.text
    assert answered.json()["refused"] == 500
    # An upload of exactly the image limit fits with its multipart framing; the image check,
    # not the body limit, refuses the bytes.
    junk = b"\0" * settings.image_max_bytes
    uploaded = api.post("/v1/uploads", files={"file": ("x" * 200 + ".png", junk, "image/png")})
    assert uploaded.status_code == 422, uploaded.text
    assert uploaded.json()["errors"][0]["field"] == "file"


def test_a_plain_request_id_is_echoed(api: httpx.Client) -> None:
    sent = "trace-" + "A1._:-" * 20  # 126 characters of the allowed set
    answer = api.get("/v1/generations", headers={"x-request-id": sent})
    assert answer.headers["x-request-id"] == sent


@pytest.mark.parametrize(
    "sent", ["x" * 129, "has space", "<script>alert(1)</script>", "line\tbreak", "caf\u00e9"]
)
def test_an_unfit_request_id_is_replaced_not_echoed_or_logged(
    stack_info: dict[str, Any], sent: str
) -> None:
    marker = uuid.uuid4().hex
    value = f"{sent}{marker}".encode()  # raw bytes on the wire
    # A webhook that fails its signature logs a line, so the log shows which id it carried.
    answer = httpx.post(
        f"{stack_info['api_url']}/v1/wavespeed/webhook", content=b"{}",
        headers={"x-request-id": value},
    )  # fmt: skip
    assert answer.status_code == 401
    generated = answer.headers["x-request-id"]
    assert len(generated) == 32 and marker not in generated
    log = Path(stack_info["logs"]) / "api.log"
    wait_for(lambda: generated in log.read_text(errors="replace"), timeout=10)
    assert marker not in log.read_text(errors="replace")
