"""kling_client's own rules, on answers made up here: what is retried, how errors read,
how the event stream is parsed, where the API's address comes from."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from kling_client import (
    Client,
    KlingError,
    NotFound,
    RateLimited,
    Retries,
    ServerError,
    Unavailable,
)
from kling_client._calls import EventParser

QUICK = Retries(attempts=3, backoff=0.001, max_backoff=0.001, max_retry_after=0.01)


def client_of(
    answer: Callable[[httpx.Request], httpx.Response],
    *,
    retries: Retries = QUICK,
    idempotency_keys: bool = True,
) -> Client:
    http = httpx.Client(transport=httpx.MockTransport(answer))
    return Client("http://kling.test", "kl_key", http=http, retries=retries,
                  idempotency_keys=idempotency_keys)  # fmt: skip


def counted(
    *statuses: int,
) -> tuple[list[httpx.Request], Callable[[httpx.Request], httpx.Response]]:
    """Answers `statuses` in turn (the last one for ever after), recording each request."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        status = statuses[min(len(seen), len(statuses)) - 1]
        if status >= 400:
            problem = {"status": status, "code": f"c{status}", "detail": "d",
                       "errors": [{"field": "f", "code": "x", "message": "m"}]}  # fmt: skip
            return httpx.Response(status, json=problem, headers={"Retry-After": "0"})
        return httpx.Response(status, json={"id": "j", "status": "queued"})

    return seen, answer


def test_a_read_is_retried_through_503s_and_the_last_refusal_is_raised_typed() -> None:
    seen, answer = counted(503, 503, 503, 200)
    with pytest.raises(Unavailable) as caught:
        client_of(answer).get("j")
    assert len(seen) == 3 and caught.value.code == "c503" and caught.value.status == 503
    assert caught.value.errors == [{"field": "f", "code": "x", "message": "m"}]
    seen, answer = counted(503, 200)
    assert client_of(answer).get("j")["id"] == "j" and len(seen) == 2


def test_a_create_without_a_key_is_not_sent_again_after_a_503_but_is_after_a_429() -> None:
    seen, answer = counted(503)
    with pytest.raises(ServerError):
        client_of(answer, idempotency_keys=False).create(image_url="u", prompt="p")
    assert len(seen) == 1 and "idempotency-key" not in seen[0].headers
    seen, answer = counted(429, 201)
    client_of(answer, idempotency_keys=False).create(image_url="u", prompt="p")
    assert len(seen) == 2


def test_a_create_with_a_generated_key_is_sent_again_under_the_same_key() -> None:
    seen, answer = counted(502, 201)
    client_of(answer).create(image_url="u", prompt="p")
    keys = {request.headers["idempotency-key"] for request in seen}
    assert len(seen) == 2 and len(keys) == 1
    seen, answer = counted(201)
    client = client_of(answer)
    client.create(image_url="u", prompt="p")
    client.create(image_url="u", prompt="p")
    assert seen[0].headers["idempotency-key"] != seen[1].headers["idempotency-key"]


def test_errors_read_a_problem_or_whatever_a_proxy_sent() -> None:
    with pytest.raises(NotFound) as missing:
        client_of(counted(404)[1]).get("j")
    assert str(missing.value) == "c404: d"

    def proxy(_: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>Bad Gateway</html>")

    with pytest.raises(ServerError) as bad:
        client_of(proxy, retries=Retries.none()).get("j")
    assert bad.value.code == "http_502" and "Bad Gateway" in bad.value.detail


def test_retry_after_is_honoured_within_its_cap() -> None:
    policy = Retries(backoff=0.01, max_backoff=0.01, max_retry_after=5)
    assert policy.pause(1, retry_after=3) == 3
    assert policy.pause(1, retry_after=3600) == 5
    assert 0 <= policy.pause(1) <= 0.01
    rate = RateLimited(429, "rate_limited", "slow down", retry_after=2)
    assert isinstance(rate, KlingError) and rate.retry_after == 2


def test_server_sent_events_are_parsed_across_comments_and_lines() -> None:
    stream = [
        ": keep-alive", "", "id: 7", "event: state", 'data: {"id": 7, "to": "queued",',
        'data:  "from": null}', "", "event: other", "data: {}", "",
    ]  # fmt: skip
    assert list(EventParser().parse(stream)) == [{"id": 7, "to": "queued", "from": None}]


def test_the_api_is_taken_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLING_API_URL", "https://kling.example.com/")
    monkeypatch.setenv("KLING_API_KEY", "kl_env")
    with Client() as client:
        assert client.base_url == "https://kling.example.com"
    monkeypatch.delenv("KLING_API_KEY")
    with pytest.raises(ValueError, match="KLING_API_KEY"):
        Client()
