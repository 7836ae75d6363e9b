"""What `kwaivgi/kling-v2.1-i2v-pro` accepts: the request schema and the input image's bytes.

Schema errors are answered at submit time (HTTP 400, error code 1400 for a missing field and
1401 for a bad one); image problems surface later, as a failed task, because WaveSpeed only
fetches the image once the task runs.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from PIL import Image, UnidentifiedImageError

from sandbox.wavespeed.clock import parse_iso
from sandbox.wavespeed.store import HistoryQuery

MAX_PROMPT_CHARS = 2500
MIN_IMAGE_SIDE = 300
DURATIONS = (5, 10)
DEFAULT_GUIDANCE_SCALE = 0.5
DEFAULT_DURATION = 5
PRICE_PER_5S_USD = 0.45
ACCEPTED_IMAGE_FORMATS = frozenset({"JPEG", "PNG"})

MAX_PAGE_SIZE = 100
STATUSES = frozenset({"created", "processing", "completed", "failed", "cancelled", "timeout"})

MISSING_PARAMETER = 1400
INVALID_PARAMETER = 1401


class InputError(ValueError):
    """A request field WaveSpeed would refuse; `message` names the field."""

    def __init__(self, field: str, message: str, code: int = INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.code = code


class ImageRejected(ValueError):
    """The fetched image is not one the model takes (a 1401 task failure)."""


@dataclass(frozen=True)
class ImageInfo:
    """What the simulator learned about an input image."""

    format: str
    width: int
    height: int


def price_usd(duration: int) -> float:
    """What WaveSpeed bills for one accepted prediction of `duration` seconds."""
    return round(PRICE_PER_5S_USD * duration / 5, 2)


def validate_input(body: dict[str, Any], durations: tuple[int, ...] = DURATIONS) -> dict[str, Any]:
    """The normalised model input (defaults applied) or an `InputError` for the first bad field."""
    normalised: dict[str, Any] = {
        "image": _required_string(body, "image"),
        "prompt": _prompt(body),
    }
    negative = body.get("negative_prompt")
    if negative is not None:
        if not isinstance(negative, str):
            raise InputError("negative_prompt", "negative_prompt must be a string")
        normalised["negative_prompt"] = negative
    normalised["guidance_scale"] = _guidance_scale(body.get("guidance_scale"))
    normalised["duration"] = _duration(body.get("duration"), durations)
    _sync_flag(body.get("enable_sync_mode"))
    return normalised


def _required_string(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if value is None or value == "":
        raise InputError(field, f"{field} is required", MISSING_PARAMETER)
    if not isinstance(value, str):
        raise InputError(field, f"{field} must be a string")
    return value


def _prompt(body: dict[str, Any]) -> str:
    prompt = _required_string(body, "prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(
            "prompt", f"prompt must be at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}"
        )
    return prompt


def _guidance_scale(value: Any) -> float:
    if value is None:
        return DEFAULT_GUIDANCE_SCALE
    # bool is an int to Python but not a number to a JSON schema.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError("guidance_scale", "guidance_scale must be a number")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InputError(
            "guidance_scale", f"guidance_scale must be between 0.00 and 1.00, got {value}"
        )
    return float(value)


def _duration(value: Any, durations: tuple[int, ...]) -> int:
    if value is None:
        return DEFAULT_DURATION
    # WaveSpeed's own examples send "5", so the string forms are accepted too.
    if isinstance(value, str) and value.strip() in {str(d) for d in durations}:
        return int(value.strip())
    if not isinstance(value, bool) and isinstance(value, int | float) and value in durations:
        return int(value)
    allowed = ", ".join(str(d) for d in durations)
    raise InputError("duration", f"duration must be one of {allowed}, got {value!r}")


def _sync_flag(value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise InputError("enable_sync_mode", "enable_sync_mode must be a boolean")


def inspect_image(data: bytes, max_bytes: int) -> ImageInfo:
    """Check the real bytes of an input image; raise `ImageRejected` saying why it is refused."""
    if len(data) > max_bytes:
        raise ImageRejected(f"image is {len(data)} bytes, more than the {max_bytes} byte limit")
    info = _identify(data)
    if info.format not in ACCEPTED_IMAGE_FORMATS:
        raise ImageRejected(f"image format {info.format} is not supported; use jpg, jpeg or png")
    if info.width < MIN_IMAGE_SIDE or info.height < MIN_IMAGE_SIDE:
        raise ImageRejected(
            f"image is {info.width}x{info.height}, smaller than {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}"
        )
    return info


def _identify(data: bytes) -> ImageInfo:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            return ImageInfo(str(image.format), image.width, image.height)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as exc:
        raise ImageRejected(f"image could not be decoded as jpg or png: {exc}") from exc


def parse_history_query(body: dict[str, Any]) -> HistoryQuery:
    """The filters of a history request; `page` and `page_size` are required, as documented."""
    status = _optional_string(body, "status")
    if status is not None and status not in STATUSES:
        raise InputError("status", f"status must be one of {', '.join(sorted(STATUSES))}")
    return HistoryQuery(
        page=_bounded_int(body, "page", 1, None),
        page_size=_bounded_int(body, "page_size", 1, MAX_PAGE_SIZE),
        model=_optional_string(body, "model"),
        status=status,
        created_after=_optional_time(body, "created_after"),
        created_before=_optional_time(body, "created_before"),
    )


def _bounded_int(body: dict[str, Any], field: str, low: int, high: int | None) -> int:
    value = body.get(field)
    if value is None:
        raise InputError(field, f"{field} is required", MISSING_PARAMETER)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(field, f"{field} must be an integer")
    if value < low or (high is not None and value > high):
        upper = f" and at most {high}" if high is not None else ""
        raise InputError(field, f"{field} must be at least {low}{upper}, got {value}")
    return value


def _optional_string(body: dict[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InputError(field, f"{field} must be a string")
    return value


def _optional_time(body: dict[str, Any], field: str) -> datetime | None:
    text = _optional_string(body, field)
    if text is None:
        return None
    try:
        return parse_iso(text)
    except ValueError as exc:
        raise InputError(field, f"{field} must be an ISO 8601 date-time, got {text!r}") from exc
