"""The simulator's settings: one typed object built by the CLI or a test and passed down."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sandbox.wavespeed.faults import FaultProfile

MODEL_ID = "kwaivgi/kling-v2.1-i2v-pro"
DEFAULT_API_KEY = "sim-key"
# A fixed development secret, so a stack restart does not invalidate webhook verifiers.
DEFAULT_WEBHOOK_SECRET = "whsec_c2ltdWxhdG9yLWRldmVsb3BtZW50LXNlY3JldA"
DEFAULT_RESOLUTION = (480, 270)

RenderMode = Literal["real", "placeholder", "full_size"]


def parse_resolution(value: object) -> tuple[int, int]:
    """`"480x270"`, `[480, 270]` or `(480, 270)` as an even (width, height) pair."""
    if isinstance(value, str):
        width_text, sep, height_text = value.lower().partition("x")
        if not sep or not width_text.isdigit() or not height_text.isdigit():
            raise ValueError(f"resolution must look like 480x270, got {value!r}")
        width, height = int(width_text), int(height_text)
    elif isinstance(value, list | tuple) and len(value) == 2:
        width, height = int(value[0]), int(value[1])
    else:
        raise ValueError(f"resolution must look like 480x270, got {value!r}")
    # yuv420p halves chroma in both directions, so H.264 wants even sides.
    if width < 16 or height < 16 or width % 2 or height % 2 or max(width, height) > 4096:
        raise ValueError(f"resolution sides must be even and within 16..4096, got {value!r}")
    return width, height


class SimulatorConfig(BaseModel):
    """Everything the simulator can be told at start; a few fields change at runtime."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)
    api_key: str = Field(default=DEFAULT_API_KEY, min_length=1)
    webhook_secret: str = Field(default=DEFAULT_WEBHOOK_SECRET, pattern=r"^whsec_.+")
    inference_seconds: float = Field(default=2.0, ge=0.0)
    render_mode: RenderMode = "real"
    resolution: tuple[int, int] = DEFAULT_RESOLUTION
    fps: int = Field(default=24, ge=1, le=60)
    refund_delay_seconds: float = Field(default=5.0, ge=0.0)
    # The refund rule of a deleted prediction (WaveSpeed documents none): the share of its
    # charge given back when it had not started yet, and when it was already processing.
    delete_refund_unstarted: float = Field(default=1.0, ge=0.0, le=1.0)
    delete_refund_processing: float = Field(default=0.0, ge=0.0, le=1.0)
    # A processing task asked to stop runs on this long first (and may complete meanwhile).
    delete_stop_seconds: float = Field(default=0.0, ge=0.0)
    sync_timeout_seconds: float = Field(default=60.0, ge=0.0)
    initial_balance_usd: float = 10_000.0
    # The clip lengths a submit may ask for (the product's ALLOWED_DURATIONS, as the stack
    # passes them).
    allowed_durations: tuple[int, ...] = Field(default=(5, 10), min_length=1)
    max_image_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    max_upload_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    image_fetch_timeout_seconds: float = Field(default=15.0, gt=0.0)
    render_workers: int = Field(default=2, ge=1)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0.0)
    webhook_retries: int = Field(default=3, ge=0)
    webhook_backoff_seconds: float = Field(default=1.0, ge=0.0)
    faults: FaultProfile = Field(default_factory=FaultProfile)

    @field_validator("resolution", mode="before")
    @classmethod
    def even_resolution(cls, value: object) -> tuple[int, int]:
        return parse_resolution(value)


class RuntimeConfigPatch(BaseModel):
    """The fields `PUT /_sim/config` may change while the simulator runs."""

    model_config = ConfigDict(extra="forbid")

    render_mode: RenderMode | None = None
    resolution: tuple[int, int] | None = None
    inference_seconds: float | None = Field(default=None, ge=0.0)
    sync_timeout_seconds: float | None = Field(default=None, ge=0.0)
    refund_delay_seconds: float | None = Field(default=None, ge=0.0)
    delete_refund_unstarted: float | None = Field(default=None, ge=0.0, le=1.0)
    delete_refund_processing: float | None = Field(default=None, ge=0.0, le=1.0)
    delete_stop_seconds: float | None = Field(default=None, ge=0.0)
    webhook_backoff_seconds: float | None = Field(default=None, ge=0.0)

    @field_validator("resolution", mode="before")
    @classmethod
    def even_resolution(cls, value: object) -> tuple[int, int] | None:
        return None if value is None else parse_resolution(value)
