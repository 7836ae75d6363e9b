"""The HTTP routes. Handlers validate, call one service, and shape the answer."""

from __future__ import annotations

import uuid
from typing import Annotated

import structlog
from fastapi import APIRouter, File, HTTPException, Request, Response, UploadFile
from fastapi.responses import RedirectResponse

from api.deps import Auth, Db, Res
from api.schemas import Generation, GenerationCreate, Upload
from workers import jobs, outbox
from workers.intake import GenerationInput, accept, fetch_image, load_upload, store_upload
from workers.models import Job
from workers.pipeline import poll_now
from workers.webhook_in import WebhookRejected, verify

log = structlog.get_logger(__name__)

router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Auth])
hooks = APIRouter(prefix="/v1")


@router.get("/healthz", tags=["operations"])
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@v1.post("/generations", status_code=201, response_model=Generation, tags=["generations"])
def create_generation(body: GenerationCreate, res: Res, request: Request) -> Generation:
    """Validate as WaveSpeed would (the image fetched and opened for real), store the job and
    its first task in one transaction, publish after commit. Refusals enqueue nothing."""
    settings = res.settings
    data = GenerationInput(
        prompt=body.prompt, negative_prompt=body.negative_prompt,
        guidance_scale=body.guidance_scale, duration=body.duration,
        image_url=str(body.image_url) if body.image_url else None, upload_id=body.upload_id,
        webhook_url=str(body.webhook_url) if body.webhook_url else None, metadata=body.metadata,
    )  # fmt: skip
    if data.upload_id:
        image = load_upload(res.storage, data.upload_id)
    else:
        assert data.image_url is not None
        image = fetch_image(res.http, data.image_url, settings)
    with res.sessions() as db, db.begin():
        job = accept(db, res.storage, settings, data, image)
    outbox.relay(res.sessions, res.dispatch, job_id=job.id)
    log.info("generation.accepted", job_id=str(job.id))
    with res.sessions() as db:
        return Generation.of(jobs.get(db, job.id))


@v1.get("/generations/{job_id}", response_model=Generation, tags=["generations"])
def get_generation(job_id: uuid.UUID, db: Db) -> Generation:
    """The job record."""
    return Generation.of(_job(db, job_id))


@v1.get("/generations/{job_id}/video", status_code=307, tags=["generations"])
def get_video(job_id: uuid.UUID, db: Db, res: Res) -> RedirectResponse:
    """Redirect to a short-lived presigned URL of the stored MP4."""
    job = _job(db, job_id)
    if not job.s3_key:
        raise HTTPException(404, "the video is not stored yet")
    return RedirectResponse(res.storage.presign_get(job.s3_key, 300), status_code=307)


@v1.post("/generations/{job_id}/cancel", response_model=Generation, tags=["generations"])
def cancel_generation(job_id: uuid.UUID, db: Db, res: Res) -> Generation:
    """Cancel a job: a queued job is never submitted; one already at WaveSpeed stops being
    tracked and its record says the prediction may still be charged. Terminal jobs stay as
    they are."""
    _job(db, job_id)
    return Generation.of(res.pipeline.cancel(job_id))


@v1.post("/uploads", status_code=201, response_model=Upload, tags=["uploads"])
def create_upload(file: Annotated[UploadFile, File()], res: Res) -> Upload:
    """Upload an image (jpg/png, >=300x300, <=10 MB), then pass its `upload_id`."""
    data = file.file.read(res.settings.image_max_bytes + 1)
    upload_id, info = store_upload(res.storage, data, res.settings)
    return Upload(
        upload_id=upload_id, content_type=info.content_type, width=info.width,
        height=info.height, bytes=len(data),
    )  # fmt: skip


@hooks.post("/wavespeed/webhook", status_code=204, tags=["wavespeed"])
async def wavespeed_webhook(request: Request, res: Res) -> Response:
    """WaveSpeed's completion push: verified, then the job is polled at once."""
    secret = res.settings.wavespeed_webhook_secret
    body = await request.body()
    try:
        prediction_id = verify(secret.get_secret_value() if secret else "", request.headers, body)
    except WebhookRejected as exc:
        log.warning("wavespeed.webhook.rejected", reason=str(exc))
        raise HTTPException(401, str(exc)) from exc
    with res.sessions() as db, db.begin():
        first = jobs.first_delivery(db, prediction_id)
    if first:
        poll_now(res.sessions, res.dispatch, prediction_id)
    else:
        log.info("wavespeed.webhook.duplicate", prediction_id=prediction_id)
    return Response(status_code=204)


def _job(db: Db, job_id: uuid.UUID) -> Job:
    try:
        return jobs.get(db, job_id)
    except jobs.JobNotFound as exc:
        raise HTTPException(404, "no generation with this id") from exc
