"""What WaveSpeed serves from its storage and CDN rather than its API: the presigned upload
target, uploaded media and finished outputs. No Bearer key, as on the real CDN.

Outputs live at `{base}/_sim/outputs/{prediction_id}.mp4`, where `{base}` is the address the
submitting client used; uploads at `{base}/_sim/media/<account>/images/<time_ns>_<8 letters>.png`
and the like, the shape of WaveSpeed's `download_url`s, which do not keep the uploaded name.
"""

from __future__ import annotations

import hmac
from datetime import timedelta

from fastapi import APIRouter, Request, Response

from sandbox.wavespeed.clock import utcnow
from sandbox.wavespeed.deps import SimDep
from sandbox.wavespeed.errors import ApiError
from sandbox.wavespeed.responses import CutShortResponse, parse_range
from sandbox.wavespeed.simulator import Simulator
from sandbox.wavespeed.store import Prediction, media_id_of

router = APIRouter(prefix="/_sim")


@router.put("/uploads/{media_id}")
async def put_upload(media_id: str, token: str, request: Request, sim: SimDep) -> Response:
    """The presigned PUT of the upload-ticket flow: stores the raw body."""
    media = sim.store.media.get(media_id)
    if media is None:
        raise ApiError(404, "upload not found")
    if not hmac.compare_digest(token.encode(), media.upload_token.encode()):
        raise ApiError(403, "upload signature does not match")
    data = await request.body()
    if len(data) > sim.config.max_upload_bytes:
        raise ApiError(400, f"upload exceeds the {sim.config.max_upload_bytes} byte limit", 1401)
    if media.declared_size is not None and len(data) != media.declared_size:
        raise ApiError(
            400, f"upload is {len(data)} bytes but the ticket said {media.declared_size}"
        )
    media.data = data
    return Response(status_code=200)


@router.api_route("/media/{account}/{folder}/{name}", methods=["GET", "HEAD"])
async def get_media(
    account: str, folder: str, name: str, request: Request, sim: SimDep
) -> Response:
    """An uploaded file, once its bytes arrived, at the path its `download_url` named."""
    path = f"/_sim/media/{account}/{folder}/{name}"
    media = sim.store.media.get(media_id_of(path))
    if media is None or media.data is None or media.path != path:
        raise ApiError(404, "media not found")
    return _bytes_response(media.data, media.content_type, request.headers.get("range"))


@router.api_route("/outputs/{name}", methods=["GET", "HEAD"], response_model=None)
async def get_output(name: str, request: Request, sim: SimDep) -> Response:
    """A finished prediction's MP4; subject to the `output_*` faults."""
    prediction = sim.store.get(name.removesuffix(".mp4"))
    if prediction is None or prediction.output is None or not name.endswith(".mp4"):
        raise ApiError(404, "output not found")
    _output_faults(sim, prediction)
    response = _bytes_response(prediction.output.read(), "video/mp4", request.headers.get("range"))
    response.headers["ETag"] = f'"{prediction.output_sha256}"'
    if request.method == "GET" and sim.faults.hit("output_truncate"):
        return CutShortResponse(
            bytes(response.body),
            status_code=response.status_code,
            media_type="video/mp4",
            keep_fraction=0.5,
            headers={k: v for k, v in response.headers.items() if k != "content-length"},
        )
    return response


def _output_faults(sim: Simulator, prediction: Prediction) -> None:
    """404 while the CDN has not caught up (`output_404_seconds`) or once the output expired
    (`output_gone_after_seconds`)."""
    profile, finished = sim.faults.profile, prediction.completed_at
    if finished is None:
        return
    age = utcnow() - finished
    not_yet = profile.output_404_seconds
    if not_yet is not None and age < timedelta(seconds=not_yet):
        sim.faults.fired["output_404_seconds"] += 1
        raise ApiError(404, "output not found")
    gone_after = profile.output_gone_after_seconds
    if gone_after is not None and age > timedelta(seconds=gone_after):
        sim.faults.fired["output_gone_after_seconds"] += 1
        raise ApiError(404, "output expired")


def _bytes_response(data: bytes, media_type: str, range_header: str | None) -> Response:
    """The whole body, or the one byte range asked for (players and probes seek)."""
    span = parse_range(range_header, len(data))
    headers = {"Accept-Ranges": "bytes"}
    if span is None:
        return Response(data, media_type=media_type, headers=headers)
    start, end = span
    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
    return Response(data[start : end + 1], status_code=206, media_type=media_type, headers=headers)
