"""Creating a generation, one way for every entry point: the HTTP routes and the requests that
come over the broker (`api.inbox`). Everything is checked before the job exists (the same
rules, the same codes), the image is staged in S3 outside any transaction, and the job, its
first task and what the entry point records beside it commit together."""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from datetime import datetime, timedelta

import structlog

from api.schemas import DryRun, GenerationCreate
from config import Settings
from workers.admission import PRIORITIES
from workers.estimates import WOULD_BE, Estimator
from workers.intake import (
    GenerationInput,
    InputImage,
    Refusal,
    accept,
    check_callback_url,
    check_quotas,
    commit_staged,
    load_image,
    stage,
)
from workers.models import Job, Tenant
from workers.pipeline import Pipeline, utcnow
from workers.states import JobState
from workers.work import Work

log = structlog.get_logger(__name__)

# An `Idempotency-Key`, a batch item's `idempotency_key`, a broker request's `request_id`.
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
# What an entry point records in the job's own transaction (an idempotency key, a request).
Also = Callable[[Work, Job], None]
# A bound on the image fetches of one tenant at once (the API's), or none.
FetchSlot = Callable[[str], AbstractContextManager[object]]


def _no_slot(_: str) -> AbstractContextManager[object]:
    return nullcontext()


def _deadline(at: datetime | None, within: float | None, names: tuple[str, str]) -> datetime | None:
    """A deadline given as a time or as seconds from now, not both."""
    if within is None:
        return at
    if at is not None:
        raise Refusal(422, names[1], "conflict", f"give {names[0]} or {names[1]}, not both")
    return utcnow() + timedelta(seconds=within)


def check_duration(duration: int, settings: Settings) -> None:
    if duration not in settings.allowed_durations:
        allowed = ", ".join(str(d) for d in settings.allowed_durations)
        raise Refusal(422, "duration", "not_allowed", f"duration must be one of {allowed}")


def request_of(body: GenerationCreate, settings: Settings) -> GenerationInput:
    """The checked request a valid body asks for (the rules no schema can state)."""
    start_deadline = _deadline(
        body.start_deadline, body.start_within_seconds, ("start_deadline", "start_within_seconds")
    )
    deadline = _deadline(
        body.deadline, body.deadline_within_seconds, ("deadline", "deadline_within_seconds")
    )
    check_duration(body.duration, settings)
    if start_deadline is not None and deadline is not None and start_deadline > deadline:
        raise Refusal(
            422, "start_deadline", "after_deadline", "the start deadline is after the deadline"
        )
    return GenerationInput(
        prompt=body.prompt, negative_prompt=body.negative_prompt,
        guidance_scale=body.guidance_scale, duration=body.duration,
        image_url=str(body.image_url) if body.image_url else None, upload_id=body.upload_id,
        webhook_url=str(body.webhook_url) if body.webhook_url else None,
        webhook_events=tuple(body.webhook_events), metadata=dict(body.metadata),
        priority=body.priority, start_deadline_at=start_deadline, deadline_at=deadline,
    )  # fmt: skip


def checked_image(
    pipeline: Pipeline, tenant: Tenant, request: GenerationInput, slot: FetchSlot = _no_slot
) -> InputImage:
    """The callback URL and the image checked as a create checks them (the image fetched
    through the guard and opened)."""
    if request.webhook_url:
        check_callback_url(pipeline.guard, request.webhook_url)
    with slot(tenant.id), pipeline.sessions() as db:
        return load_image(db, pipeline.guard, tenant, request, pipeline.settings)


def create(
    pipeline: Pipeline,
    tenant: Tenant,
    request: GenerationInput,
    *,
    idempotency: tuple[str, str] | None = None,
    also: Also | None = None,
    slot: FetchSlot = _no_slot,
) -> Job:
    """Everything checked before the job exists; the image staged in S3; the job, its first
    task, its idempotency key and `also` committed together; the task published after."""
    image = checked_image(pipeline, tenant, request, slot)
    return accepted(pipeline, tenant, request, image, idempotency, also)


def accepted(
    pipeline: Pipeline,
    tenant: Tenant,
    request: GenerationInput,
    image: InputImage,
    idempotency: tuple[str, str] | None,
    also: Also | None = None,
) -> Job:
    settings = pipeline.settings
    staged = stage(pipeline.storage, settings, request, image)

    def write(work: Work) -> Job:
        price = settings.price_usd[request.duration]
        check_quotas(work.session, tenant, price, utcnow(), settings)
        job = accept(work, tenant, request, staged, idempotency)
        if also is not None:
            also(work, job)
        return job

    # The first task goes out after the commit, tried once: the job exists either way, and
    # its outbox row is published later if the broker did not take it.
    job = commit_staged(pipeline.work, pipeline.storage, staged, write)
    log.info("generation.accepted", job_id=str(job.id))
    return job


def dry_run(
    pipeline: Pipeline,
    estimator: Estimator,
    tenant: Tenant,
    body: GenerationCreate,
    slot: FetchSlot = _no_slot,
) -> DryRun:
    """Every check of `create` (the image through the guard, the budget and the queue limit
    under the tenant's lock, in a transaction rolled back) and where the job would stand."""
    request = request_of(body, pipeline.settings)
    checked_image(pipeline, tenant, request, slot)
    price = pipeline.settings.price_usd[request.duration]
    with pipeline.sessions() as db:  # never committed
        left = check_quotas(db, tenant, price, utcnow(), pipeline.settings)
        would_be = Job(
            tenant_id=tenant.id, priority=PRIORITIES[request.priority], duration=request.duration,
            status=JobState.QUEUED,
        )  # fmt: skip
        estimate = estimator.of(db, [], would_be)[WOULD_BE]
    return DryRun(price_usd=price, budget_left_usd=left, **asdict(estimate))
