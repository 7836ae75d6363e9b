"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, Self

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, model_validator

from workers.models import Job

EXAMPLE_PROMPT = (
    "Portrait in golden hour. Gentle breeze, subtle facial motion, soft lens flare, "
    "handheld micro-sway, realistic skin texture, 5 seconds."
)


class GenerationCreate(BaseModel):
    """A generation request: the image (a URL we fetch, or an earlier upload) and the motion."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "image_url": "https://example.com/portrait.jpg",
                    "prompt": EXAMPLE_PROMPT,
                    "negative_prompt": "blur, distort, low quality",
                    "guidance_scale": 0.5,
                    "duration": 5,
                    "webhook_url": "https://example.com/hooks/kling",
                    "metadata": {"order": "A-1042"},
                }
            ]
        },
    )

    image_url: AnyHttpUrl | None = Field(None, description="http(s) URL of a jpg/png, >=300x300")
    upload_id: str | None = Field(None, max_length=64, description="id from POST /v1/uploads")
    prompt: str = Field(min_length=1, max_length=2500)
    negative_prompt: str | None = Field(None, max_length=2500)
    guidance_scale: float = Field(0.5, ge=0.0, le=1.0)
    duration: Literal[5, 10] = 5
    webhook_url: AnyHttpUrl | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_image(self) -> Self:
        if (self.image_url is None) == (self.upload_id is None):
            raise ValueError("give exactly one of image_url and upload_id")
        return self


class GenerationInputs(BaseModel):
    image_url: str | None
    prompt: str
    negative_prompt: str | None
    guidance_scale: float
    duration: int


class StoredVideo(BaseModel):
    bucket: str
    key: str
    bytes: int
    sha256: str
    duration: float | None
    width: int | None
    height: int | None
    codec: str | None


class JobError(BaseModel):
    code: str
    message: str | None


class Generation(BaseModel):
    """The job record: inputs, progress at WaveSpeed, the stored video, cost, and any error."""

    id: uuid.UUID
    status: str
    input: GenerationInputs
    webhook_url: str | None
    metadata: dict[str, Any]
    prediction_id: str | None
    submit_attempts: int
    created_at: datetime
    submitted_at: datetime | None
    completed_at: datetime | None
    inference_ms: int | None
    video: StoredVideo | None
    cost_usd: Decimal | None
    error: JobError | None

    @classmethod
    def of(cls, job: Job) -> Generation:
        video = None
        if job.s3_key and job.s3_bucket and job.sha256 and job.bytes is not None:
            video = StoredVideo(
                bucket=job.s3_bucket, key=job.s3_key, bytes=job.bytes, sha256=job.sha256,
                duration=job.video_duration, width=job.video_width, height=job.video_height,
                codec=job.video_codec,
            )  # fmt: skip
        return cls(
            id=job.id,
            status=job.status,
            input=GenerationInputs(
                image_url=job.image_url,
                prompt=job.prompt,
                negative_prompt=job.negative_prompt,
                guidance_scale=job.guidance_scale,
                duration=job.duration,
            ),
            webhook_url=job.webhook_url,
            metadata=job.metadata_,
            prediction_id=job.prediction_id,
            submit_attempts=job.submit_attempts,
            created_at=job.created_at,
            submitted_at=job.submitted_at,
            completed_at=job.completed_at,
            inference_ms=job.inference_ms,
            video=video,
            cost_usd=job.cost_usd,
            error=JobError(code=job.error_code, message=job.error_message)
            if job.error_code
            else None,
        )


class Upload(BaseModel):
    upload_id: str
    content_type: str
    width: int
    height: int
    bytes: int
