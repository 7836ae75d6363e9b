"""The JSON the simulator answers with: WaveSpeed's envelope, its prediction object, and the
admin ledger."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sandbox.wavespeed.clock import iso, millis_between
from sandbox.wavespeed.store import Media, Prediction, Store

SYNC_TIMEOUT_CODE = 5004


def envelope(data: Any) -> dict[str, Any]:
    """WaveSpeed's success wrapper."""
    return {"code": 200, "message": "success", "data": data}


def error_body(status: int, message: str, error_code: int) -> dict[str, Any]:
    """A non-2xx answer: `message` and `error_code`, plus `code` for envelope-minded clients."""
    return {"code": status, "message": message, "error_code": error_code, "data": None}


def prediction_payload(prediction: Prediction) -> dict[str, Any]:
    """The prediction object of `/result`, history, submit answers and webhooks.

    `timings.inference` is the time the task spent processing; `executionTime` runs from
    acceptance to the end, queueing included.
    """
    completed = prediction.status == "completed"
    payload: dict[str, Any] = {
        "id": prediction.id,
        "model": prediction.model,
        "input": prediction.input,
        "outputs": [prediction.output_url] if completed else [],
        "urls": {"get": f"{prediction.base_url}/api/v3/predictions/{prediction.id}/result"},
        "has_nsfw_contents": [prediction.nsfw] if completed else [],
        "status": prediction.status,
        "created_at": iso(prediction.created_at),
        "error": prediction.error,
        "executionTime": millis_between(prediction.created_at, prediction.completed_at),
        "timings": {"inference": millis_between(prediction.started_at, prediction.completed_at)},
    }
    if prediction.code is not None:
        payload["code"] = prediction.code
    return payload


def sync_timeout_payload(prediction: Prediction, waited_seconds: float) -> dict[str, Any]:
    """What sync mode answers when the task outlives the wait: still running, code 5004."""
    payload = prediction_payload(prediction)
    payload.update(
        status="processing",
        code=SYNC_TIMEOUT_CODE,
        error=f"Sync mode timed out after {waited_seconds:g}s; the task is still running, "
        "query its result later.",
    )
    return payload


def webhook_body(prediction: Prediction) -> bytes:
    """The exact bytes a webhook delivery carries (and is signed over)."""
    return json.dumps(prediction_payload(prediction), separators=(",", ":")).encode()


def ledger_entry(prediction: Prediction) -> dict[str, Any]:
    """One prediction as `/_sim/ledger` lists it."""
    return {
        "id": prediction.id,
        "model": prediction.model,
        "input": prediction.input,
        "status": prediction.status,
        "code": prediction.code,
        "error": prediction.error,
        "charge_usd": prediction.charge_usd,
        "refunded_usd": prediction.refunded_usd,
        "created_at": iso(prediction.created_at),
        "started_at": iso(prediction.started_at),
        "completed_at": iso(prediction.completed_at),
        "output_url": prediction.output_url,
        "output_sha256": prediction.output_sha256,
        "output_bytes": prediction.output_size,
        "webhook_url": prediction.webhook_url,
        "webhook_attempts": [
            {"at": iso(a.at), "status_code": a.status_code, "error": a.error}
            for a in prediction.webhook_attempts
        ],
    }


def upload_entry(media: Media) -> dict[str, Any]:
    """One upload as `/_sim/ledger` lists it; `bytes` is null until its PUT came."""
    size = None if media.data is None else len(media.data)
    kind = {"filename": media.filename, "content_type": media.content_type}
    return {**kind, "path": media.path, "bytes": size}


def ledger(store: Store, faults_fired: Mapping[str, int]) -> dict[str, Any]:
    """The whole account: money, every prediction (oldest first) and the faults fired so far."""
    return {
        "balance": store.balance_usd,
        "charged_usd": store.charged_usd,
        "refunded_usd": store.refunded_usd,
        "predictions": [ledger_entry(p) for p in store.predictions.values()],
        "uploads": [upload_entry(m) for m in store.media.values()],
        "faults_fired": dict(faults_fired),
    }
