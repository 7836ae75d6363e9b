"""Accepting a generation: the image fetched and opened for real, copied to our bucket, and the
job stored with its first task in one transaction. Nothing is enqueued for a refused request."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy.orm import Session

from config import Settings
from workers import dispatch, jobs
from workers.media import ImageInfo, InvalidMedia, inspect_image
from workers.models import Job
from workers.storage import Storage


class Refusal(Exception):
    """A request we will not accept: which field, which rule (stable code), why."""

    def __init__(self, status: int, field: str, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.code = code
        self.message = message


@dataclass(frozen=True)
class GenerationInput:
    prompt: str
    guidance_scale: float
    duration: int
    image_url: str | None = None
    upload_id: str | None = None
    negative_prompt: str | None = None
    webhook_url: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def upload_key(upload_id: str) -> str:
    return f"uploads/{upload_id}"


def fetch_image(http: httpx.Client, url: str, settings: Settings) -> bytes:
    """Download at most `image_max_bytes` (+1, to tell "too large" apart) within the timeout."""
    limit = settings.image_max_bytes
    try:
        with http.stream("GET", url, timeout=settings.image_fetch_timeout_seconds) as response:
            if not response.is_success:
                raise Refusal(
                    422,
                    "image_url",
                    "image_unreachable",
                    f"image URL answered {response.status_code}",
                )
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > limit:
                    raise Refusal(
                        422, "image_url", "image_too_large", f"image is over {limit} bytes"
                    )
            return bytes(body)
    except httpx.HTTPError as exc:
        raise Refusal(
            422, "image_url", "image_unreachable", f"image URL cannot be fetched: {exc}"
        ) from exc


def check_image(data: bytes, settings: Settings, field: str) -> ImageInfo:
    try:
        return inspect_image(
            data, max_bytes=settings.image_max_bytes, min_side=settings.image_min_side
        )
    except InvalidMedia as exc:
        raise Refusal(422, field, exc.code, exc.message) from exc


def store_upload(storage: Storage, data: bytes, settings: Settings) -> tuple[str, ImageInfo]:
    """Validate an uploaded image and keep it; answers its id for `upload_id`."""
    info = check_image(data, settings, "file")
    upload_id = uuid.uuid4().hex
    storage.put_bytes(upload_key(upload_id), data, info.content_type)
    return upload_id, info


def load_upload(storage: Storage, upload_id: str) -> bytes:
    if not upload_id.isalnum() or storage.head(upload_key(upload_id)) is None:
        raise Refusal(422, "upload_id", "upload_not_found", "no upload with this id")
    return storage.get_bytes(upload_key(upload_id))


def accept(
    session: Session, storage: Storage, settings: Settings, request: GenerationInput, image: bytes
) -> Job:
    """Copy the image under the job's id (the URL WaveSpeed gets then names the job, which is
    how an unanswered submit is found in its history) and add the queued job and its outbox row
    to the session; the caller commits."""
    info = check_image(image, settings, "upload_id" if request.upload_id else "image_url")
    job_id = uuid.uuid4()
    key = f"inputs/{job_id}/image.{info.extension}"
    storage.put_bytes(key, image, info.content_type)
    job = Job(
        id=job_id,
        image_url=request.image_url,
        input_key=key,
        input_content_type=info.content_type,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        guidance_scale=request.guidance_scale,
        duration=request.duration,
        webhook_url=request.webhook_url,
        metadata_=request.metadata,
    )
    return jobs.create(session, job, first_task=dispatch.SUBMIT)
