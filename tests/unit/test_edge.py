"""The edge middleware on its own, driven as ASGI: what it reads of a body, and when it stops.
The same behaviour on the running stack is in tests/e2e/test_body_limits.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError
from starlette.types import Message, Receive, Scope, Send

from api.app import _request_id
from api.edge import Authenticate, BodyTooLarge, LimitBody


def scope(path: str = "/v1/generations", **headers: str) -> Scope:
    raw = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "method": "POST", "path": path, "headers": raw}


def body_of(pieces: list[bytes]) -> tuple[Receive, list[int]]:
    """A receive that hands out `pieces` and records how many were taken."""
    taken: list[int] = []
    messages: Iterator[bytes] = iter(pieces)

    async def receive() -> Message:
        piece = next(messages)
        taken.append(len(piece))
        return {"type": "http.request", "body": piece, "more_body": len(taken) < len(pieces)}

    return receive, taken


async def reader(scope: Scope, receive: Receive, send: Send) -> None:
    """An app that reads the whole body, then answers 204."""
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def run(app: Any, scope: Scope, receive: Receive) -> tuple[int, dict[str, str], Any]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], headers, json.loads(body) if body else None


def test_a_declared_length_over_the_limit_is_refused_before_a_byte_is_read() -> None:
    receive, taken = body_of([b"x" * 11])
    status, headers, problem = run(
        LimitBody(reader, default=10, limits={}), scope(content_length="11"), receive
    )
    assert (status, problem["code"], problem["limit_bytes"]) == (413, "body_too_large", 10)
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert taken == []


def test_a_streamed_body_stops_at_the_piece_that_passes_the_limit() -> None:
    receive, taken = body_of([b"x" * 4] * 10)
    with pytest.raises(BodyTooLarge) as refused:  # the app's handler turns it into the 413
        run(LimitBody(reader, default=10, limits={}), scope(transfer_encoding="chunked"), receive)
    assert refused.value.limit == 10
    assert taken == [4, 4, 4]


def test_each_route_has_its_own_limit() -> None:
    limited = LimitBody(reader, default=10, limits={"/v1/uploads": 100})
    receive, _ = body_of([b"x" * 50])
    assert run(limited, scope("/v1/uploads", content_length="50"), receive)[0] == 204
    receive, _ = body_of([b"x" * 50])
    assert run(limited, scope("/v1/generations", content_length="50"), receive)[0] == 413


class Unreachable:
    """Resources whose database is down."""

    def sessions(self) -> Any:
        raise OperationalError("SELECT", {}, Exception("connection refused"))


def authenticated(path: str, **headers: str) -> tuple[tuple[int, dict[str, str], Any], list[int]]:
    app = type("App", (), {"state": type("State", (), {"resources": Unreachable()})})()
    receive, taken = body_of([b"{}"])
    guarded = Authenticate(reader, open_paths=frozenset({"/v1/wavespeed/webhook"}))
    return run(guarded, {**scope(path, **headers), "app": app}, receive), taken


@pytest.mark.parametrize("authorization", [None, "Basic a2V5", "Bearer"])
def test_a_v1_request_without_a_bearer_key_is_refused_before_its_body(
    authorization: str | None,
) -> None:
    headers = {"content_length": "2"} | ({"authorization": authorization} if authorization else {})
    (status, answered, problem), taken = authenticated("/v1/generations", **headers)
    assert (status, problem["code"]) == (401, "unauthorized")
    assert answered["www-authenticate"] == "Bearer"
    assert answered["connection"] == "close"
    assert taken == []


def test_keys_that_cannot_be_checked_are_a_503_not_a_500() -> None:
    (status, answered, problem), taken = authenticated("/v1/generations", authorization="Bearer k")
    assert (status, problem["code"], answered["retry-after"]) == (503, "unavailable", "5")
    assert taken == []


@pytest.mark.parametrize("path", ["/v1/wavespeed/webhook", "/healthz", "/openapi.json"])
def test_open_paths_reach_the_app_without_a_key(path: str) -> None:
    (status, _, _), taken = authenticated(path)
    assert status == 204 and taken == [2]


@pytest.mark.parametrize(
    ("sent", "kept"),
    [("req-1", True), ("a.b:c_d-E9", True), ("x" * 128, True), ("x" * 129, False),
     ("", False), ("has space", False), ("caf\u00e9", False), ("a\x00b", False),
     ("a/b", False), ('"><script>', False)],
)  # fmt: skip
def test_only_a_short_plain_request_id_is_taken(sent: str, kept: bool) -> None:
    chosen = _request_id(sent)
    assert (chosen == sent) is kept
    if not kept:
        assert len(chosen) == 32 and chosen.isalnum()
