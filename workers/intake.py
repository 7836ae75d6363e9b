"""Accepting a generation: the image fetched (through the URL guard) and opened for real, or an
upload found; the image copied to our bucket under the new job's id (no transaction open
across the copy); then the budget checked and the job stored with its first task in one
transaction. Nothing is stored, enqueued or charged for a refused request: a copy whose job
is never created is removed again."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import structlog
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from config import Settings, tracing
from config.settings import Priority
from workers import admission, callbacks, dispatch, jobs
from workers.media import IMAGE_TYPES, ImageInfo, InvalidMedia, inspect_image
from workers.models import BrokerRequest, IdempotencyKey, Job, Tenant, Upload
from workers.states import LIVE, JobState
from workers.storage import Storage, StorageError
from workers.urlguard import UrlGuard, UrlRefused
from workers.work import Work, silent

T = TypeVar("T")

log = structlog.get_logger(__name__)


class Refusal(Exception):
    """A request we will not accept: which field, which rule (stable code), why."""

    def __init__(
        self,
        status: int,
        field: str,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class GenerationInput:
    prompt: str
    guidance_scale: float
    duration: int
    image_url: str | None = None
    upload_id: str | None = None
    negative_prompt: str | None = None
    webhook_url: str | None = None
    webhook_events: tuple[str, ...] = callbacks.DEFAULT_EVENTS
    metadata: dict[str, Any] = field(default_factory=dict)
    priority: Priority = "normal"
    start_deadline_at: datetime | None = None
    deadline_at: datetime | None = None
    retry_of: uuid.UUID | None = None
    # A request over the broker (`api.inbox`): its id, and where its events are replied to.
    request_id: str | None = None
    reply: dict[str, Any] | None = None


# The extension an input object gets, by the content type its bytes were checked to be.
_EXTENSIONS = dict(IMAGE_TYPES.values())


@dataclass(frozen=True)
class InputImage:
    """A checked image a job can start from: bytes fetched from a URL, or an upload already in
    our bucket (`source_key`), which was opened for real when it was uploaded."""

    content_type: str
    extension: str
    data: bytes | None = None
    source_key: str | None = None

    @classmethod
    def fetched(cls, data: bytes, info: ImageInfo) -> InputImage:
        return cls(info.content_type, info.extension, data=data)

    @classmethod
    def uploaded(cls, upload: Upload) -> InputImage:
        return cls(upload.content_type, _EXTENSIONS[upload.content_type], source_key=upload.key)

    def store(self, storage: Storage, key: str) -> None:
        """Put the image at `key`; an upload is copied inside S3, its bytes never pass here."""
        if self.source_key is not None:
            storage.copy(self.source_key, key)
        else:
            assert self.data is not None
            storage.put_bytes(key, self.data, self.content_type)


# What the guard's refusals mean for an image URL (field `image_url`).
_IMAGE_URL_CODES = {
    "too_large": "image_too_large",
    "timeout": "image_unreachable",
    "unreachable": "image_unreachable",
    "unresolvable": "image_unreachable",
    "bad_status": "image_unreachable",
}


def fetch_image(guard: UrlGuard, url: str, settings: Settings) -> bytes:
    """Download the image through the guard, at most `image_max_bytes`, within its timeouts."""
    try:
        fetched = guard.fetch(url, max_bytes=settings.image_max_bytes)
    except UrlRefused as exc:
        code = _IMAGE_URL_CODES.get(exc.code, "url_not_allowed")
        raise Refusal(422, "image_url", code, f"image URL refused: {exc}") from exc
    return fetched.content


def check_callback_url(guard: UrlGuard, url: str) -> None:
    try:
        guard.check(url)
    except UrlRefused as exc:
        raise Refusal(
            422, "webhook_url", "url_not_allowed", f"callback URL refused: {exc}"
        ) from exc


def check_image(data: bytes, settings: Settings, field: str) -> ImageInfo:
    try:
        return inspect_image(
            data, max_bytes=settings.image_max_bytes, min_side=settings.image_min_side,
            max_pixels=settings.image_max_pixels,
        )  # fmt: skip
    except InvalidMedia as exc:
        raise Refusal(422, field, exc.code, exc.message) from exc


def store_upload(
    session: Session, storage: Storage, tenant: Tenant, data: bytes, settings: Settings
) -> Upload:
    """Validate an uploaded image and keep it; its id is what `upload_id` refers to."""
    info = check_image(data, settings, "file")
    upload_id = uuid.uuid4().hex
    key = f"uploads/{tenant.id}/{upload_id}"
    storage.put_bytes(key, data, info.content_type)
    upload = Upload(
        id=upload_id, tenant_id=tenant.id, key=key, content_type=info.content_type,
        width=info.width, height=info.height, bytes=len(data),
    )  # fmt: skip
    session.add(upload)
    session.flush()
    return upload


def load_upload(session: Session, tenant: Tenant, upload_id: str) -> InputImage:
    upload = session.get(Upload, upload_id)
    if upload is None or upload.tenant_id != tenant.id:
        raise Refusal(422, "upload_id", "upload_not_found", "no upload with this id")
    return InputImage.uploaded(upload)


def load_image(
    session: Session, guard: UrlGuard, tenant: Tenant, request: GenerationInput,
    settings: Settings,
) -> InputImage:  # fmt: skip
    """The request's image, checked: its upload found, or its URL fetched and opened."""
    if request.upload_id:
        return load_upload(session, tenant, request.upload_id)
    assert request.image_url is not None
    data = fetch_image(guard, request.image_url, settings)
    return InputImage.fetched(data, check_image(data, settings, "image_url"))


def committed_spend(
    session: Session, tenant: Tenant, since: datetime, settings: Settings
) -> Decimal:
    """What the tenant's jobs of the month cost or may cost: in flight or queued, charged,
    or ended with a charge not known (`workers.charges`)."""
    return spend_by_tenant(session, since, settings, [tenant.id]).get(tenant.id, Decimal(0))


def spend_by_tenant(
    session: Session, since: datetime, settings: Settings, tenant_ids: Sequence[str] | None = None
) -> dict[str, Decimal]:
    """`committed_spend` of every tenant with jobs since `since` (or of `tenant_ids` only)."""
    query = select(Job.tenant_id, Job.duration, func.count()).where(
        Job.created_at >= since,
        # In flight (not settled yet), charged, or not known to be free.
        Job.charged.is_not(False),
    )
    if tenant_ids is not None:
        query = query.where(Job.tenant_id.in_(tenant_ids))
    rows = session.execute(query.group_by(Job.tenant_id, Job.duration)).all()
    # A duration no longer priced (PRICE_USD narrowed since) counts at the highest price.
    top = max(settings.price_usd.values())
    spent: dict[str, Decimal] = {}
    for tenant, duration, count in rows:
        price = settings.price_usd.get(duration, top) * count
        spent[tenant] = spent.get(tenant, Decimal(0)) + price
    return spent


def check_quotas(
    session: Session, tenant: Tenant, adding: Decimal, now: datetime, settings: Settings
) -> Decimal | None:
    """Refuse what would take the tenant over its monthly budget (402) or its queue over
    `max_queued` (429); answers the budget left once `adding` is spent (None: no budget). A
    per-tenant advisory lock makes concurrent requests see each other's jobs, so neither
    limit is passed by a burst."""
    if tenant.monthly_budget_usd is None and tenant.max_queued is None:
        return None
    session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": tenant.id})
    if tenant.max_queued is not None:
        _check_queue(session, tenant, tenant.max_queued, settings)
    if tenant.monthly_budget_usd is None:
        return None
    return _check_budget(session, tenant, tenant.monthly_budget_usd, adding, now, settings)


def _check_queue(session: Session, tenant: Tenant, limit: int, settings: Settings) -> None:
    queued = queued_count(session, tenant.id)
    if queued >= limit:
        # About when the next of its jobs leaves the queue, at the rate it is admitted.
        rate = tenant.submits_per_minute or settings.submits_per_minute
        raise Refusal(
            429, "max_queued", "queue_full",
            f"the tenant has {queued} jobs queued, its limit (max_queued) is {limit}",
            headers={"Retry-After": str(max(1, math.ceil(60 / rate)))},
        )  # fmt: skip


def queued_count(session: Session, tenant_id: str) -> int:
    return (
        session.scalar(
            select(func.count()).where(Job.tenant_id == tenant_id, Job.status == JobState.QUEUED)
        )
        or 0
    )


def tenant_usage(
    session: Session, tenant: Tenant, now: datetime, settings: Settings
) -> dict[str, dict[str, Any]]:
    """Each quota of the tenant: its limit in force (`own`: the tenant's, or None for the
    deployment's default) and what the tenant uses of it now."""
    minute_ago = now - timedelta(minutes=1)
    in_flight = (Job.status.in_([JobState.SUBMITTING, JobState.PROCESSING])) | (
        (Job.status == JobState.QUEUED) & Job.admitted_at.is_not(None)
    )
    counts = session.execute(
        select(
            func.count().filter(in_flight),
            func.count().filter(Job.status == JobState.QUEUED),
            func.count().filter(Job.last_submit_at > minute_ago),
        ).where(
            Job.tenant_id == tenant.id, Job.status.in_(LIVE) | (Job.last_submit_at > minute_ago)
        )
    ).one()
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    default_cap = settings.tenant_max_in_flight or settings.max_in_flight
    return {
        "max_in_flight": _quota(tenant.max_in_flight, default_cap, counts[0]),
        "submits_per_minute": _quota(
            tenant.submits_per_minute, settings.submits_per_minute, counts[2]
        ),
        "max_queued": _quota(tenant.max_queued, None, counts[1]),
        "weight": _quota(tenant.weight, 1, None),
        "retain_days": _quota(tenant.retain_days, None, None),
        "reject_nsfw": _quota(tenant.reject_nsfw, False, None),
        "reply_queues": _quota(tenant.reply_queues, None, None),
        "monthly_budget_usd": _quota(
            tenant.monthly_budget_usd, None, committed_spend(session, tenant, month, settings)
        ),
    }


def _quota(own: Any, default: Any, used: Any) -> dict[str, Any]:
    return {"limit": own if own is not None else default, "own": own, "used": used}


def _check_budget(
    session: Session, tenant: Tenant, budget: Decimal, adding: Decimal, now: datetime,
    settings: Settings,
) -> Decimal:  # fmt: skip
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    spent = committed_spend(session, tenant, month, settings)
    if spent + adding > budget:
        raise Refusal(
            402, "budget", "budget_exceeded",
            f"${adding} more would bring this month's spend (${spent}, jobs in flight "
            f"included) over the monthly budget of ${budget}",
        )  # fmt: skip
    return budget - spent - adding


@dataclass(frozen=True)
class StagedInput:
    """The input image copied under the id of a job about to be created."""

    job_id: uuid.UUID
    key: str
    content_type: str


def stage(
    storage: Storage, settings: Settings, request: GenerationInput, image: InputImage | bytes
) -> StagedInput:
    """Copy the image under a new job's id, before (and outside) the transaction that creates
    the job: the URL WaveSpeed gets then names the job, which is how an unanswered submit is
    found in its history. Raw bytes (service-layer callers) are checked here, as `load_image`
    checks a fetched URL. A failing S3 call raises `StorageError`."""
    if isinstance(image, bytes):
        named = "upload_id" if request.upload_id else "image_url"
        image = InputImage.fetched(image, check_image(image, settings, named))
    job_id = uuid.uuid4()
    key = f"inputs/{job_id}/image.{image.extension}"
    image.store(storage, key)
    return StagedInput(job_id, key, image.content_type)


def unstage(storage: Storage, staged: StagedInput) -> None:
    """Remove the copy of a job that was never created (best effort: S3 may be what failed;
    the bucket's lifecycle rule for `inputs/` is the backstop)."""
    try:
        storage.delete(staged.key)
    except StorageError as exc:
        log.warning("intake.unstage_failed", key=staged.key, error=str(exc))


def accept(
    work: Work,
    tenant: Tenant,
    request: GenerationInput,
    staged: StagedInput,
    idempotency: tuple[str, str] | None = None,
) -> Job:
    """Add the queued job to the unit of work, with its first task backed by the outbox and
    its `Idempotency-Key` (key, request digest) if it has one; the caller commits."""
    job = Job(
        id=staged.job_id,
        tenant_id=tenant.id,
        image_url=request.image_url,
        input_key=staged.key,
        input_content_type=staged.content_type,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        guidance_scale=request.guidance_scale,
        duration=request.duration,
        webhook_url=request.webhook_url,
        webhook_events=list(request.webhook_events),
        metadata_=request.metadata,
        priority=admission.PRIORITIES[request.priority],
        start_deadline_at=request.start_deadline_at,
        deadline_at=request.deadline_at,
        retry_of=request.retry_of,
        request_id=request.request_id,
        reply=request.reply,
        # The create request's span, whose parent is the producer's traceparent if one came.
        traceparent=tracing.current_traceparent(),
    )
    jobs.create(work.session, job)
    if request.retry_of is not None:  # the original's history lists its retries
        jobs.note(work.session, request.retry_of, f"retried as {job.id}")
    if idempotency is not None:
        key, digest = idempotency
        work.session.add(
            IdempotencyKey(tenant_id=tenant.id, key=key, request_hash=digest, job_id=job.id)
        )
    work.send_durable(dispatch.SUBMIT, job.id)
    return job


def again(original: Job, storage: Storage) -> tuple[GenerationInput, InputImage]:
    """The request and image of a job made again from `original`: the same inputs, callback
    and metadata, its copy of the image. Only a finished job is made again, and only while
    its input is still stored (a bucket lifecycle rule may have removed it)."""
    if not JobState(original.status).terminal:
        raise Refusal(
            409, "job_id", "not_finished",
            "only a completed, failed, cancelled or expired job can be retried",
        )  # fmt: skip
    if storage.head(original.input_key) is None:
        raise Refusal(409, "job_id", "input_gone", "the job's input image is no longer stored")
    request = GenerationInput(
        prompt=original.prompt, negative_prompt=original.negative_prompt,
        guidance_scale=original.guidance_scale, duration=original.duration,
        image_url=original.image_url, webhook_url=original.webhook_url,
        webhook_events=tuple(original.webhook_events or callbacks.DEFAULT_EVENTS),
        metadata=dict(original.metadata_), priority=admission.PRIORITY_NAMES[original.priority],
        reply=original.reply,
        retry_of=original.id,
    )  # fmt: skip
    extension = original.input_key.rpartition(".")[2]
    return request, InputImage(
        original.input_content_type, extension, source_key=original.input_key
    )


def broker_request(session: Session, tenant_id: str, request_id: str) -> BrokerRequest | None:
    """What came of the tenant's broker request `request_id` (`api.inbox`), if it came."""
    return session.get(BrokerRequest, (tenant_id, request_id))


def replayed(session: Session, tenant: Tenant, key: str, digest: str) -> Job | None:
    """The job an `Idempotency-Key` made before, if the same request made it; the same key
    with another request is refused (409)."""
    seen = session.get(IdempotencyKey, (tenant.id, key))
    if seen is None:
        return None
    if seen.request_hash != digest:
        raise Refusal(
            409, "Idempotency-Key", "idempotency_conflict",
            "this key was used with a different request body",
        )  # fmt: skip
    return jobs.get(session, seen.job_id)


def create_job(
    sessions: sessionmaker[Session],
    storage: Storage,
    settings: Settings,
    tenant: Tenant,
    request: GenerationInput,
    image: InputImage | bytes,
) -> Job:
    """Stage the image and commit the job, for service-layer callers (tests, benchmarks): its
    first task is left to the outbox relay."""
    staged = stage(storage, settings, request, image)
    return commit_staged(
        lambda: silent(sessions), storage, staged, lambda w: accept(w, tenant, request, staged)
    )


def commit_staged(
    unit: Callable[[], AbstractContextManager[Work]],
    storage: Storage,
    staged: StagedInput,
    write: Callable[[Work], T],
) -> T:
    """Run `write` in one unit of work and commit it. The staged image is removed only when
    no job can exist: the transaction failed before its COMMIT was sent. A COMMIT that
    raised may still have committed (the answer lost on the way back), and that job would
    need its image: it stays (the bucket's lifecycle rule for `inputs/` removes it if not)."""
    sent = False
    try:
        with unit() as work:
            written = write(work)
            work.session.flush()
            sent = True  # every row written; what may fail now is the COMMIT itself
        return written
    except BaseException:
        if not sent:
            unstage(storage, staged)
        raise
