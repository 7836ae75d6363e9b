"""WaveSpeed's REST API (`/api/v3/...`), Bearer-authenticated, in its `{code, message, data}`
envelope.

History (`POST /api/v3/predictions`) answers, newest first and only the last 7 days::

    {"code": 200, "message": "success",
     "data": {"page": 1, "page_size": 20, "total": 42, "items": [<prediction>, ...]}}

as WaveSpeed's docs show it (`page`, `total`, `items`) plus the `page_size` used. Every
`<prediction>` here, in `/result`, in submit answers and in webhooks is the same object:
`id, model, input, outputs, urls.get, has_nsfw_contents, status, created_at, error,
executionTime, timings.inference`, and `code` once the task failed (or a sync wait timed out).
`input` is the normalised model input, so a client can find a prediction by its image URL.
"""

from __future__ import annotations

import asyncio
import json
import math
import mimetypes
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile

from sandbox.wavespeed.config import MODEL_ID
from sandbox.wavespeed.deps import SimDep, base_url, json_object, require_api_key
from sandbox.wavespeed.errors import ApiError, rate_limited
from sandbox.wavespeed.payloads import (
    envelope,
    prediction_payload,
    sync_timeout_payload,
)
from sandbox.wavespeed.responses import CutShortResponse
from sandbox.wavespeed.simulator import Simulator
from sandbox.wavespeed.store import Media, Prediction, account_id, media_path
from sandbox.wavespeed.validation import (
    InputError,
    parse_history_query,
    price_usd,
    validate_input,
)

INSUFFICIENT = 403  # WaveSpeed answers account problems with 403


router = APIRouter(prefix="/api/v3", dependencies=[Depends(require_api_key)])


@router.get("/predictions/{prediction_id}/result")
async def get_result(prediction_id: str, sim: SimDep) -> dict[str, Any]:
    """Poll one prediction."""
    if (latency := sim.faults.profile.result_latency_ms) is not None:
        await asyncio.sleep(sim.faults.uniform(latency) / 1000)
    if sim.faults.hit("result_429"):
        raise rate_limited("Too many requests, please slow down.", 1)
    if sim.faults.hit("result_500"):
        raise ApiError(500, "Internal server error")
    prediction = sim.store.get(prediction_id)
    if prediction is None or _lost(sim, prediction_id):
        raise ApiError(404, f"prediction {prediction_id} not found")
    return envelope(prediction_payload(prediction))


def _lost(sim: Simulator, prediction_id: str) -> bool:
    """Whether `result_404` answers this poll as if the prediction did not exist."""
    if sim.faults.profile.result_404_sticky:
        return sim.faults.hit_for("result_404", prediction_id)
    return sim.faults.hit("result_404")


@router.post("/predictions")
async def history(request: Request, sim: SimDep) -> dict[str, Any]:
    """One page of the last 7 days of predictions, newest first."""
    if sim.faults.hit("history_500"):
        raise ApiError(500, "Internal server error")
    try:
        query = parse_history_query(await json_object(request))
    except InputError as exc:
        raise ApiError(400, exc.message, exc.code) from exc
    total, page = sim.store.history(query)
    items = [prediction_payload(p) for p in page]
    return envelope(
        {"page": query.page, "page_size": query.page_size, "total": total, "items": items}
    )


@router.post("/predictions/delete")
async def delete(request: Request, sim: SimDep) -> dict[str, Any]:
    """Delete predictions by id; answers how many were deleted."""
    ids = (await json_object(request)).get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ApiError(400, "ids must be a list of prediction ids", 1401)
    return envelope({"deleted_count": sim.runner.delete(ids)})


@router.delete("/predictions/{prediction_id}")
async def delete_one(prediction_id: str, sim: SimDep) -> dict[str, Any]:
    """Delete (cancel) one prediction; answers it as it stands afterwards. Not in the API
    reference we honour: shaped as the single-id form of `POST /predictions/delete`."""
    prediction = sim.store.get(prediction_id)
    if prediction is None:
        raise ApiError(404, f"prediction {prediction_id} not found")
    sim.runner.delete([prediction_id])
    return envelope(prediction_payload(prediction))


@router.post("/media/uploads")
async def upload_ticket(request: Request, sim: SimDep) -> dict[str, Any]:
    """Announce an upload; the client then PUTs the bytes to `data.upload.url`."""
    if sim.faults.hit("upload_500"):
        raise ApiError(500, "Internal server error")
    body = await json_object(request)
    filename, size = body.get("filename"), body.get("size")
    if not isinstance(filename, str) or not filename.strip():
        raise ApiError(400, "filename is required", 1400)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ApiError(400, "size must be a non-negative integer", 1401)
    if size is not None and size > sim.config.max_upload_bytes:
        raise ApiError(400, f"size exceeds the {sim.config.max_upload_bytes} byte limit", 1401)
    content_type = _content_type(filename, body.get("content_type"))
    media = _new_media(sim, filename.strip(), content_type, size)
    root = base_url(request)
    upload = {
        "method": "PUT",
        "url": f"{root}/_sim/uploads/{media.id}?token={media.upload_token}",
        "headers": {"Content-Type": media.content_type},
    }
    return envelope({"download_url": root + media.path, "upload": upload})


@router.post("/media/upload/binary")
async def upload_binary(request: Request, sim: SimDep) -> dict[str, Any]:
    """The older one-step upload: multipart form, field `file`."""
    if sim.faults.hit("upload_500"):
        raise ApiError(500, "Internal server error")
    # The form spools files to temporary files; leaving the block closes them.
    async with request.form(max_part_size=sim.config.max_upload_bytes) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "file is required (multipart field 'file')", 1400)
        data = await upload.read()
        filename, declared_type = upload.filename or "upload", upload.content_type
    if len(data) > sim.config.max_upload_bytes:
        raise ApiError(400, f"file exceeds the {sim.config.max_upload_bytes} byte limit", 1401)
    content_type = _content_type(filename, declared_type)
    media = _new_media(sim, filename, content_type, len(data))
    media.data = data
    url = base_url(request) + media.path
    return envelope(
        {"type": content_type, "download_url": url, "filename": filename, "size": len(data)}
    )


@router.get("/webhook/secret")
async def webhook_secret(sim: SimDep) -> dict[str, Any]:
    """The account's webhook signing secret, `whsec_...`."""
    return envelope({"secret": sim.config.webhook_secret})


@router.get("/balance")
async def balance(sim: SimDep) -> dict[str, Any]:
    """The account balance in USD."""
    return envelope({"balance": sim.store.balance_usd})


@router.post("/{model:path}", response_model=None)
async def submit(model: str, request: Request, sim: SimDep) -> dict[str, Any] | CutShortResponse:
    """Submit a task to the model; answers the prediction as `created` (or, in sync mode,
    as it stands when it finishes or the wait runs out)."""
    if model != MODEL_ID:
        raise ApiError(404, f"model {model} not found")
    await _submit_faults(sim, request)
    body = await json_object(request)
    try:
        model_input = validate_input(body, sim.config.allowed_durations)
    except InputError as exc:
        raise ApiError(400, exc.message, exc.code) from exc
    if sim.faults.profile.input_fragment_dropped:
        image = urlsplit(str(model_input["image"]))
        model_input = {**model_input, "image": urlunsplit(image._replace(fragment=""))}
    prediction = _accept(sim, request, model_input)
    if sim.faults.hit("submit_drop_after_create"):
        answer = envelope(prediction_payload(prediction))
        return CutShortResponse(
            _json_bytes(answer), media_type="application/json", keep_fraction=0.4
        )
    if body.get("enable_sync_mode") is True:
        return await _wait_in_sync_mode(sim, prediction)
    return envelope(prediction_payload(prediction))


async def _submit_faults(sim: Simulator, request: Request) -> None:
    """What can go wrong before a task exists: latency, tier rate limit, 429/500, timeout."""
    profile = sim.faults.profile
    if profile.submit_latency_ms is not None:
        await asyncio.sleep(sim.faults.uniform(profile.submit_latency_ms) / 1000)
    wait = sim.rate.admit(profile.requests_per_minute, time.monotonic())
    if wait is not None:
        sim.faults.fired["requests_per_minute"] += 1
        message = f"Rate limit exceeded: {profile.requests_per_minute} requests per minute"
        raise rate_limited(message, math.ceil(wait))
    if sim.faults.hit("submit_429"):
        raise rate_limited("Too many requests, please slow down.", 1)
    if sim.faults.hit("submit_500"):
        raise ApiError(500, "Internal server error")
    if sim.faults.hit("submit_timeout"):
        await _sleep_unless_gone(request, profile.submit_timeout_seconds)
        raise ApiError(504, "Gateway timeout")


async def _sleep_unless_gone(request: Request, seconds: float) -> None:
    """Sleep, but stop early once the client hangs up (nobody is left to answer)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(left, 0.1))
        if await request.is_disconnected():
            return


def _accept(sim: Simulator, request: Request, model_input: dict[str, Any]) -> Prediction:
    """Create, bill and start the task. WaveSpeed charges at acceptance."""
    webhook = request.query_params.get("webhook") or None
    if webhook is not None:
        parts = urlsplit(webhook)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ApiError(400, "webhook must be an http(s) URL", 1401)
    charge = price_usd(int(model_input["duration"]))
    if sim.store.balance_usd < charge:
        raise ApiError(403, "Insufficient balance, please top up your account", INSUFFICIENT)
    prediction = Prediction(
        id=sim.store.new_id(),
        model=MODEL_ID,
        input=model_input,
        base_url=base_url(request),
        webhook_url=webhook,
        charge_usd=charge,
    )
    sim.store.add(prediction)
    sim.runner.start(prediction)
    return prediction


async def _wait_in_sync_mode(sim: Simulator, prediction: Prediction) -> dict[str, Any]:
    timeout = sim.config.sync_timeout_seconds
    try:
        await asyncio.wait_for(prediction.finished.wait(), timeout)
    except TimeoutError:
        return envelope(sync_timeout_payload(prediction, timeout))
    return envelope(prediction_payload(prediction))


def _json_bytes(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _content_type(filename: str, declared: object) -> str:
    """The declared type unless it says nothing, then a guess from the file name."""
    if isinstance(declared, str) and declared not in ("", "application/octet-stream"):
        return declared
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def _new_media(sim: Simulator, filename: str, content_type: str, size: int | None) -> Media:
    media_id = sim.store.new_media_id()
    path = media_path(account_id(sim.config.api_key), media_id, filename, content_type)
    media = Media(media_id, filename, content_type, size, path=path)
    sim.store.media[media.id] = media
    return media
