"""The HTTP routes. Handlers validate, call one service, and shape the answer."""

from __future__ import annotations

import hashlib
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Annotated, Any

import redis
import structlog
from fastapi import APIRouter, File, Header, HTTPException, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse, RedirectResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from api import problems
from api.deps import CurrentTenant, Db, Res
from api.schemas import (
    BatchCreate,
    BatchItem,
    BatchResult,
    DeliveryOut,
    EventOut,
    GenerationCreate,
    GenerationPage,
    History,
    Readiness,
    SigningSecret,
    Text,
    Upload,
)
from workers import callbacks, jobs, outbox, tenants
from workers.dispatch import NOTIFY
from workers.intake import (
    GenerationInput,
    Refusal,
    accept,
    check_budget,
    check_callback_url,
    load_image,
    store_upload,
)
from workers.models import IdempotencyKey, Job, Tenant, WebhookDelivery
from workers.pipeline import utcnow
from workers.representation import Generation
from workers.webhook_in import WebhookRejected, verify

log = structlog.get_logger(__name__)

router = APIRouter()
v1 = APIRouter(prefix="/v1")
hooks = APIRouter(prefix="/v1")

PROBLEM = {"model": problems.Problem, "content": {"application/problem+json": {}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: PROBLEM, 401: PROBLEM, 404: PROBLEM, 413: PROBLEM, 422: PROBLEM,
}  # fmt: skip


@router.get("/healthz", tags=["operations"])
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, tags=["operations"], responses={503: {}})
def readyz(res: Res) -> JSONResponse:
    """Postgres, Redis and S3 answer."""
    checks = {
        "postgres": _check(lambda: res.sessions().execute(text("SELECT 1"))),
        "redis": _check(lambda: redis.Redis.from_url(res.settings.redis_url).ping()),
        "s3": _check(res.storage.check),
    }
    ready = all(v == "ok" for v in checks.values())
    body = Readiness(status="ready" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", tags=["operations"], include_in_schema=False)
def metrics(res: Res) -> Response:
    """Prometheus metrics: this API's counters, jobs by state and broker queue depths."""
    return Response(generate_latest(res.metrics), media_type=CONTENT_TYPE_LATEST)


def _check(probe: Any) -> str:
    try:
        probe()
    except Exception as exc:  # readiness reports any failure rather than raising it
        return f"error: {type(exc).__name__}"
    return "ok"


# -- generations --------------------------------------------------------------------------


def _request_of(body: GenerationCreate) -> GenerationInput:
    return GenerationInput(
        prompt=body.prompt, negative_prompt=body.negative_prompt,
        guidance_scale=body.guidance_scale, duration=body.duration,
        image_url=str(body.image_url) if body.image_url else None, upload_id=body.upload_id,
        webhook_url=str(body.webhook_url) if body.webhook_url else None,
        webhook_events=tuple(body.webhook_events), metadata=dict(body.metadata),
    )  # fmt: skip


def _create(
    res: Res, tenant: Tenant, body: GenerationCreate, idempotency: tuple[str, str] | None = None
) -> Job:
    """Everything checked before the job exists; the job, its first task and the idempotency
    key committed together; the task published after commit."""
    request = _request_of(body)
    settings = res.settings
    if request.webhook_url:
        check_callback_url(res.guard, request.webhook_url)
    with res.sessions() as db:
        image = load_image(db, res.guard, tenant, request, settings)
    with res.sessions() as db, db.begin():
        check_budget(db, tenant, settings.price_usd[request.duration], utcnow(), settings)
        job = accept(db, res.storage, settings, tenant, request, image)
        if idempotency:
            key, digest = idempotency
            db.add(IdempotencyKey(tenant_id=tenant.id, key=key, request_hash=digest, job_id=job.id))
    outbox.relay(res.sessions, res.dispatch, job_id=job.id)
    log.info("generation.accepted", job_id=str(job.id))
    return job


def _resource(res: Res, job_id: uuid.UUID) -> Generation:
    with res.sessions() as db:
        return Generation.of(jobs.get(db, job_id))


@v1.post(
    "/generations", status_code=201, response_model=Generation, tags=["generations"],
    responses={**ERRORS, 200: {"model": Generation, "description": "Idempotent replay"},
               402: PROBLEM, 409: PROBLEM},
)  # fmt: skip
def create_generation(
    body: GenerationCreate,
    res: Res,
    tenant: CurrentTenant,
    response: Response,
    idempotency_key: Annotated[
        str | None, Header(max_length=255, pattern=r"^[\x21-\x7e]+$")
    ] = None,
) -> Generation:
    """Validate as WaveSpeed would (the image fetched and opened for real), check the budget,
    store the job and its first task in one transaction, publish after commit. Refusals
    enqueue nothing. With `Idempotency-Key`, a retry of the same body answers the same job
    (200); the same key with another body is a 409."""
    if not idempotency_key:
        return _resource(res, _create(res, tenant, body).id)
    digest = hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode())
    idempotency = (idempotency_key, digest.hexdigest())
    replayed = _replay(res, tenant, idempotency)
    if replayed is not None:
        response.status_code = 200
        return replayed
    try:
        return _resource(res, _create(res, tenant, body, idempotency).id)
    except IntegrityError:  # the same key raced in from another request: answer its job
        replayed = _replay(res, tenant, idempotency)
        assert replayed is not None
        response.status_code = 200
        return replayed


def _replay(res: Res, tenant: Tenant, idempotency: tuple[str, str]) -> Generation | None:
    key, digest = idempotency
    with res.sessions() as db:
        seen = db.get(IdempotencyKey, (tenant.id, key))
        if seen is None:
            return None
        if seen.request_hash != digest:
            raise Refusal(
                409, "Idempotency-Key", "idempotency_conflict",
                "this key was used with a different request body",
            )  # fmt: skip
        return Generation.of(jobs.get(db, seen.job_id))


@v1.post("/generations/batch", response_model=BatchResult, tags=["generations"], responses=ERRORS)
def create_batch(body: BatchCreate, res: Res, tenant: CurrentTenant) -> BatchResult:
    """Up to 500 generations in one call, each accepted (201) or refused on its own."""
    with ThreadPoolExecutor(8) as pool:
        items = list(pool.map(lambda p: _batch_item(res, tenant, *p), enumerate(body.items)))
    accepted = sum(1 for item in items if item.status == 201)
    return BatchResult(accepted=accepted, refused=len(items) - accepted, items=items)


def _batch_item(res: Res, tenant: Tenant, index: int, raw: dict[str, Any]) -> BatchItem:
    try:
        body = GenerationCreate.model_validate(raw)
        job = _create(res, tenant, body)
    except ValidationError as exc:
        problem = problems.validation_problem(exc.errors(include_url=False))
        return BatchItem(index=index, status=422, problem=problem)
    except Refusal as exc:
        return BatchItem(index=index, status=exc.status, problem=problems.refusal_problem(exc))
    return BatchItem(index=index, status=201, generation=_resource(res, job.id))


@v1.get("/generations", response_model=GenerationPage, tags=["generations"], responses=ERRORS)
def list_generations(
    db: Db,
    tenant: CurrentTenant,
    status: Annotated[
        str | None,
        Query(pattern="^(queued|submitting|processing|storing|completed|failed|cancelled)$"),
    ] = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    metadata: Annotated[list[Text], Query(description="key:value, repeatable")] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> GenerationPage:
    """The tenant's generations, newest first, filtered; pass `next_cursor` for more."""
    wanted = {}
    for pair in metadata:
        key, sep, value = pair.partition(":")
        if not sep or not key:
            raise Refusal(422, "metadata", "invalid", "metadata filters are key:value")
        wanted[key] = value
    try:
        after = jobs.Cursor.decode(cursor) if cursor else None
    except ValueError as exc:
        raise Refusal(422, "cursor", "invalid", "not a cursor this API gave out") from exc
    rows, following = jobs.page(
        db, tenant.id, limit=limit, status=status, created_after=created_after,
        created_before=created_before, metadata=wanted, after=after,
    )  # fmt: skip
    return GenerationPage(
        data=[Generation.of(job) for job in rows],
        next_cursor=following.encode() if following else None,
    )


def _owned(db: Db, tenant: Tenant, job_id: uuid.UUID) -> Job:
    job = jobs.for_tenant(db, tenant.id, job_id)
    if job is None:
        raise HTTPException(404, "no generation with this id")
    return job


@v1.get("/generations/{job_id}", response_model=Generation, tags=["generations"], responses=ERRORS)
def get_generation(job_id: uuid.UUID, db: Db, tenant: CurrentTenant) -> Generation:
    """The job record."""
    return Generation.of(_owned(db, tenant, job_id))


@v1.post(
    "/generations/{job_id}/cancel", response_model=Generation, tags=["generations"],
    responses=ERRORS,
)  # fmt: skip
def cancel_generation(job_id: uuid.UUID, db: Db, res: Res, tenant: CurrentTenant) -> Generation:
    """Cancel a job: a queued job is never submitted; one already at WaveSpeed stops being
    tracked and its record says the prediction may still be charged. Finished jobs stay as
    they are."""
    _owned(db, tenant, job_id)
    return Generation.of(res.pipeline.cancel(job_id))


@v1.get(
    "/generations/{job_id}/video", status_code=307, tags=["generations"],
    responses={**ERRORS, 307: {"description": "Redirect to a short-lived presigned URL"}},
    response_class=RedirectResponse,
)  # fmt: skip
def get_video(job_id: uuid.UUID, db: Db, res: Res, tenant: CurrentTenant) -> RedirectResponse:
    """Redirect to a 5-minute presigned URL of the stored MP4."""
    job = _owned(db, tenant, job_id)
    if not job.s3_key:
        raise HTTPException(404, "the video is not stored yet")
    return RedirectResponse(res.storage.presign_get(job.s3_key, 300), status_code=307)


@v1.get(
    "/generations/{job_id}/events", response_model=History, tags=["generations"],
    responses=ERRORS,
)  # fmt: skip
def get_events(job_id: uuid.UUID, db: Db, tenant: CurrentTenant) -> History:
    """The state history and every callback attempt."""
    _owned(db, tenant, job_id)
    return History(
        events=[EventOut.of(e) for e in jobs.events(db, job_id)],
        deliveries=[DeliveryOut.of(d, a) for d, a in jobs.deliveries(db, job_id)],
    )


# -- uploads, callbacks -------------------------------------------------------------------


@v1.post("/uploads", status_code=201, response_model=Upload, tags=["uploads"], responses=ERRORS)
def create_upload(
    file: Annotated[UploadFile, File()], db: Db, res: Res, tenant: CurrentTenant
) -> Upload:
    """Upload an image (jpg/png by its bytes, >=300x300, <=10 MB); pass its `upload_id`."""
    data = file.file.read(res.settings.image_max_bytes + 1)
    upload = store_upload(db, res.storage, tenant, data, res.settings)
    return Upload(
        upload_id=upload.id, content_type=upload.content_type, width=upload.width,
        height=upload.height, bytes=upload.bytes,
    )  # fmt: skip


@v1.post(
    "/webhook-deliveries/{delivery_id}/replay", response_model=DeliveryOut, tags=["callbacks"],
    responses=ERRORS,
)  # fmt: skip
def replay_delivery(delivery_id: uuid.UUID, res: Res, tenant: CurrentTenant) -> DeliveryOut:
    """Send a callback again now, with the same `webhook-id`, whatever became of it."""
    with res.sessions() as db, db.begin():
        delivery = db.get(WebhookDelivery, delivery_id)
        if delivery is None or delivery.tenant_id != tenant.id:
            raise HTTPException(404, "no delivery with this id")
        callbacks.replay(db, delivery, utcnow())
    res.dispatch(NOTIFY, delivery_id)
    with res.sessions() as db:
        found = dict(jobs.deliveries(db, delivery.job_id))
        return DeliveryOut.of(*next((d, a) for d, a in found.items() if d.id == delivery_id))


@v1.get("/webhook-secret", response_model=SigningSecret, tags=["callbacks"], responses=ERRORS)
def get_secret(tenant: CurrentTenant) -> SigningSecret:
    """The secret your receiver verifies callbacks with (Standard Webhooks)."""
    return _secret(tenant)


@v1.post(
    "/webhook-secret/rotate", response_model=SigningSecret, tags=["callbacks"], responses=ERRORS
)
def rotate_secret(db: Db, res: Res, tenant: CurrentTenant) -> SigningSecret:
    """A new signing secret; callbacks carry signatures of both for the overlap period."""
    current = db.get_one(Tenant, tenant.id)
    overlap = res.settings.secret_rotation_overlap_seconds
    tenants.rotate_secret(db, current, utcnow(), timedelta(seconds=overlap))
    return _secret(current)


def _secret(tenant: Tenant) -> SigningSecret:
    return SigningSecret(
        secret=tenant.webhook_secret,
        previous_secret_valid_until=tenant.previous_secret_expires_at,
    )


# -- WaveSpeed ----------------------------------------------------------------------------


@hooks.post(
    "/wavespeed/webhook", status_code=204, tags=["wavespeed"],
    responses={401: PROBLEM, 413: PROBLEM},
)  # fmt: skip
async def wavespeed_webhook(request: Request, res: Res) -> Response:
    """WaveSpeed's completion push: verified, deduplicated, then the job is settled at once
    from the prediction it carries (or polled at once, if that does not settle it)."""
    secret = res.settings.wavespeed_webhook_secret
    body = await request.body()
    try:
        prediction_id = verify(secret.get_secret_value() if secret else "", request.headers, body)
    except WebhookRejected as exc:
        log.warning("wavespeed.webhook.rejected", reason=str(exc))
        raise HTTPException(401, str(exc)) from exc
    # Reading the body needs the event loop; the database work would block it for every request.
    await run_in_threadpool(res.pipeline.take_webhook, prediction_id, _prediction_of(body))
    return Response(status_code=204)


def _prediction_of(body: bytes) -> dict[str, Any] | None:
    # Signed but not necessarily well-formed: anything else is just a cue to poll.
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
