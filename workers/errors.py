"""Stable error codes a failed job carries, and how WaveSpeed's failures map onto them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID_INPUT = "invalid_input"
    IMAGE_UNREACHABLE = "image_unreachable"
    CONTENT_MODERATED = "content_moderated"
    GENERATION_FAILED = "generation_failed"
    UPSTREAM_AUTH = "upstream_auth"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_CANCELLED = "upstream_cancelled"
    PROCESSING_TIMEOUT = "processing_timeout"
    # WaveSpeed answered a prediction's polls with 404/400 again and again: it lost it.
    PREDICTION_LOST = "prediction_lost"
    # A submit got no answer and WaveSpeed's history could not say, until the deadline,
    # whether it arrived: it may be charged.
    SUBMIT_UNCONFIRMED = "submit_unconfirmed"
    OUTPUT_EXPIRED = "output_expired"
    OUTPUT_INVALID = "output_invalid"
    STORAGE_FAILED = "storage_failed"
    # Put aside for an operator (see `kling quarantine`).
    QUARANTINED = "quarantined"
    # The job's own deadline passed before it completed: stopped, its prediction deleted.
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"  # not a failure: a cancelled job says why it ended
    EXPIRED = "expired"  # nor is this: the job's start deadline passed before it was submitted


# WaveSpeed task codes (`data.code` of a failed prediction) that retrying cannot fix.
PERMANENT_TASK_CODES: dict[int, ErrorCode] = {
    1200: ErrorCode.CONTENT_MODERATED,
    1400: ErrorCode.INVALID_INPUT,
    1401: ErrorCode.INVALID_INPUT,
    1403: ErrorCode.GENERATION_FAILED,
    1405: ErrorCode.GENERATION_FAILED,
}
# "Media URL not reachable": the image WaveSpeed reads is always our own copy in S3 (the API
# stages every input), so this is our storage's outage, not a bad input. Tried again (the
# failed task is refunded) with the other retryable failures, up to `submit_max_attempts`.
MEDIA_UNREACHABLE = 1402


@dataclass(frozen=True)
class Failure:
    """What a WaveSpeed failure means for a job: its error code, and whether trying the same
    thing again may succeed."""

    code: ErrorCode
    retryable: bool


def classify(*, status_code: int | None = None, task_code: int | None = None) -> Failure:
    """The one map from a WaveSpeed failure to our error code: the HTTP status of a call it
    refused or failed, or the task code of a prediction that failed (`task_code` wins)."""
    if task_code is not None or status_code is None:
        if task_code in PERMANENT_TASK_CODES:
            return Failure(PERMANENT_TASK_CODES[task_code], False)
        if task_code == MEDIA_UNREACHABLE:
            return Failure(ErrorCode.IMAGE_UNREACHABLE, True)
        if task_code is not None and 5000 <= task_code < 6000:
            return Failure(ErrorCode.UPSTREAM_UNAVAILABLE, True)
        return Failure(ErrorCode.GENERATION_FAILED, False)
    if status_code in (401, 403):
        return Failure(ErrorCode.UPSTREAM_AUTH, False)
    if status_code == 429 or status_code >= 500:
        return Failure(ErrorCode.UPSTREAM_UNAVAILABLE, True)
    return Failure(ErrorCode.INVALID_INPUT, False)
