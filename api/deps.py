"""Per-process resources (built in the lifespan) and per-request dependencies."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

import httpx
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from workers.dispatch import Dispatcher
from workers.pipeline import Pipeline
from workers.storage import Storage


@dataclass
class Resources:
    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    http: httpx.Client
    dispatch: Dispatcher
    pipeline: Pipeline


def resources(request: Request) -> Resources:
    return request.app.state.resources


def session(res: Annotated[Resources, Depends(resources)]) -> Iterator[Session]:
    """The request's unit of work: committed when the handler returns, rolled back if it raises."""
    with res.sessions() as db, db.begin():
        yield db


_bearer = HTTPBearer(auto_error=False)


def authenticated(
    res: Annotated[Resources, Depends(resources)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    expected = res.settings.api_key.get_secret_value()
    given = credentials.credentials if credentials else ""
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, "missing or invalid API key", {"WWW-Authenticate": "Bearer"})


Res = Annotated[Resources, Depends(resources)]
Db = Annotated[Session, Depends(session)]
Auth = Depends(authenticated)
