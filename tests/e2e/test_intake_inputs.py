"""Where a generation's input image lands: under the job's id, byte for byte what the producer
gave, whether it came as an upload (copied inside S3) or as a URL (fetched and checked)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from config.settings import settings_from
from sandbox.stack import Stack
from tests.support import image_bytes, serving, stored_counts, wait_for
from workers.db import unit_of_work
from workers.intake import GenerationInput, Refusal, create_job, load_image, store_upload
from workers.models import Tenant
from workers.runtime import build_guard, build_s3_client, build_storage
from workers.storage import Storage, StoredObject

pytestmark = pytest.mark.integration

PROMPT = "slow push-in, hair moving in the wind"


@pytest.fixture(scope="module")
def storage(stack: Stack) -> Iterator[Storage]:
    built = build_storage(settings_from(stack.env))
    yield built
    built.close()


class CountingStorage(Storage):
    """The real bucket, with a note of each call that moves image bytes or copies them."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(build_s3_client(settings), settings.s3_bucket)
        self.calls: list[str] = []

    def get_bytes(self, key: str) -> bytes:
        self.calls.append("get")
        return super().get_bytes(key)

    def put_bytes(self, key: str, body: bytes, content_type: str) -> StoredObject:
        self.calls.append("put")
        return super().put_bytes(key, body, content_type)

    def copy(self, source_key: str, key: str) -> None:
        self.calls.append("copy")
        super().copy(source_key, key)


def wait_completed(api: httpx.Client, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = api.get(f"/v1/generations/{job_id}").json()
        return job if job["status"] in ("completed", "failed", "cancelled") else None

    return dict(wait_for(done, timeout=90, interval=0.5))


def test_an_upload_is_copied_under_the_job_id_and_the_job_completes(
    api: httpx.Client, storage: Storage, portrait: bytes
) -> None:
    upload = api.post("/v1/uploads", files={"file": ("me.png", portrait, "image/png")})
    assert upload.status_code == 201, upload.text
    created = api.post(
        "/v1/generations", json={"upload_id": upload.json()["upload_id"], "prompt": PROMPT}
    )
    assert created.status_code == 201, created.text
    key = f"inputs/{created.json()['id']}/image.png"
    assert storage.get_bytes(key) == portrait
    head = storage.head(key)
    assert head is not None and head["ContentType"] == "image/png"
    job = wait_completed(api, created.json()["id"])
    assert job["status"] == "completed", job["error"]


def test_an_image_url_is_fetched_checked_and_stored_under_the_job_id(
    api: httpx.Client, storage: Storage
) -> None:
    picture = image_bytes(400, 320, "JPEG")
    with serving(picture, "application/octet-stream") as url:
        created = api.post("/v1/generations", json={"image_url": url, "prompt": PROMPT})
    assert created.status_code == 201, created.text
    key = f"inputs/{created.json()['id']}/image.jpg"
    assert storage.get_bytes(key) == picture
    head = storage.head(key)
    assert head is not None and head["ContentType"] == "image/jpeg"


def test_an_image_url_that_is_no_image_is_refused_and_stores_nothing(
    api: httpx.Client, stack: Stack
) -> None:
    before = stored_counts(stack)
    with serving(b"<html>not a picture</html>", "image/png") as url:
        answer = api.post("/v1/generations", json={"image_url": url, "prompt": PROMPT})
    assert answer.status_code == 422
    error = answer.json()["errors"][0]
    assert (error["field"], error["code"]) == ("image_url", "image_unreadable")
    assert stored_counts(stack) == before


def test_an_unknown_upload_id_is_refused_and_stores_nothing(
    api: httpx.Client, stack: Stack
) -> None:
    before = stored_counts(stack)
    answer = api.post("/v1/generations", json={"upload_id": "nope", "prompt": PROMPT})
    assert answer.status_code == 422
    error = answer.json()["errors"][0]
    assert (error["field"], error["code"]) == ("upload_id", "upload_not_found")
    assert stored_counts(stack) == before


def test_a_job_from_an_upload_copies_it_inside_s3_without_reading_it_back(
    settings: Settings,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    storage: Storage,
    portrait: bytes,
) -> None:
    counting = CountingStorage(settings)
    guard = build_guard(settings)
    try:
        with unit_of_work(sessions) as session:
            upload = store_upload(session, counting, tenant, portrait, settings)
        request = GenerationInput(
            prompt=PROMPT, guidance_scale=0.5, duration=5, upload_id=upload.id
        )
        counting.calls.clear()
        with unit_of_work(sessions) as session:
            image = load_image(session, guard, tenant, request, settings)
        job = create_job(sessions, counting, settings, tenant, request, image)
    finally:
        guard.close()
        counting.close()
    assert counting.calls == ["copy"]
    assert (job.input_key, job.input_content_type) == (f"inputs/{job.id}/image.png", "image/png")
    assert storage.get_bytes(job.input_key) == portrait


def test_service_callers_may_still_hand_accept_raw_bytes(
    settings: Settings, sessions: sessionmaker[Session], tenant: Tenant, portrait: bytes
) -> None:
    # tests/integration/flow.py and bench/jobs.py create jobs this way, without an upload.
    counting = CountingStorage(settings)
    request = GenerationInput(prompt=PROMPT, guidance_scale=0.5, duration=5)
    try:
        job = create_job(sessions, counting, settings, tenant, request, portrait)
        with pytest.raises(Refusal) as refused:
            create_job(sessions, counting, settings, tenant, request, b"not a picture")
    finally:
        counting.close()
    assert counting.calls == ["put"]
    assert job.input_key == f"inputs/{job.id}/image.png"
    assert (refused.value.field, refused.value.code) == ("image_url", "image_unreadable")
