"""What every route needs: the simulator, the caller's base URL, auth and a JSON body."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, Request

from sandbox.wavespeed.errors import ApiError
from sandbox.wavespeed.simulator import Simulator


def simulator(request: Request) -> Simulator:
    """The simulator serving this request."""
    sim: Simulator = request.app.state.simulator
    return sim


SimDep = Annotated[Simulator, Depends(simulator)]


def base_url(request: Request) -> str:
    """The address the client reached us at; every URL we hand out is built on it."""
    return str(request.base_url).rstrip("/")


async def require_api_key(request: Request, sim: SimDep) -> None:
    """401 unless `Authorization: Bearer <the configured key>`."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "Unauthorized: missing Bearer API key")
    if not hmac.compare_digest(token.strip().encode(), sim.config.api_key.encode()):
        raise ApiError(401, "Unauthorized: invalid API key")


async def json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400."""
    try:
        body = await request.json()
    except ValueError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", 1401) from exc
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", 1401)
    return body
