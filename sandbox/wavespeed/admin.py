"""The simulator's own control panel under `/_sim/` (no auth): health, the ledger, the fault
profile and runtime settings.

`GET /_sim/ledger`::

    {"balance": 9998.65, "charged_usd": 1.35, "refunded_usd": 0.45,
     "predictions": [{"id", "model", "input", "status", "code", "error", "charge_usd",
                      "refunded_usd", "created_at", "started_at", "completed_at", "output_url",
                      "output_sha256", "output_bytes", "webhook_url",
                      "webhook_attempts": [{"at", "status_code", "error"}]}],
     "uploads": [{"filename", "content_type", "path", "bytes"}],
     "faults_fired": {"submit_429": 2, ...}}

Predictions and uploads (`bytes` null until the PUT came) are listed oldest first; timestamps
are ISO 8601 UTC.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError

from sandbox.wavespeed.config import RuntimeConfigPatch, SimulatorConfig
from sandbox.wavespeed.deps import SimDep, json_object
from sandbox.wavespeed.errors import ApiError
from sandbox.wavespeed.faults import FaultProfile
from sandbox.wavespeed.payloads import ledger

router = APIRouter(prefix="/_sim")

# What `GET /_sim/config` shows; the API key and webhook secret are left out on purpose.
_VISIBLE_CONFIG = set(RuntimeConfigPatch.model_fields) | {"fps", "initial_balance_usd"}


@router.get("/health")
async def health(sim: SimDep) -> dict[str, Any]:
    """Liveness, with a glance at the load."""
    return {"status": "ok", "predictions": len(sim.store.predictions), "running": sim.gate.active}


@router.get("/ledger")
async def get_ledger(sim: SimDep) -> dict[str, Any]:
    """Every charge, refund, prediction and webhook attempt so far."""
    return ledger(sim.store, sim.faults.fired)


@router.get("/faults")
async def get_faults(sim: SimDep) -> dict[str, Any]:
    """The fault profile in force."""
    return sim.faults.profile.model_dump(mode="json")


@router.put("/faults")
async def put_faults(request: Request, sim: SimDep) -> dict[str, Any]:
    """Replace the fault profile (knobs left out are off)."""
    try:
        profile = FaultProfile.model_validate(await json_object(request))
    except ValidationError as exc:
        raise ApiError(400, _first_error(exc)) from exc
    await sim.set_faults(profile)
    return profile.model_dump(mode="json")


@router.delete("/faults")
async def delete_faults(sim: SimDep) -> dict[str, Any]:
    """Turn every fault off."""
    await sim.set_faults(FaultProfile())
    return sim.faults.profile.model_dump(mode="json")


@router.get("/config")
async def get_config(sim: SimDep) -> dict[str, Any]:
    """The runtime-changeable settings and a few fixed ones."""
    return _visible(sim.config)


@router.put("/config")
async def put_config(request: Request, sim: SimDep) -> dict[str, Any]:
    """Change `render_mode`, `resolution`, `inference_seconds` and friends while running."""
    try:
        patch = RuntimeConfigPatch.model_validate(await json_object(request))
    except ValidationError as exc:
        raise ApiError(400, _first_error(exc)) from exc
    for field, value in patch.model_dump(exclude_none=True).items():
        setattr(sim.config, field, value)
    return _visible(sim.config)


@router.post("/reset")
async def reset(sim: SimDep) -> dict[str, Any]:
    """Forget all predictions, uploads, charges and faults."""
    await sim.reset()
    return {"status": "reset"}


def _visible(config: SimulatorConfig) -> dict[str, Any]:
    return config.model_dump(mode="json", include=_VISIBLE_CONFIG)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]
