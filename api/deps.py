"""Per-process resources (built in the lifespan) and per-request dependencies."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

import structlog
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from workers import tenants
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


_bearer = HTTPBearer(auto_error=False)


def tenant(
    res: Annotated[Resources, Depends(resources)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    """The tenant whose live API key authorised the request."""
    found = None
    if credentials:
        with res.sessions() as db:
            found = tenants.authenticate(db, credentials.credentials)
    if found is None:
        raise HTTPException(401, "missing or invalid API key", {"WWW-Authenticate": "Bearer"})
    structlog.contextvars.bind_contextvars(tenant_id=found.id)
    return found


Res = Annotated[Resources, Depends(resources)]
Db = Annotated[Session, Depends(session)]
CurrentTenant = Annotated[Tenant, Depends(tenant)]
