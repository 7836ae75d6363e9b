"""Per-process resources (built in the lifespan) and per-request dependencies."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

import anyio
import redis
from fastapi import Depends, HTTPException, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from api.throttle import KeyRateLimit, TenantSlots
from api.waiters import JobWatch, WaiterSlots
from config import Settings
from workers import tenants
from workers.estimates import Estimator
from workers.intake import Refusal
from workers.models import Tenant
from workers.pipeline import Pipeline
from workers.storage import Storage
from workers.urlguard import UrlGuard


@dataclass
class Resources:
    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    guard: UrlGuard
    pipeline: Pipeline
    metrics: CollectorRegistry
    # One client for the process's own broker checks (readiness, queue depths).
    broker: redis.Redis
    rate_limit: KeyRateLimit
    batches: TenantSlots
    fetches: TenantSlots
    # WaveSpeed's webhook has threads and a database pool of its own, so producer traffic,
    # however heavy, never queues it.
    webhook_pipeline: Pipeline
    webhook_threads: anyio.CapacityLimiter
    # Requests waiting for a job to change (long-poll, SSE), and each tenant's share of them.
    watch: JobWatch
    waits: WaiterSlots
    estimator: Estimator


async def resources(request: Request) -> Resources:
    # Async, so FastAPI runs it on the event loop: a sync dependency would take a thread of
    # the shared pool, and WaveSpeed's webhook would queue behind producer requests for it.
    return request.app.state.resources


def session(res: Annotated[Resources, Depends(resources)]) -> Iterator[Session]:
    """The request's unit of work: committed when the handler returns, rolled back if it raises."""
    with res.sessions() as db, db.begin():
        yield db


# Where `api.edge.Authenticate` puts the tenant of the request's key, in the request's state.
TENANT_STATE = "tenant"

_bearer = HTTPBearer(auto_error=False)
METRICS_UNAUTHORIZED = "missing or invalid metrics token"


async def tenant(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    """The tenant whose live API key authorised the request. `api.edge` found it before the
    body was read; the bearer scheme is declared here for the OpenAPI document."""
    found = getattr(request.state, TENANT_STATE, None)
    if not isinstance(found, Tenant):  # a route under /v1 the middleware left open
        raise HTTPException(401, "missing or invalid API key", {"WWW-Authenticate": "Bearer"})
    return found


async def metrics_reader(
    res: Annotated[Resources, Depends(resources)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """With `METRICS_TOKEN` set, /metrics is read only with it as the bearer token (a tenant's
    API key is no use there, and /metrics is outside the routes `api.edge` authenticates)."""
    token = res.settings.metrics_token
    if token is None:
        return
    sent = credentials.credentials if credentials else ""
    if not hmac.compare_digest(sent.encode(), token.get_secret_value().encode()):
        raise HTTPException(401, METRICS_UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})


def rate_limit_key(credentials: HTTPAuthorizationCredentials | None) -> str:
    # The key's hash: the limit is per key, and the token itself never reaches Redis.
    return tenants.hash_key(credentials.credentials) if credentials else "anonymous"


def spend(res: Resources, request: Request, cost: int, response: Response | None = None) -> None:
    """Spend `cost` of the calling key's rate limit, or refuse with 429 and `Retry-After`."""
    verdict = res.rate_limit.hit(request.state.rate_limit_key, cost)
    if not verdict.allowed:
        raise Refusal(
            429, "Authorization", "rate_limited",
            f"this API key is over its limit of {res.settings.rate_limit}; retry after the "
            "time in Retry-After", headers=verdict.headers,
        )  # fmt: skip
    if response is not None:
        response.headers.update(verdict.headers)


def rate_limited(
    request: Request,
    response: Response,
    res: Annotated[Resources, Depends(resources)],
    _: Annotated[Tenant, Depends(tenant)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Every authenticated request spends one of its key's allowance (a batch, one per item:
    see `spend`)."""
    request.state.rate_limit_key = rate_limit_key(credentials)
    spend(res, request, 1, response)


Res = Annotated[Resources, Depends(resources)]
# Function scope: the commit ends before the response is sent, so a 2xx is never answered for
# rows that are not (yet) committed; a request-scoped exit would run after the response.
Db = Annotated[Session, Depends(session, scope="function")]
CurrentTenant = Annotated[Tenant, Depends(tenant)]
