"""The HTTP routes. Handlers validate, call one service, and shape the answer."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from functools import partial
from typing import Annotated, Any

import anyio
import structlog
from fastapi import (
    APIRouter,
    Depends,
    File,
    Header,
    HTTPException,
    Query,
    Request,
    Response,
    UploadFile,
)
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api import creates, problems
from api.deps import CurrentTenant, Db, Res, Resources, metrics_reader, rate_limited, spend
from api.schemas import (
    BatchCreate,
    BatchItem,
    BatchResult,
    BulkActionOut,
    BulkCancel,
    BulkReplay,
    DeliveryOut,
    DryRun,
    EndpointEnable,
    Event,
    EventFeed,
    EventOut,
    FeedEvent,
    GenerationCreate,
    GenerationPage,
    History,
    Readiness,
    RequestOut,
    SigningSecret,
    Text,
    Upload,
)
from api.waiters import changes, until_changed
from config import Settings
from workers import bulk, callbacks, feed, jobs, listing, retention, tenants
from workers.intake import (
    Refusal,
    again,
    broker_request,
    replayed,
    store_upload,
)
from workers.models import Job, Tenant
from workers.pipeline import utcnow
from workers.representation import Generation
from workers.states import JobState
from workers.webhook_in import WebhookRejected, verify

log = structlog.get_logger(__name__)

router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(rate_limited)])
hooks = APIRouter(prefix="/v1")

PROBLEM = {"model": problems.Problem, "content": {"application/problem+json": {}}}
IdempotencyHeader = Annotated[str | None, Header(max_length=255, pattern=r"^[\x21-\x7e]+$")]
# Items of one batch created at once: each holds an API thread and, for an `image_url`, one
# of its tenant's image fetches.
BATCH_THREADS = 8
ERRORS: dict[int | str, dict[str, Any]] = {
    400: PROBLEM, 401: PROBLEM, 404: PROBLEM, 413: PROBLEM, 422: PROBLEM, 429: PROBLEM,
    503: PROBLEM,
}  # fmt: skip


@router.get("/healthz", tags=["operations"])
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, tags=["operations"], responses={503: {}})
def readyz(res: Res) -> JSONResponse:
    """Postgres, Redis and S3 answer."""
    checks = {
        "postgres": _check(lambda: _select_one(res)),
        "redis": _check(res.broker.ping),
        "s3": _check(res.storage.check),
    }
    ready = all(v == "ok" for v in checks.values())
    body = Readiness(status="ready" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics", tags=["operations"], include_in_schema=False,
    dependencies=[Depends(metrics_reader)],
)  # fmt: skip
def metrics(res: Res) -> Response:
    """Prometheus metrics: this API's counters, jobs by state and broker queue depths."""
    return Response(generate_latest(res.metrics), media_type=CONTENT_TYPE_LATEST)


def _select_one(res: Resources) -> None:
    # Closed at once: an unclosed session would keep its pooled connection until collected.
    with res.sessions() as db:
        db.execute(text("SELECT 1"))


def _check(probe: Any) -> str:
    try:
        probe()
    except Exception as exc:  # readiness reports any failure rather than raising it
        return f"error: {type(exc).__name__}"
    return "ok"


# -- generations --------------------------------------------------------------------------


@v1.post(
    "/generations", status_code=201, response_model=Generation, tags=["generations"],
    responses={**ERRORS, 200: {"model": Generation | DryRun,
                               "description": "Idempotent replay, or a dry run's answer"},
               402: PROBLEM, 409: PROBLEM},
)  # fmt: skip
def create_generation(
    body: GenerationCreate,
    res: Res,
    tenant: CurrentTenant,
    response: Response,
    idempotency_key: IdempotencyHeader = None,
) -> Generation | JSONResponse:
    """Validate as WaveSpeed would (the image fetched and opened for real), check the budget,
    store the job and its first task in one transaction, publish after commit. Refusals
    enqueue nothing. With `Idempotency-Key`, a retry of the same body answers the same job
    (200); the same key with another body is a 409. A job that was committed is answered 201
    whatever the broker does; a failure before the commit answers 503 and leaves nothing.
    With `dry_run`, every check runs and nothing else: 200 with what the job would cost and
    when it would start, or the refusal a create would get."""
    if body.dry_run:
        return JSONResponse(_dry_run(res, tenant, body).model_dump(mode="json"))
    generation, response.status_code = _create_once(res, tenant, body, idempotency_key)
    return generation


def _dry_run(res: Res, tenant: Tenant, body: GenerationCreate) -> DryRun:
    return creates.dry_run(res.pipeline, res.estimator, tenant, body, res.fetches.slot)


def _create_once(
    res: Res, tenant: Tenant, body: GenerationCreate, key: str | None
) -> tuple[Generation, int]:
    """The job for `body`, created (201) or, for an `Idempotency-Key` seen before with the
    same body, the one it made then (200)."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True)

    def make(keyed: tuple[str, str] | None) -> Job:
        request = creates.request_of(body, res.settings)
        return creates.create(res.pipeline, tenant, request, idempotency=keyed,
                              slot=res.fetches.slot)  # fmt: skip

    return _once(res, tenant, canonical, key, make)


def _once(
    res: Res,
    tenant: Tenant,
    canonical: str,
    key: str | None,
    make: Callable[[tuple[str, str] | None], Job],
) -> tuple[Generation, int]:
    """The job `make` creates (201) or, for an `Idempotency-Key` seen before with the same
    request (`canonical`), the one it made then (200); another request with it is a 409."""
    if not key:
        return Generation.of(make(None)), 201
    idempotency = (key, hashlib.sha256(canonical.encode()).hexdigest())
    replayed = _replay(res, tenant, idempotency)
    if replayed is not None:
        return replayed, 200
    try:
        return Generation.of(make(idempotency)), 201
    except IntegrityError:  # the same key raced in from another request: answer its job
        replayed = _replay(res, tenant, idempotency)
        assert replayed is not None
        return replayed, 200


def _replay(res: Res, tenant: Tenant, idempotency: tuple[str, str]) -> Generation | None:
    with res.sessions() as db:
        job = replayed(db, tenant, *idempotency)
        return Generation.of(job) if job is not None else None


@v1.post(
    "/generations/batch", response_model=BatchResult, tags=["generations"],
    responses={**ERRORS, 429: PROBLEM},
)  # fmt: skip
def create_batch(
    body: BatchCreate,
    res: Res,
    tenant: CurrentTenant,
    request: Request,
    idempotency_key: IdempotencyHeader = None,
) -> BatchResult:
    """Up to 500 generations in one call, each with its own outcome: accepted (201), replayed
    (200), refused (4xx) or not done for now (503; retry the item). With `Idempotency-Key`,
    item `i` is keyed `<key>/<i>`, unless it carries an `idempotency_key` of its own: a retry
    of the whole batch creates nothing twice."""
    spend(res, request, len(body.items) - 1)  # the request itself spent one already
    with res.batches.slot(tenant.id), ThreadPoolExecutor(BATCH_THREADS) as pool:
        items = list(
            pool.map(lambda p: _batch_item(res, tenant, idempotency_key, *p), enumerate(body.items))
        )
    accepted = sum(1 for item in items if item.status in (200, 201))
    return BatchResult(accepted=accepted, refused=len(items) - accepted, items=items)


def _batch_item(
    res: Res, tenant: Tenant, batch_key: str | None, index: int, raw: dict[str, Any]
) -> BatchItem:
    try:
        fields = dict(raw)
        key = _item_key(fields.pop("idempotency_key", None), batch_key, index)
        body = GenerationCreate.model_validate(fields)
        if body.dry_run:
            return BatchItem(index=index, status=200, dry_run=_dry_run(res, tenant, body))
        generation, status = _create_once(res, tenant, body, key)
    except ValidationError as exc:
        problem = problems.validation_problem(exc.errors(include_url=False))
        return BatchItem(index=index, status=422, problem=problem)
    except Refusal as exc:
        return BatchItem(index=index, status=exc.status, problem=problems.refusal_problem(exc))
    except Exception as exc:  # every item gets its own outcome, whatever went wrong
        problem = problems.failure_problem(exc)
        return BatchItem(index=index, status=problem["status"], problem=problem)
    return BatchItem(index=index, status=status, generation=generation)


def _item_key(own: Any, batch_key: str | None, index: int) -> str | None:
    if own is None:
        return f"{batch_key}/{index}" if batch_key else None
    if not isinstance(own, str) or not creates.IDEMPOTENCY_KEY.fullmatch(own):
        raise Refusal(
            422, "idempotency_key", "invalid",
            "an item's idempotency_key is 1 to 255 printable ASCII characters",
        )  # fmt: skip
    return own


@v1.get("/generations", response_model=GenerationPage, tags=["generations"], responses=ERRORS)
def list_generations(
    db: Db,
    res: Res,
    tenant: CurrentTenant,
    status: Annotated[
        str | None,
        Query(
            pattern="^(queued|submitting|processing|storing|completed|failed|cancelled|expired)$"
        ),
    ] = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    metadata: Annotated[list[Text], Query(description="key:value, repeatable")] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
    request_id: Annotated[
        str | None, Query(max_length=255, description="The broker request that made it")
    ] = None,
) -> GenerationPage:
    """The tenant's generations, newest first, filtered; pass `next_cursor` for more."""
    wanted = {}
    for pair in metadata:
        key, sep, value = pair.partition(":")
        if not sep or not key:
            raise Refusal(422, "metadata", "invalid", "metadata filters are key:value")
        wanted[key] = value
    try:
        after = listing.Cursor.decode(cursor) if cursor else None
    except ValueError as exc:
        raise Refusal(422, "cursor", "invalid", "not a cursor this API gave out") from exc
    chosen = listing.JobFilter(
        statuses=(status,) if status else (), created_after=created_after,
        created_before=created_before, metadata=wanted, request_id=request_id,
    )  # fmt: skip
    rows, following = listing.page(db, tenant.id, chosen, limit=limit, after=after)
    return GenerationPage(
        data=_records(res, db, rows),
        next_cursor=following.encode() if following else None,
    )


def _owned(db: Db, tenant: Tenant, job_id: uuid.UUID) -> Job:
    job = jobs.for_tenant(db, tenant.id, job_id)
    if job is None:
        raise HTTPException(404, "no generation with this id")
    return job


# RFC 7240's `wait` preference, as `Prefer: wait=N` (other preferences are ignored).
_WAIT = re.compile(r"^\s*wait\s*=\s*\"?(\d{1,6})\"?\s*$", re.IGNORECASE)
PreferHeader = Annotated[
    str | None,
    Header(max_length=200, description="`wait=N`: answer once the job changes, at most N s"),
]
IfNoneMatchHeader = Annotated[
    str | None,
    Header(max_length=400, description="ETags you have: wait for (or answer 304 without) them"),
]


def _wait_of(prefer: str | None, settings: Settings) -> int:
    """Seconds the caller asks to wait (0: none), capped at `long_poll_max_seconds`."""
    for preference in (prefer or "").split(","):
        name = preference.partition("=")[0].strip().lower()
        if name != "wait":
            continue
        found = _WAIT.match(preference.split(";")[0])
        if not found:
            raise Refusal(422, "Prefer", "invalid", "wait must be a whole number of seconds")
        return min(int(found.group(1)), settings.long_poll_max_seconds)
    return 0


def etag(status: str) -> str:
    """A weak validator of the job's state: it changes when the job changes state."""
    return f'W/"{status}"'


def _known(if_none_match: str | None) -> set[str]:
    return {tag.strip() for tag in (if_none_match or "").split(",") if tag.strip()}


def _read(res: Resources, tenant: Tenant, job_id: uuid.UUID) -> Generation | None:
    with res.sessions() as db:
        job = jobs.for_tenant(db, tenant.id, job_id)
        return _records(res, db, [job])[0] if job is not None else None


def _records(res: Resources, db: Session, found: Sequence[Job]) -> list[Generation]:
    """The jobs' records with where each live one stands: one query for all of them."""
    estimates = res.estimator.of(db, found)
    return [Generation.of(job, estimates.get(job.id)) for job in found]


@v1.get(
    "/generations/{job_id}", response_model=Generation, tags=["generations"],
    responses={**ERRORS, 304: {"description": "Still in the state If-None-Match names"}},
)  # fmt: skip
async def get_generation(
    job_id: uuid.UUID,
    res: Res,
    tenant: CurrentTenant,
    prefer: PreferHeader = None,
    if_none_match: IfNoneMatchHeader = None,
) -> Response:
    """The job record, with its `ETag` (its state). With `Prefer: wait=N` (N at most 60) the
    answer comes when the job changes state or when N seconds run out; with `If-None-Match`
    the state you already have is the one to wait out, and an unchanged job answers 304.
    Waiting holds no thread and no database connection."""
    wait, known = _wait_of(prefer, res.settings), _known(if_none_match)
    read = partial(_read, res, tenant, job_id)
    if wait:
        with res.waits.slot(tenant.id):
            first = await anyio.to_thread.run_sync(read)
            baseline = known or ({etag(first.status)} if first else set())
            found = await until_changed(
                res.watch, job_id, read, lambda g: etag(g.status) not in baseline, wait
            )
    else:
        found = await anyio.to_thread.run_sync(read)
    if found is None:
        raise HTTPException(404, "no generation with this id")
    headers = {"ETag": etag(found.status), "Vary": "Prefer, If-None-Match"}
    if wait:
        headers["Preference-Applied"] = f"wait={wait}"
    if etag(found.status) in known:
        return Response(status_code=304, headers=headers)
    return JSONResponse(found.model_dump(mode="json"), headers=headers)


@v1.get(
    "/generations/{job_id}/events/stream", tags=["generations"],
    response_class=StreamingResponse,
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}},
                               "description": "Server-Sent Events of the job's state changes"}},
)  # fmt: skip
async def stream_events(
    job_id: uuid.UUID,
    res: Res,
    tenant: CurrentTenant,
    last_event_id: Annotated[str | None, Header(max_length=20)] = None,
) -> StreamingResponse:
    """Server-Sent Events of the job's state changes (`event: state`, `id` the change's id,
    `data` the change with the job record as it is now), from the first or from after
    `Last-Event-ID`, ending once the job has ended. A quiet stream carries a comment line
    every 15 s."""
    if last_event_id is not None and not last_event_id.isdigit():
        raise Refusal(422, "Last-Event-ID", "invalid", "not an event id this stream sent")
    res.waits.check(tenant.id)
    if await anyio.to_thread.run_sync(partial(_read, res, tenant, job_id)) is None:
        raise HTTPException(404, "no generation with this id")

    async def body() -> AsyncIterator[str]:
        # The slot is taken by the stream itself: a response never started holds none.
        with res.waits.slot(tenant.id):
            read = partial(_changes_after, res, tenant, job_id)
            async for chunk in changes(res.watch, job_id, read, int(last_event_id or 0)):
                yield chunk

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _changes_after(
    res: Resources, tenant: Tenant, job_id: uuid.UUID, after: int
) -> tuple[list[tuple[int, str]], bool]:
    with res.sessions() as db:
        job = jobs.for_tenant(db, tenant.id, job_id)
        if job is None:  # removed with its tenant
            return [], True
        generation = _records(res, db, [job])[0].model_dump(mode="json")
        ended = JobState(job.status).terminal
        return [
            (e.id, json.dumps({
                "id": e.id, "from": e.from_state, "to": e.to_state, "reason": e.reason,
                "at": e.at.isoformat(), "generation": generation,
            }, separators=(",", ":")))
            for e in jobs.state_changes(db, job_id, after)
        ], ended  # fmt: skip


@v1.post(
    "/generations/{job_id}/cancel", response_model=Generation, tags=["generations"],
    responses=ERRORS,
)  # fmt: skip
def cancel_generation(job_id: uuid.UUID, db: Db, res: Res, tenant: CurrentTenant) -> Generation:
    """Cancel a job: a queued job is never submitted; one already at WaveSpeed has its
    prediction deleted there, and `charged` says what it cost. Finished jobs stay as they
    are."""
    _owned(db, tenant, job_id)
    return Generation.of(res.pipeline.cancel(job_id))


@v1.delete(
    "/generations/{job_id}", response_model=Generation, tags=["generations"],
    responses={**ERRORS, 409: PROBLEM, 503: PROBLEM},
)  # fmt: skip
def delete_generation(job_id: uuid.UUID, db: Db, res: Res, tenant: CurrentTenant) -> Generation:
    """Delete an ended job: its input image and video are removed, its prediction is deleted
    at WaveSpeed, and a tombstone stays (`deleted_at`, with its state, cost and `charged`).
    A job still running answers 409: cancel it first."""
    _owned(db, tenant, job_id)
    db.close()  # no connection held across the S3 deletes
    try:
        return Generation.of(retention.delete_job(res.pipeline, job_id))
    except retention.StillRunning as exc:
        raise Refusal(
            409, "job_id", "not_finished", "only an ended job can be deleted: cancel it first"
        ) from exc


@v1.post(
    "/generations/{job_id}/restore", response_model=Generation, tags=["generations"],
    responses={**ERRORS, 409: PROBLEM},
)  # fmt: skip
def restore_generation(job_id: uuid.UUID, db: Db, res: Res, tenant: CurrentTenant) -> Generation:
    """Store again the paid-for video of a job whose store failed (`storage_failed`, or
    `output_expired` while WaveSpeed may still keep it), with a fresh deadline; it goes back
    to `storing`. Any other job answers 409 and is left alone."""
    _owned(db, tenant, job_id)
    if not res.pipeline.restore(job_id):
        raise Refusal(
            409, "job_id", "not_restorable",
            "only a job that failed as storage_failed or output_expired can be restored",
        )  # fmt: skip
    return _generation(res, job_id)


@v1.post(
    "/generations/{job_id}/retry", status_code=201, response_model=Generation,
    tags=["generations"],
    responses={**ERRORS, 200: {"model": Generation, "description": "Idempotent replay"},
               402: PROBLEM, 409: PROBLEM},
)  # fmt: skip
def retry_generation(
    job_id: uuid.UUID,
    res: Res,
    tenant: CurrentTenant,
    response: Response,
    idempotency_key: IdempotencyHeader = None,
) -> Generation:
    """A new job with the same inputs, callback and metadata as a finished one (failed, or
    completed when you want another take), `retry_of` naming it; the original's history
    records the retry. Checked and charged like any create; with `Idempotency-Key`, a retry
    of this call answers the same new job (200). A job still running, or whose input image
    is no longer stored, answers 409."""
    # Read and closed before the image is copied: no transaction stays open across S3.
    with res.sessions() as db:
        original = jobs.for_tenant(db, tenant.id, job_id)
    if original is None:
        raise HTTPException(404, "no generation with this id")
    request, image = again(original, res.storage)
    creates.check_duration(request.duration, res.settings)  # ALLOWED_DURATIONS may have narrowed
    generation, response.status_code = _once(
        res, tenant, f"retry:{job_id}", idempotency_key,
        lambda keyed: creates.accepted(res.pipeline, tenant, request, image, keyed),
    )  # fmt: skip
    return generation


def _generation(res: Res, job_id: uuid.UUID) -> Generation:
    with res.sessions() as db:
        return Generation.of(jobs.get(db, job_id))


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
        deliveries=[DeliveryOut.of(d, a) for d, a in callbacks.of_job(db, job_id)],
    )


@v1.get("/requests/{request_id}", response_model=RequestOut, tags=["generations"], responses=ERRORS)
def get_request(
    request_id: Annotated[str, PathParam(max_length=255)], db: Db, tenant: CurrentTenant
) -> RequestOut:
    """What came of a generation request you sent over the broker (`generation.request`):
    the job it made, or the problem it was refused with. 404 until it has been taken."""
    found = broker_request(db, tenant.id, request_id)
    if found is None:
        raise HTTPException(404, "no request with this id has been taken (yet)")
    return RequestOut.of(found)


# -- the event feed ------------------------------------------------------------------------


@v1.get("/events", response_model=EventFeed, tags=["callbacks"], responses=ERRORS)
def list_events(
    db: Db,
    tenant: CurrentTenant,
    after: Annotated[
        str | None, Query(max_length=64, description="The id of the last event you have")
    ] = None,
    types: Annotated[list[Event], Query(max_length=5)] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> EventFeed:
    """Every event of your jobs, oldest first, whether or not a callback carried it; each
    `id` is the `webhook-id` of its callback. A receiver that was down passes the last id it
    saw as `after` and gets what it missed; the order holds while events arrive."""
    try:
        since = feed.parse_event_id(after) if after else None
        events = feed.page(db, tenant.id, after=since, types=types, limit=limit)
    except (ValueError, feed.UnknownEvent) as exc:
        raise Refusal(422, "after", "invalid", "not the id of an event of yours") from exc
    last = feed.event_id(events[-1].id) if events else after
    return EventFeed(data=[FeedEvent.of(e) for e in events], next_cursor=last)


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
    with res.pipeline.work() as work:
        if not callbacks.replay(work, tenant.id, delivery_id, utcnow()):
            raise HTTPException(404, "no delivery with this id")
    with res.sessions() as db:
        return DeliveryOut.of(*callbacks.one(db, delivery_id))


# -- bulk actions -------------------------------------------------------------------------


@v1.post(
    "/generations/cancel", status_code=202, response_model=BulkActionOut, tags=["bulk"],
    responses=ERRORS,
)  # fmt: skip
def bulk_cancel(
    body: BulkCancel, res: Res, tenant: CurrentTenant, response: Response
) -> BulkActionOut:
    """Cancel every live job of yours the filter matches, up to `max_items`, each as its own
    cancel would. A worker does it: follow `Location` for how many it cancelled."""
    return _bulk(res, tenant, response, bulk.CANCEL, body.filter(), body.max_items)


@v1.post(
    "/webhook-deliveries/replay", status_code=202, response_model=BulkActionOut, tags=["bulk"],
    responses=ERRORS,
)  # fmt: skip
def bulk_replay(
    body: BulkReplay, res: Res, tenant: CurrentTenant, response: Response
) -> BulkActionOut:
    """Send again every callback of yours the filter matches, up to `max_items`, each with
    its own `webhook-id`. A worker does it: follow `Location` for how many it replayed."""
    return _bulk(res, tenant, response, bulk.REPLAY, body.filter(), body.max_items)


@v1.post(
    "/webhook-endpoints/enable", status_code=202, response_model=BulkActionOut, tags=["bulk"],
    responses=ERRORS,
)  # fmt: skip
def enable_endpoint(
    body: EndpointEnable, res: Res, tenant: CurrentTenant, response: Response
) -> BulkActionOut:
    """Deliver to a callback URL that answered 410 again. Its stopped callbacks become
    `exhausted`, so a replay can send them."""
    return _bulk(res, tenant, response, bulk.ENABLE, {"url": str(body.url)}, bulk.MAX_ITEMS)


@v1.get("/bulk-actions/{action_id}", response_model=BulkActionOut, tags=["bulk"], responses=ERRORS)
def get_bulk_action(action_id: uuid.UUID, db: Db, tenant: CurrentTenant) -> BulkActionOut:
    """A bulk action of yours, with what it matched and did so far."""
    action = bulk.get(db, tenant.id, action_id)
    if action is None:
        raise HTTPException(404, "no bulk action with this id")
    return BulkActionOut.of(action)


def _bulk(
    res: Res, tenant: Tenant, response: Response, kind: str, filter_: dict[str, Any],
    max_items: int,
) -> BulkActionOut:  # fmt: skip
    with res.pipeline.work() as work:
        action = bulk.create(work, tenant.id, kind, filter_, max_items)
    response.headers["Location"] = f"/v1/bulk-actions/{action.id}"
    return BulkActionOut.of(action)


# 503 when this deployment's SECRET_KEYS cannot open the stored secret (api/problems.py).
SECRET_ERRORS = {**ERRORS, 503: PROBLEM}


@v1.get(
    "/webhook-secret", response_model=SigningSecret, tags=["callbacks"], responses=SECRET_ERRORS
)
def get_secret(res: Res, tenant: CurrentTenant) -> SigningSecret:
    """The secret your receiver verifies callbacks with (Standard Webhooks)."""
    return _secret(tenants.webhook_secret(tenant, res.pipeline.sealer), tenant)


@v1.post(
    "/webhook-secret/rotate",
    response_model=SigningSecret,
    tags=["callbacks"],
    responses=SECRET_ERRORS,
)
def rotate_secret(db: Db, res: Res, tenant: CurrentTenant) -> SigningSecret:
    """A new signing secret; callbacks carry signatures of both for the overlap period."""
    current = db.get_one(Tenant, tenant.id)
    overlap = timedelta(seconds=res.settings.secret_rotation_overlap_seconds)
    secret = tenants.rotate_secret(db, current, res.pipeline.sealer, utcnow(), overlap)
    return _secret(secret, current)


def _secret(secret: str, tenant: Tenant) -> SigningSecret:
    return SigningSecret(
        secret=secret, previous_secret_valid_until=tenant.previous_secret_expires_at
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
    # Reading the body needs the event loop; the database work would block it for every
    # request. Its threads and pool are its own: producer traffic never queues it.
    await anyio.to_thread.run_sync(
        res.webhook_pipeline.take_webhook, prediction_id, _prediction_of(body),
        limiter=res.webhook_threads,
    )  # fmt: skip
    return Response(status_code=204)


def _prediction_of(body: bytes) -> dict[str, Any] | None:
    # Signed but not necessarily well-formed: anything else is just a cue to poll.
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
