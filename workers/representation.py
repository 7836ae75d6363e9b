"""The job as producers see it: the resource the API answers and callbacks carry."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel

from config.settings import Priority
from workers import charges
from workers.admission import PRIORITY_NAMES
from workers.charges import Charged
from workers.estimates import Estimate
from workers.models import Job


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
    priority: Priority
    start_deadline: datetime | None
    deadline: datetime | None
    retry_of: uuid.UUID | None
    # The id of the broker request that made it (`api.inbox`), if one did.
    request_id: str | None
    prediction_id: str | None
    submit_attempts: int
    created_at: datetime
    submitted_at: datetime | None
    completed_at: datetime | None
    # Deleted: its inputs and video are gone, the rest of the record stays.
    deleted_at: datetime | None
    inference_ms: int | None
    # WaveSpeed's `has_nsfw_contents`: a flag per output, true where it flagged one.
    nsfw: list[bool | None] | None
    video: StoredVideo | None
    cost_usd: Decimal | None
    # Whether WaveSpeed charged for it (`workers.charges`): "unknown" when it cannot be told.
    charged: Charged
    error: JobError | None
    # Where a live job stands (`workers.estimates`), on records read from the API; ended
    # jobs, and the records callbacks carry, have none.
    queue_position: int | None = None
    estimated_start_at: datetime | None = None
    estimated_completion_at: datetime | None = None

    @classmethod
    def of(cls, job: Job, estimate: Estimate | None = None) -> Generation:
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
            priority=PRIORITY_NAMES[job.priority],
            start_deadline=job.start_deadline_at,
            deadline=job.deadline_at,
            retry_of=job.retry_of,
            request_id=job.request_id,
            prediction_id=job.prediction_id,
            submit_attempts=job.submit_attempts,
            created_at=job.created_at,
            submitted_at=job.submitted_at,
            completed_at=job.completed_at,
            deleted_at=job.deleted_at,
            inference_ms=job.inference_ms,
            nsfw=job.nsfw,
            video=video,
            cost_usd=job.cost_usd,
            charged=charges.of(job),
            error=JobError(code=job.error_code, message=job.error_message)
            if job.error_code
            else None,
            **(asdict(estimate) if estimate else {}),
        )
