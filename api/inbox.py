"""Generation requests over the broker: a producer's `generation.request` task, on the
`requests` queue, is a create as `POST /v1/generations` makes it.

    app.send_task("generation.request", queue="requests", kwargs={
        "api_key": "...", "request_id": "order-1042",           # both required
        "image_url": "https://...", "prompt": "slow push-in",    # any create field
        "reply": {"task": "myapp.video_ready", "queue": "myapp",
                  "events": ["generation.completed", "generation.failed"]},
    })

- The key is checked by its hash, as the API checks it; `request_id` is the idempotency key:
  a redelivered or re-sent message finds its request recorded (`broker_requests`) and makes
  nothing. The fields are checked by the same code, rules and codes as the HTTP create
  (`api.creates`): the image fetched through the guard, budgets and quotas.
- Nobody waits for an answer, so the outcome is always reported: an accepted request is a job
  (`request_id` on its record, `GET /v1/generations?request_id=`); a refused one is recorded
  with its problem and announced as `generation.refused` (feed, callback, reply).
- A message without a valid key, or that is no request at all, makes nothing: it is counted
  (`kling_broker_requests_total`), logged without its key, and acknowledged.
- A request the product cannot take now (Postgres or S3 away, the tenant's queue full) is
  tried again, backing off, for about `REQUEST_RETRY_WINDOW_SECONDS`; past that it is
  recorded as refused with the last problem, or, if Postgres itself stays away, dropped and
  logged (the producer may send it again: the same `request_id` never makes two jobs).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
from dataclasses import replace
from typing import Any, get_args

import sqlalchemy.exc
import structlog
from celery import Task
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.dialects.postgresql import insert as pg_insert

from api import creates, problems
from api.problems import UNAVAILABLE
from api.schemas import Event, GenerationCreate
from workers import dispatch, metrics, tenants
from workers.announce import Audience, announce
from workers.callbacks import DEFAULT_EVENTS, REFUSED
from workers.celery_app import app
from workers.intake import Refusal, check_callback_url
from workers.models import BrokerRequest, Job, Tenant
from workers.pipeline import Pipeline, utcnow
from workers.tasks import pipeline as worker_pipeline
from workers.work import Work

log = structlog.get_logger(__name__)

ACCEPTED, REFUSED_OUTCOME, DUPLICATE, REJECTED = "accepted", "refused", "duplicate", "rejected"
EVENTS = frozenset(get_args(Event))
# The fields of the message that are not the create's.
OWN_FIELDS = ("api_key", "request_id", "reply")
MAX_KEY_CHARS = 200
# Waits between tries of a request the product could not take now, and how many.
RETRY_BACKOFF_MAX_SECONDS = 60
MAX_RETRIES = 30
REQUEST_RETRY_WINDOW_SECONDS = RETRY_BACKOFF_MAX_SECONDS * MAX_RETRIES
# Task names and queues that are the product's own: nobody replies into them.
OWN_TASK_PREFIXES = ("generation.", "maintenance.")


class ReplyTo(BaseModel):
    """Where a request's events go as the producer's own task."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")
    queue: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")
    events: list[Event] = Field(default_factory=lambda: list(DEFAULT_EVENTS), max_length=6)  # type: ignore[arg-type]


class Rejected(Exception):
    """A message that is no request of a tenant's: nothing is made or reported for it."""


class TryAgain(Exception):
    """The request cannot be taken now (the tenant's queue full): send it again later."""

    def __init__(self, refusal: Refusal, delay: float) -> None:
        super().__init__(refusal.message)
        self.refusal, self.delay = refusal, delay


def take(pipeline: Pipeline, message: Any, last_try: bool = False) -> str:
    """Take one request message; answers what came of it. Raises what is worth a try later
    (`TryAgain`, a failing Postgres or S3) unless `last_try`."""
    try:
        key, request_id = _identity(message)
        tenant = _tenant(pipeline, key)
    except Rejected as exc:
        metrics.BROKER_REQUESTS.labels(REJECTED).inc()
        log.warning("request.rejected", reason=str(exc))
        return REJECTED
    digest = _digest(message)
    if _seen(pipeline, tenant, request_id, digest):
        metrics.BROKER_REQUESTS.labels(DUPLICATE).inc()
        return DUPLICATE
    try:
        outcome = _create(pipeline, tenant, request_id, digest, message)
    except ValidationError as exc:
        problem = problems.validation_problem(exc.errors(include_url=False))
    except Refusal as exc:
        if exc.status == 429 and not last_try:
            raise TryAgain(exc, float(exc.headers.get("Retry-After", 5))) from exc
        problem = problems.refusal_problem(exc)
    except sqlalchemy.exc.IntegrityError:  # the same request raced in from a duplicate message
        outcome = DUPLICATE
    except UNAVAILABLE as exc:
        if not last_try:
            raise
        problem = problems.failure_problem(exc)  # recorded, if Postgres lets us
    else:
        metrics.BROKER_REQUESTS.labels(outcome).inc()
        return outcome
    outcome = _refuse(pipeline, tenant, request_id, digest, message, problem)
    metrics.BROKER_REQUESTS.labels(outcome).inc()
    return outcome


def _identity(message: Any) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise Rejected("the message is not a request (no keyword arguments)")
    key, request_id = message.get("api_key"), message.get("request_id")
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_CHARS:
        raise Rejected("no api_key")
    if not isinstance(request_id, str) or not creates.IDEMPOTENCY_KEY.fullmatch(request_id):
        raise Rejected("no request_id of 1 to 255 printable ASCII characters")
    return key, request_id


def _tenant(pipeline: Pipeline, key: str) -> Tenant:
    with pipeline.sessions() as db:
        tenant = tenants.authenticate(db, key)
        if tenant is None:
            raise Rejected("the api_key is not a live key")
        db.expunge(tenant)
    return tenant


def _digest(message: dict[str, Any]) -> str:
    fields = {k: v for k, v in message.items() if k != "api_key"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _seen(pipeline: Pipeline, tenant: Tenant, request_id: str, digest: str) -> bool:
    with pipeline.sessions() as db:
        seen = db.get(BrokerRequest, (tenant.id, request_id))
    if seen is not None and seen.request_hash != digest:
        # Another body under a request id already taken: the first one stands.
        log.warning("request.conflict", request_id=request_id, tenant_id=tenant.id)
    return seen is not None


def _create(
    pipeline: Pipeline, tenant: Tenant, request_id: str, digest: str, message: dict[str, Any]
) -> str:
    reply = _reply_of(message.get("reply"), tenant)
    body = GenerationCreate.model_validate(
        {k: v for k, v in message.items() if k not in OWN_FIELDS}
    )
    if body.dry_run:
        raise Refusal(
            422, "dry_run", "not_supported",
            "a dry run answers its caller: send it as POST /v1/generations",
        )  # fmt: skip
    request = replace(
        creates.request_of(body, pipeline.settings), request_id=request_id, reply=reply
    )

    def record(work: Work, job: Job) -> None:
        work.session.add(
            BrokerRequest(
                tenant_id=tenant.id, request_id=request_id, request_hash=digest, job_id=job.id
            )
        )

    creates.create(pipeline, tenant, request, also=record)
    return ACCEPTED


def _reply_of(raw: Any, tenant: Tenant) -> dict[str, Any] | None:
    """The checked `reply`: the producer's own task and queue, never the product's, and
    within the tenant's `reply_queues` when it has one."""
    if raw is None:
        return None
    try:
        reply = ReplyTo.model_validate(raw)
    except ValidationError as exc:
        raise Refusal(422, "reply", "invalid", f"reply: {exc.errors()[0]['msg']}") from exc
    if reply.queue in dispatch.QUEUES or reply.task.startswith(OWN_TASK_PREFIXES):
        raise Refusal(422, "reply.queue", "not_allowed", "replies never go to the product's own")
    if tenant.reply_queues and not fnmatch.fnmatchcase(reply.queue, tenant.reply_queues):
        raise Refusal(
            422, "reply.queue", "not_allowed",
            f"this tenant's replies go only to queues matching {tenant.reply_queues!r}",
        )  # fmt: skip
    return reply.model_dump()


def _refuse(
    pipeline: Pipeline,
    tenant: Tenant,
    request_id: str,
    digest: str,
    message: dict[str, Any],
    problem: dict[str, Any],
) -> str:
    """Record the refusal once, and announce it to whoever the message named and may be
    told: a callback URL the guard lets through, a reply the tenant allows."""
    audience = Audience(tenant.id, **_told(pipeline, tenant, message))
    with pipeline.work() as work:
        inserted = work.session.execute(
            pg_insert(BrokerRequest)
            .values(
                tenant_id=tenant.id, request_id=request_id, request_hash=digest, problem=problem
            )
            .on_conflict_do_nothing()
            .returning(BrokerRequest.request_id)
        ).first()
        if inserted is None:
            return DUPLICATE
        data = {"request_id": request_id, "problem": problem}
        announce(work, audience, REFUSED, data, utcnow())
    log.info("request.refused", request_id=request_id, code=problem.get("code"))
    return REFUSED_OUTCOME


def _told(pipeline: Pipeline, tenant: Tenant, message: dict[str, Any]) -> dict[str, Any]:
    """Of a refused message, the callback URL and reply that are safe to use."""
    told: dict[str, Any] = {}
    url = message.get("webhook_url")
    if isinstance(url, str) and len(url) <= 2048:
        with contextlib.suppress(Refusal):
            check_callback_url(pipeline.guard, url)
            told["webhook_url"] = url
    events = message.get("webhook_events")
    if isinstance(events, list) and all(e in EVENTS for e in events):
        told["webhook_events"] = tuple(events)
    with contextlib.suppress(Refusal):
        told["reply"] = _reply_of(message.get("reply"), tenant)
    return told


# -- the task -------------------------------------------------------------------------------


@app.task(
    name=dispatch.REQUEST, bind=True, max_retries=MAX_RETRIES,
    autoretry_for=UNAVAILABLE, retry_backoff=2, retry_backoff_max=RETRY_BACKOFF_MAX_SECONDS,
)  # fmt: skip
def request(self: Task, *args: Any, **message: Any) -> str:
    """Take a producer's generation request (see the module's docstring)."""
    last = self.request.retries >= MAX_RETRIES
    try:
        return take(worker_pipeline(), None if args else message, last_try=last)
    except TryAgain as exc:
        raise self.retry(countdown=min(exc.delay, RETRY_BACKOFF_MAX_SECONDS)) from exc
