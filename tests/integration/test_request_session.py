"""The API's unit of work commits before the response starts: a client that is answered 2xx
and at once uses what it made (an upload, a rotated secret) finds it committed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event, text
from sqlalchemy.orm import Session, sessionmaker

from api.deps import Db, resources

pytestmark = pytest.mark.integration


def test_the_commit_ends_before_the_response_starts(sessions: sessionmaker[Session]) -> None:
    order: list[str] = []
    observed = sessionmaker(bind=sessions.kw["bind"])
    event.listen(observed, "after_commit", lambda _: order.append("commit"))
    app = FastAPI()

    @app.post("/write")
    def write(db: Db) -> dict[str, int]:
        db.execute(text("SELECT 1"))
        return {"ok": 1}

    app.dependency_overrides[resources] = lambda: SimpleNamespace(sessions=observed)

    async def recorded(scope: Any, receive: Any, send: Any) -> None:
        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                order.append("response")
            await send(message)

        await app(scope, receive, sending)

    async def call() -> int:
        transport = httpx.ASGITransport(app=recorded)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return (await client.post("/write")).status_code

    assert asyncio.run(call()) == 200
    assert order == ["commit", "response"]
