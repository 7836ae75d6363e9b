"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    model_validator,
)
from pydantic_core import PydanticCustomError, PydanticKnownError

from config.settings import Priority
from workers.admission import PRIORITIES
from workers.bulk import MAX_ITEMS
from workers.callbacks import DEFAULT_EVENTS
from workers.feed import event_id
from workers.listing import JobFilter
from workers.models import (
    BrokerRequest,
    BulkAction,
    CallbackAttempt,
    CallbackDelivery,
    JobEvent,
    TenantEvent,
)
from workers.representation import Generation

EXAMPLE_PROMPT = (
    "Portrait in golden hour. Gentle breeze, subtle facial motion, soft lens flare, "
    "handheld micro-sway, realistic skin texture, 5 seconds."
)


def _storable(value: str) -> str:
    """Text PostgreSQL can store: no NUL characters, no lone surrogates."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode text") from exc
    return value


Text = Annotated[str, AfterValidator(_storable)]

# A producer's own metadata is stored in every job row, returned in every listing and matched
# by the list filter: bounded so that one caller cannot make rows, pages and indexes huge.
METADATA_MAX_KEYS = 50
METADATA_MAX_KEY_CHARS = 64
METADATA_MAX_VALUE_CHARS = 512
METADATA_MAX_BYTES = 8 * 1024

Scalar = str | int | float | bool | None


def _metadata_keys(value: Any) -> Any:
    """Checked before the values, so that no error message repeats an over-long key."""
    if not isinstance(value, dict):
        return value  # the dict validator says what is wrong with it
    if len(value) > METADATA_MAX_KEYS:
        raise PydanticCustomError(
            "too_many_keys", "{count} keys; at most {limit}",
            {"count": len(value), "limit": METADATA_MAX_KEYS},
        )  # fmt: skip
    if any(not 1 <= len(key) <= METADATA_MAX_KEY_CHARS for key in value):
        raise PydanticCustomError(
            "invalid_key", "keys are 1 to {limit} characters", {"limit": METADATA_MAX_KEY_CHARS}
        )
    for key in value:
        _storable(key)
    return value


def _metadata_value(value: Any) -> Scalar:
    """One scalar: a string of bounded length or a finite number (JSON's NaN and Infinity,
    which Python's parser accepts, are not JSON to PostgreSQL), true/false or null."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PydanticKnownError("finite_number")
        return value
    if isinstance(value, str):
        if len(value) > METADATA_MAX_VALUE_CHARS:
            raise PydanticKnownError("string_too_long", {"max_length": METADATA_MAX_VALUE_CHARS})
        return _storable(value)
    raise PydanticCustomError("not_a_scalar", "must be a string, a number, a boolean or null")


def _metadata_size(value: dict[str, Scalar]) -> dict[str, Scalar]:
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    if size > METADATA_MAX_BYTES:
        raise PydanticCustomError(
            "too_large", "{size} bytes as JSON; at most {limit}",
            {"size": size, "limit": METADATA_MAX_BYTES},
        )  # fmt: skip
    return value


MetadataValue = Annotated[
    Scalar,
    PlainValidator(
        _metadata_value,
        json_schema_input_type=Annotated[str, Field(max_length=METADATA_MAX_VALUE_CHARS)]
        | int | float | bool | None,
    ),
]  # fmt: skip
Metadata = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=METADATA_MAX_KEY_CHARS)], MetadataValue],
    BeforeValidator(_metadata_keys),
    AfterValidator(_metadata_size),
    Field(json_schema_extra={"maxProperties": METADATA_MAX_KEYS}),
]

Event = Literal[
    "generation.completed",
    "generation.failed",
    "generation.cancelled",
    "generation.expired",
    "generation.processing",
    "generation.refused",
]


# How far ahead a start deadline may be: a job may wait at the gate that long.
DEADLINE_MAX_SECONDS = 30 * 86400


def _ahead(value: datetime) -> datetime:
    left = (value - datetime.now(UTC)).total_seconds()
    if left <= 0:
        raise PydanticCustomError("in_the_past", "must be a time in the future")
    if left > DEADLINE_MAX_SECONDS:
        raise PydanticCustomError("too_far", "must be at most 30 days ahead")
    return value


class GenerationCreate(BaseModel):
    """A generation request: the image (a URL we fetch, or an earlier upload) and the motion."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {
                    "image_url": "https://example.com/portrait.jpg",
                    "prompt": EXAMPLE_PROMPT,
                    "negative_prompt": "blur, distort, low quality",
                    "guidance_scale": 0.5,
                    "duration": 5,
                    "webhook_url": "https://example.com/hooks/kling",
                    "webhook_events": ["generation.completed", "generation.failed"],
                    "metadata": {"order": "A-1042"},
                }
            ]
        },
    )

    image_url: AnyHttpUrl | None = Field(
        None, max_length=2048, description="http(s) URL of a jpg/png, >=300x300, <=10 MB"
    )
    upload_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9]{1,64}$", description="id from POST /v1/uploads"
    )
    prompt: Text = Field(min_length=1, max_length=2500)
    negative_prompt: Text | None = Field(None, max_length=2500)
    guidance_scale: float = Field(0.5, ge=0.0, le=1.0)
    duration: int = Field(
        5, ge=1, le=60, description="seconds: one of ALLOWED_DURATIONS (5 or 10 by default)"
    )
    webhook_url: AnyHttpUrl | None = Field(None, max_length=2048)
    webhook_events: list[Event] = Field(
        default_factory=lambda: list(DEFAULT_EVENTS)  # type: ignore[arg-type]
    )
    start_deadline: Annotated[AwareDatetime, AfterValidator(_ahead)] | None = Field(
        None,
        description=(
            "RFC 3339 time with its offset: a job not submitted to WaveSpeed by then ends "
            "`expired`, uncharged (or give `start_within_seconds`)"
        ),
    )
    start_within_seconds: float | None = Field(
        None, gt=0, le=DEADLINE_MAX_SECONDS,
        description="the start deadline as seconds from now",
    )  # fmt: skip
    deadline: Annotated[AwareDatetime, AfterValidator(_ahead)] | None = Field(
        None,
        description=(
            "RFC 3339 time with its offset: a job not completed by then stops, its prediction "
            "is deleted at WaveSpeed, and it fails `deadline_exceeded` (or give "
            "`deadline_within_seconds`)"
        ),
    )
    deadline_within_seconds: float | None = Field(
        None, gt=0, le=DEADLINE_MAX_SECONDS, description="the deadline as seconds from now",
    )  # fmt: skip
    priority: Priority = Field(
        "normal",
        description=(
            "The gate admits higher priorities first; within one, tenants take turns and a "
            "tenant's oldest job goes first"
        ),
    )
    metadata: Metadata = Field(
        default_factory=dict,
        description=(
            f"Your own keys; filterable in the list endpoint. At most {METADATA_MAX_KEYS} keys "
            f"of 1..{METADATA_MAX_KEY_CHARS} characters, strings of at most "
            f"{METADATA_MAX_VALUE_CHARS} characters, {METADATA_MAX_BYTES} bytes as JSON"
        ),
    )

    dry_run: bool = Field(
        False,
        description=(
            "Run every check a create runs (the image fetched and opened, budget and quotas) "
            "and answer 200 with the price, the budget left and the place it would get; "
            "nothing is stored, enqueued or charged"
        ),
    )

    @model_validator(mode="after")
    def _one_image(self) -> Self:
        if (self.image_url is None) == (self.upload_id is None):
            raise ValueError("give exactly one of image_url and upload_id")
        return self


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[dict[str, Any]] = Field(
        min_length=1, max_length=500, description="Up to 500 generation requests"
    )


class DryRun(BaseModel):
    """What a create would do: it would be accepted, at this price, and start about then."""

    dry_run: Literal[True] = True
    price_usd: Decimal
    budget_left_usd: Decimal | None = Field(
        description="The monthly budget left once this job is counted (null: no budget)"
    )
    queue_position: int | None = Field(description="Jobs the gate would admit before it")
    estimated_start_at: datetime | None
    estimated_completion_at: datetime | None


class BatchItem(BaseModel):
    """One item of a batch: its position, its HTTP-like status, and the job (or, for a dry
    run, what it would be) or the problem."""

    index: int
    status: int
    generation: Generation | None = None
    dry_run: DryRun | None = None
    problem: dict[str, Any] | None = None


class BatchResult(BaseModel):
    accepted: int
    refused: int
    items: list[BatchItem]


class GenerationPage(BaseModel):
    data: list[Generation]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page")


class RequestOut(BaseModel):
    """What came of a generation request sent over the broker (`generation.request`)."""

    request_id: str
    status: Literal["accepted", "refused"]
    job_id: uuid.UUID | None = Field(description="The job it made (accepted)")
    problem: dict[str, Any] | None = Field(description="Why it was refused (refused)")
    created_at: datetime

    @classmethod
    def of(cls, found: BrokerRequest) -> RequestOut:
        return cls(
            request_id=found.request_id, status="refused" if found.problem else "accepted",
            job_id=found.job_id, problem=found.problem, created_at=found.created_at,
        )  # fmt: skip


class FeedEvent(BaseModel):
    """One event of the feed: exactly what its callback carries, with its `webhook-id`."""

    id: str = Field(description="The `webhook-id` of the event's callback; pass as `after`")
    type: str
    timestamp: datetime
    data: dict[str, Any] = Field(description="The job record as it was when the event happened")

    @classmethod
    def of(cls, event: TenantEvent) -> FeedEvent:
        return cls(
            id=event_id(event.id), type=event.type, timestamp=event.payload["timestamp"],
            data=event.payload["data"],
        )  # fmt: skip


class EventFeed(BaseModel):
    data: list[FeedEvent]
    next_cursor: str | None = Field(
        None, description="Pass as `after` for the events after these (null: none so far)"
    )


class EventOut(BaseModel):
    from_state: str | None
    to_state: str
    reason: str | None
    at: datetime

    @classmethod
    def of(cls, event: JobEvent) -> EventOut:
        return cls(
            from_state=event.from_state, to_state=event.to_state, reason=event.reason, at=event.at
        )


class AttemptOut(BaseModel):
    at: datetime
    status_code: int | None
    error: str | None
    duration_ms: int


class DeliveryOut(BaseModel):
    id: uuid.UUID
    webhook_id: str
    event: str
    url: str
    status: str
    attempts: list[AttemptOut]
    next_attempt_at: datetime | None
    delivered_at: datetime | None

    @classmethod
    def of(cls, delivery: CallbackDelivery, attempts: list[CallbackAttempt]) -> DeliveryOut:
        return cls(
            id=delivery.id, webhook_id=event_id(delivery.id), event=delivery.event,
            url=delivery.url, status=delivery.status, next_attempt_at=delivery.next_attempt_at,
            delivered_at=delivery.delivered_at,
            attempts=[AttemptOut.model_validate(a, from_attributes=True) for a in attempts],
        )  # fmt: skip


class History(BaseModel):
    """A job's state history and every callback attempt made for it."""

    events: list[EventOut]
    deliveries: list[DeliveryOut]


class Upload(BaseModel):
    upload_id: str
    content_type: str
    width: int
    height: int
    bytes: int


class SigningSecret(BaseModel):
    secret: str = Field(
        description="Standard Webhooks secret (whsec_...) callbacks are signed with"
    )
    previous_secret_valid_until: datetime | None


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str]


# -- bulk actions ---------------------------------------------------------------------------

LiveStatus = Literal["queued", "submitting", "processing", "storing"]
Replayable = Literal["exhausted", "gone"]
MaxItems = Annotated[int, Field(ge=1, le=MAX_ITEMS, description=f"At most {MAX_ITEMS}")]


class BulkCancel(BaseModel):
    """Which of your live jobs to cancel; every given filter must match (none: all of them,
    up to `max_items`)."""

    model_config = ConfigDict(extra="forbid")

    status: list[LiveStatus] = Field(default_factory=list, max_length=4)
    priority: list[Priority] = Field(default_factory=list, max_length=3)
    metadata: dict[
        Annotated[Text, Field(min_length=1, max_length=METADATA_MAX_KEY_CHARS)],
        Annotated[Text, Field(max_length=METADATA_MAX_VALUE_CHARS)],
    ] = Field(default_factory=dict, max_length=METADATA_MAX_KEYS)
    created_after: AwareDatetime | None = None
    created_before: AwareDatetime | None = None
    max_items: MaxItems = 1000

    def filter(self) -> dict[str, Any]:
        return JobFilter(
            statuses=tuple(self.status), priorities=tuple(PRIORITIES[p] for p in self.priority),
            created_after=self.created_after, created_before=self.created_before,
            metadata=dict(self.metadata),
        ).to_json()  # fmt: skip


class BulkReplay(BaseModel):
    """Which of your callbacks to send again, each with its own `webhook-id`: those whose
    every attempt failed (`exhausted`, the default) or whose URL answered 410 (`gone`)."""

    model_config = ConfigDict(extra="forbid")

    status: list[Replayable] = Field(
        default_factory=lambda: list[Replayable](["exhausted"]), min_length=1, max_length=2
    )
    event: list[Event] = Field(default_factory=list, max_length=5)
    created_after: AwareDatetime | None = None
    created_before: AwareDatetime | None = None
    max_items: MaxItems = 1000

    def filter(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"max_items"})


class EndpointEnable(BaseModel):
    """A callback URL of yours that answered 410, to be delivered to again."""

    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl = Field(max_length=2048)


class BulkActionOut(BaseModel):
    """A bulk action and how far it got: `matched` items found, `done` acted on."""

    id: uuid.UUID
    kind: str
    status: str
    filter: dict[str, Any]
    max_items: int
    matched: int
    done: int
    error: str | None
    created_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, action: BulkAction) -> BulkActionOut:
        return cls.model_validate(action, from_attributes=True)
