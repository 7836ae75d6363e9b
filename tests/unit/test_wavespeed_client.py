"""The client's envelope parsing and failure classification, on canned HTTP exchanges."""

from collections.abc import Callable

import httpx
import pytest

from workers.wavespeed import (
    WaveSpeedAmbiguous,
    WaveSpeedClient,
    WaveSpeedRejected,
    WaveSpeedUnavailable,
)

MODEL = "kwaivgi/kling-v2.1-i2v-pro"
PREDICTION = {
    "id": "p-1",
    "model": MODEL,
    "outputs": [],
    "urls": {"get": "https://api.wavespeed.ai/api/v3/predictions/p-1/result"},
    "has_nsfw_contents": [],
    "status": "created",
    "created_at": "2026-11-24T10:00:00.123Z",
    "error": "",
    "timings": {"inference": 0},
}


def client_for(handler: Callable[[httpx.Request], httpx.Response]) -> WaveSpeedClient:
    http = httpx.Client(transport=httpx.MockTransport(handler))
    return WaveSpeedClient(http, "https://api.wavespeed.ai", "secret-key")


def envelope(data: object, code: int = 200) -> httpx.Response:
    return httpx.Response(200, json={"code": code, "message": "success", "data": data})


def test_submit_sends_flat_inputs_bearer_and_webhook() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return envelope(PREDICTION)

    prediction = client_for(handler).submit(
        MODEL, {"prompt": "p", "image": "u"}, webhook="https://h/x"
    )
    assert prediction.id == "p-1" and prediction.status == "created"
    assert prediction.created_at is not None and prediction.created_at.tzinfo is not None
    request = seen[0]
    assert request.url.path == f"/api/v3/{MODEL}"
    assert request.url.params["webhook"] == "https://h/x"
    assert request.headers["authorization"] == "Bearer secret-key"
    assert request.read() == b'{"prompt":"p","image":"u"}'


def test_completed_result_is_parsed() -> None:
    data = {
        **PREDICTION,
        "status": "completed",
        "outputs": ["https://cdn/x.mp4"],
        "timings": {"inference": 91234},
    }
    prediction = client_for(lambda _: envelope(data)).result("p-1")
    assert prediction.terminal
    assert prediction.outputs == ["https://cdn/x.mp4"]
    assert prediction.inference_ms == 91234


def test_failed_task_carries_its_code() -> None:
    data = {**PREDICTION, "status": "failed", "error": "moderated", "code": 1200}
    prediction = client_for(lambda _: envelope(data)).result("p-1")
    assert prediction.terminal and prediction.code == 1200 and prediction.error == "moderated"


@pytest.mark.parametrize("status", ["cancelled", "timeout", "deleted"])
def test_other_end_states_are_terminal(status: str) -> None:
    prediction = client_for(lambda _: envelope({**PREDICTION, "status": status})).result("p-1")
    assert prediction.terminal


def test_429_is_retryable_with_retry_after() -> None:
    def handler(_: httpx.Request) -> httpx.Response:
        return httpx.Response(
            429, headers={"Retry-After": "7"}, json={"message": "slow down", "error_code": 429}
        )

    with pytest.raises(WaveSpeedUnavailable) as caught:
        client_for(handler).submit(MODEL, {})
    assert caught.value.retryable and not caught.value.ambiguous
    assert caught.value.retry_after == 7.0
    assert "slow down" in str(caught.value)


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_retryable(status: int) -> None:
    with pytest.raises(WaveSpeedUnavailable):
        client_for(lambda _: httpx.Response(status, text="oops")).result("p-1")


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_are_permanent(status: int) -> None:
    def handler(_: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"message": "prompt is required", "error_code": 1400})

    with pytest.raises(WaveSpeedRejected) as caught:
        client_for(handler).submit(MODEL, {})
    assert not caught.value.retryable and not caught.value.ambiguous
    assert caught.value.status_code == status
    assert caught.value.error_code == 1400


def test_error_code_in_a_200_envelope_is_an_error() -> None:
    with pytest.raises(WaveSpeedRejected, match="401"):
        client_for(lambda _: envelope(None, code=401)).result("p-1")


def test_connect_failure_before_sending_is_safe_to_retry() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(WaveSpeedUnavailable):
        client_for(handler).submit(MODEL, {})


@pytest.mark.parametrize("error", [httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ReadError])
def test_a_submit_without_answer_is_ambiguous(error: type[httpx.TransportError]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error("no answer", request=request)

    with pytest.raises(WaveSpeedAmbiguous) as caught:
        client_for(handler).submit(MODEL, {})
    assert caught.value.ambiguous and not caught.value.retryable


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(500, json={"message": "internal error"}),
        httpx.Response(502, text="bad gateway"),
        httpx.Response(504, text="gateway timeout"),
        httpx.Response(200, text="<html>not json</html>"),
    ],
)
def test_a_submit_answered_after_it_may_have_created_is_ambiguous(answer: httpx.Response) -> None:
    # WaveSpeed may have created (and will bill) the prediction: only its history can say.
    with pytest.raises(WaveSpeedAmbiguous) as caught:
        client_for(lambda _: answer).submit(MODEL, {})
    assert caught.value.ambiguous and not caught.value.retryable
    assert caught.value.status_code == answer.status_code


@pytest.mark.parametrize("status", [429, 503])
def test_a_submit_turned_away_is_retryable(status: int) -> None:
    with pytest.raises(WaveSpeedUnavailable):
        client_for(lambda _: httpx.Response(status, text="busy")).submit(MODEL, {})


def test_a_read_without_answer_is_just_retryable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(WaveSpeedUnavailable):
        client_for(handler).result("p-1")


def test_history_finds_items_with_their_inputs() -> None:
    items = [{**PREDICTION, "input": {"image": "https://s3/inputs/abc/image.png"}}]

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v3/predictions"
        return envelope({"items": items, "page": 1, "page_size": 100, "total": 1})

    found = client_for(handler).history(model=MODEL)
    assert found[0].input["image"].endswith("inputs/abc/image.png")


def test_upload_puts_bytes_to_the_ticket_url() -> None:
    puts: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v3/media/uploads":
            return envelope(
                {
                    "download_url": "https://cdn/u/1.png",
                    "upload": {"method": "PUT", "url": "https://put/here", "headers": {"x-a": "b"}},
                }
            )
        puts.append(request)
        return httpx.Response(200)

    url = client_for(handler).upload("a.png", b"\x89PNG", "image/png")
    assert url == "https://cdn/u/1.png"
    assert puts[0].method == "PUT" and puts[0].read() == b"\x89PNG"
    assert puts[0].headers["x-a"] == "b"
    assert "authorization" not in puts[0].headers


def ticket_then(put: Callable[[httpx.Request], httpx.Response]) -> WaveSpeedClient:
    """A client whose upload ticket is granted and whose PUT answers as `put` does."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v3/media/uploads":
            upload = {"method": "PUT", "url": "https://put/here", "headers": {}}
            return envelope({"download_url": "https://cdn/u/1.png", "upload": upload})
        return put(request)

    return client_for(handler)


def timeout(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("no answer", request=request)


@pytest.mark.parametrize(
    "client",
    [
        client_for(lambda _: httpx.Response(500, json={"message": "boom"})),
        client_for(lambda _: httpx.Response(401, json={"message": "no"})),
        client_for(timeout),
        client_for(lambda _: envelope({"download_url": "https://c/1"})),
        ticket_then(lambda _: httpx.Response(503)),
        ticket_then(lambda _: httpx.Response(403)),  # an expired or refused presigned PUT
        ticket_then(lambda _: httpx.Response(400, text="<Code>RequestTimeout</Code>")),
        ticket_then(timeout),
    ],
    ids=["ticket-500", "ticket-401", "ticket-timeout", "ticket-without-url", "put-503",
         "put-403", "put-400", "put-timeout"],
)  # fmt: skip
def test_a_failed_upload_is_never_ambiguous_says_it_was_the_upload_and_is_tried_again(
    client: WaveSpeedClient,
) -> None:
    """An upload bills nothing, and the image passed our checks at intake: whatever it
    answers, the submit tries again (within its attempts cap), never asks the history, and
    never blames the job's input."""
    with pytest.raises(WaveSpeedUnavailable, match=r"^media upload: ") as raised:
        client.upload("job-1.png", b"\x89PNG", "image/png")
    assert not isinstance(raised.value, WaveSpeedAmbiguous)
