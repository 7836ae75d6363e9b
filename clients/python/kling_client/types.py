"""The API's records as typed dicts: what the calls answer, as JSON decodes it (times are
RFC 3339 strings, amounts decimal strings or numbers as the API sends them)."""

from __future__ import annotations

from typing import Any, Literal, TypedDict

Status = Literal[
    "queued", "submitting", "processing", "storing", "completed", "failed", "cancelled", "expired"
]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled", "expired"})


class FieldError(TypedDict):
    field: str
    code: str
    message: str


class Video(TypedDict):
    bucket: str
    key: str
    bytes: int
    sha256: str
    duration: float | None
    width: int | None
    height: int | None
    codec: str | None


class JobError(TypedDict):
    code: str
    message: str | None


class Generation(TypedDict, total=False):
    """A job record (`GET /v1/generations/{id}`), as callbacks carry it too."""

    id: str
    status: Status
    input: dict[str, Any]
    webhook_url: str | None
    metadata: dict[str, Any]
    priority: str
    start_deadline: str | None
    deadline: str | None
    retry_of: str | None
    request_id: str | None
    prediction_id: str | None
    submit_attempts: int
    created_at: str
    submitted_at: str | None
    completed_at: str | None
    deleted_at: str | None
    inference_ms: int | None
    nsfw: list[bool | None] | None
    video: Video | None
    cost_usd: str | float | None
    charged: str
    error: JobError | None
    queue_position: int | None
    estimated_start_at: str | None
    estimated_completion_at: str | None


class DryRun(TypedDict):
    dry_run: Literal[True]
    price_usd: str | float
    budget_left_usd: str | float | None
    queue_position: int | None
    estimated_start_at: str | None
    estimated_completion_at: str | None


class BatchItem(TypedDict, total=False):
    index: int
    status: int
    generation: Generation | None
    dry_run: DryRun | None
    problem: dict[str, Any] | None


class BatchResult(TypedDict):
    accepted: int
    refused: int
    items: list[BatchItem]


class Page(TypedDict):
    data: list[Generation]
    next_cursor: str | None


class Upload(TypedDict):
    upload_id: str
    content_type: str
    width: int
    height: int
    bytes: int


class HistoryEvent(TypedDict):
    from_state: str | None
    to_state: str
    reason: str | None
    at: str


class History(TypedDict):
    """A job's state history and every callback attempt made for it."""

    events: list[HistoryEvent]
    deliveries: list[dict[str, Any]]


class FeedEvent(TypedDict):
    """One event of the feed, exactly as its callback carries it; `id` is its `webhook-id`."""

    id: str
    type: str
    timestamp: str
    data: dict[str, Any]


class EventFeed(TypedDict):
    data: list[FeedEvent]
    next_cursor: str | None


# One Server-Sent Event of a job's stream; `from` is a keyword, hence this form.
StateChange = TypedDict(
    "StateChange",
    {"id": int, "from": str | None, "to": str, "reason": str | None, "at": str,
     "generation": Generation},
)  # fmt: skip


class RequestOutcome(TypedDict):
    """What came of a `generation.request` sent over the broker."""

    request_id: str
    status: Literal["accepted", "refused"]
    job_id: str | None
    problem: dict[str, Any] | None
    created_at: str


class SigningSecret(TypedDict):
    secret: str
    previous_secret_valid_until: str | None
