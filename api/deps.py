"""Per-process resources (built in the lifespan) and per-request dependencies."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from workers.dispatch import Dispatcher
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
    dispatch: Dispatcher
    pipeline: Pipeline
    metrics: CollectorRegistry


def resources(request: Request) -> Resources:
    return request.app.state.resources


def session(res: Annotated[Resources, Depends(resources)]) -> Iterator[Session]:
    """The request's unit of work: committed when the handler returns, rolled back if it raises."""
    with res.sessions() as db, db.begin():
        yield db


# Where `api.edge.Authenticate` puts the tenant of the request's key, in the request's state.
TENANT_STATE = "tenant"

_bearer = HTTPBearer(auto_error=False)


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


Res = Annotated[Resources, Depends(resources)]
Db = Annotated[Session, Depends(session)]
CurrentTenant = Annotated[Tenant, Depends(tenant)]
