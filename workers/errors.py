"""Stable error codes a failed job carries, and how WaveSpeed's task codes map onto them."""

from __future__ import annotations

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
    CANCELLED = "cancelled"  # not a failure: a cancelled job says why it ended


# WaveSpeed task codes (`data.code` of a failed prediction) that retrying cannot fix.
PERMANENT_TASK_CODES: dict[int, ErrorCode] = {
    1200: ErrorCode.CONTENT_MODERATED,
    1400: ErrorCode.INVALID_INPUT,
    1401: ErrorCode.INVALID_INPUT,
    1402: ErrorCode.IMAGE_UNREACHABLE,
    1403: ErrorCode.GENERATION_FAILED,
    1405: ErrorCode.GENERATION_FAILED,
}


def task_failure(code: int | None) -> tuple[ErrorCode, bool]:
    """Our error code for a failed WaveSpeed task, and whether a resubmission may succeed."""
    if code is not None and code in PERMANENT_TASK_CODES:
        return PERMANENT_TASK_CODES[code], False
    if code is not None and 5000 <= code < 6000:
        return ErrorCode.UPSTREAM_UNAVAILABLE, True
    return ErrorCode.GENERATION_FAILED, False
