"""The simulator's memory: predictions, uploaded media and the account ledger.

Everything lives in dicts owned by the event loop (only coroutines touch them, so no locks);
a restart forgets it all, as a fresh WaveSpeed account would look.
"""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import secrets
import string
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sandbox.wavespeed.clock import utcnow
from sandbox.wavespeed.render import Video

TERMINAL_STATUSES = frozenset({"completed", "failed", "deleted"})
HISTORY_WINDOW = timedelta(days=7)


@dataclass
class WebhookAttempt:
    """One try at delivering a prediction's webhook."""

    at: datetime
    status_code: int | None
    error: str | None


@dataclass
class Prediction:
    """One accepted task and everything the simulator knows about it."""

    id: str
    model: str
    input: dict[str, Any]
    base_url: str
    webhook_url: str | None
    charge_usd: float
    created_at: datetime = field(default_factory=utcnow)
    status: str = "created"
    code: int | None = None
    error: str = ""
    started_at: datetime | None = None
    completed_at: datetime | None = None
    output: Video | None = None
    output_sha256: str | None = None
    output_size: int | None = None
    refunded_usd: float = 0.0
    # Asked to be deleted while processing; it stops once `delete_stop_seconds` have passed.
    stopping: bool = False
    nsfw: bool = False
    webhook_attempts: list[WebhookAttempt] = field(default_factory=list)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def terminal(self) -> bool:
        """Whether the task will change no more."""
        return self.status in TERMINAL_STATUSES

    @property
    def output_url(self) -> str | None:
        """Where the finished MP4 is served, on the address the client reached us at."""
        return f"{self.base_url}/_sim/outputs/{self.id}.mp4" if self.output is not None else None

    def start(self) -> None:
        """Leave the queue: the model is now working on it."""
        self.status, self.started_at = "processing", utcnow()

    def complete(self, video: Video) -> None:
        """Finish with `video` as the one output."""
        self.output, self.output_sha256, self.output_size = video, video.sha256, video.size
        self.status, self.completed_at = "completed", utcnow()
        self.finished.set()

    def fail(self, code: int, message: str) -> None:
        """Finish as failed with a WaveSpeed task error code."""
        self.status, self.code, self.error = "failed", code, message
        self.completed_at = utcnow()
        self.finished.set()

    def mark_deleted(self) -> None:
        """Deleted by the account: outputs gone, and a running task stops where it is."""
        self.status, self.output = "deleted", None
        self.finished.set()


@dataclass
class Media:
    """An uploaded file: announced by a ticket, filled by the PUT (or at once, for multipart).
    `path` is where the CDN serves it, named as WaveSpeed names it, not after `filename`."""

    id: str
    filename: str
    content_type: str
    declared_size: int | None
    path: str = ""
    upload_token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    data: bytes | None = None


# The folder of WaveSpeed's CDN an upload lands in, by the major part of its content type.
MEDIA_FOLDERS = {"image": "images", "video": "videos", "audio": "audios"}


def account_id(api_key: str) -> str:
    """The account's id in WaveSpeed's media URLs (32 hex characters), stable for a key."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


def media_path(account: str, media_id: str, filename: str, content_type: str) -> str:
    """Where the CDN serves an upload, shaped like WaveSpeed's `download_url`s
    (`/media/<account>/images/<time_ns>_<8 letters>.<ext>`, under `/_sim`): the uploaded
    file's name is not in it, only its extension."""
    folder = MEDIA_FOLDERS.get(content_type.partition("/")[0], "files")
    extension = filename.rpartition(".")[2].lower() if "." in filename else ""
    if not extension.isalnum():
        guessed = mimetypes.guess_extension(content_type) or ".bin"
        extension = guessed.lstrip(".")
    return f"/_sim/media/{account}/{folder}/{media_id}.{extension}"


def media_id_of(path: str) -> str:
    """The media id a CDN path (`media_path`) names."""
    return path.rpartition("/")[2].rpartition(".")[0]


@dataclass(frozen=True)
class HistoryQuery:
    """The filters of `POST /api/v3/predictions`."""

    page: int
    page_size: int
    model: str | None = None
    status: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


class Store:
    """All state of one simulated WaveSpeed account."""

    def __init__(self, initial_balance_usd: float) -> None:
        self.predictions: dict[str, Prediction] = {}
        self.media: dict[str, Media] = {}
        self.initial_balance_usd = initial_balance_usd
        self.charged_usd = 0.0
        self.refunded_usd = 0.0

    @staticmethod
    def new_id() -> str:
        """A prediction id shaped like WaveSpeed's: 32 hex characters."""
        return uuid.uuid4().hex

    @staticmethod
    def new_media_id() -> str:
        """An uploaded file's id shaped like WaveSpeed's stored names: the upload's time in
        nanoseconds and eight random letters or digits (`1764761316371833793_r5ZX531Z`)."""
        alphabet = string.ascii_letters + string.digits
        return f"{time.time_ns()}_{''.join(secrets.choice(alphabet) for _ in range(8))}"

    def add(self, prediction: Prediction) -> None:
        """Record an accepted prediction and bill it."""
        self.predictions[prediction.id] = prediction
        self.charged_usd = round(self.charged_usd + prediction.charge_usd, 2)

    def refund(self, prediction: Prediction, share: float = 1.0) -> None:
        """Give `share` of a prediction's charge back (all of it for a failed one), once."""
        amount = round(prediction.charge_usd * share, 2)
        if prediction.refunded_usd == 0.0 and amount > 0:
            prediction.refunded_usd = amount
            self.refunded_usd = round(self.refunded_usd + amount, 2)

    def get(self, prediction_id: str) -> Prediction | None:
        """The prediction with that id, deleted ones included."""
        return self.predictions.get(prediction_id)

    @property
    def balance_usd(self) -> float:
        """What the account has left."""
        return round(self.initial_balance_usd - self.charged_usd + self.refunded_usd, 2)

    def history(self, query: HistoryQuery) -> tuple[int, list[Prediction]]:
        """The total matching and one page of them, newest first, of the last 7 days."""
        matching = [p for p in reversed(self.predictions.values()) if _matches(p, query)]
        start = (query.page - 1) * query.page_size
        return len(matching), matching[start : start + query.page_size]


def _matches(prediction: Prediction, query: HistoryQuery) -> bool:
    created = prediction.created_at
    return (
        prediction.status != "deleted"
        and created >= utcnow() - HISTORY_WINDOW
        and (query.model is None or prediction.model == query.model)
        and (query.status is None or prediction.status == query.status)
        and (query.created_after is None or created >= query.created_after)
        and (query.created_before is None or created <= query.created_before)
    )
