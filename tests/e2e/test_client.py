"""The producers' client package (`clients/python`, `kling_client`), against the running
stack: every call sync and async, typed errors, retries, the stream's resume, the broker."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import av
import httpx
import pytest
from celery import Celery
from kling_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    InvalidRequest,
    InvalidWebhook,
    KlingConnectionError,
    NotFound,
    Retries,
    verify_webhook,
)
from kling_client.celery import send_request

from sandbox.receiver import Receiver, serve
from sandbox.stack import Stack
from tests.support import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PORTRAIT = ROOT / "examples" / "portrait.png"
# Short pauses between tries: the tests wait for nothing but the stack.
QUICK = Retries(attempts=4, backoff=0.01, max_backoff=0.05)


class Faults(httpx.BaseTransport):
    """Forwards every request to the stack, except that the first request matching each
    planned fault meets it, as a network or a proxy would make it happen."""

    def __init__(self, *plan: tuple[str, str, str]) -> None:
        self.plan = list(plan)  # (method, path suffix, fault)
        self.sent: list[httpx.Request] = []
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        for planned in self.plan:
            method, suffix, fault = planned
            if request.method == method and request.url.path.endswith(suffix):
                self.plan.remove(planned)
                return self._fault(request, fault)
        return self._inner.handle_request(request)

    def _fault(self, request: httpx.Request, fault: str) -> httpx.Response:
        if fault == "refused":
            raise httpx.ConnectError("connection refused", request=request)
        if fault in ("429", "503"):
            problem = {"status": int(fault), "code": "injected", "detail": "try again"}
            return httpx.Response(int(fault), json=problem, headers={"Retry-After": "0"})
        response = self._inner.handle_request(request)
        if fault == "answer_lost":  # the API did the work; its answer never came
            response.read()
            raise httpx.ReadTimeout("read timed out", request=request)
        assert fault == "cut_after_first_event"
        return httpx.Response(
            response.status_code, headers=response.headers, stream=_Cut(response), request=request
        )

    def close(self) -> None:
        self._inner.close()


class _Cut(httpx.SyncByteStream):
    """A stream that passes its first Server-Sent Event whole, then breaks."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    def __iter__(self) -> Iterator[bytes]:
        seen = b""
        for chunk in self._response.iter_raw():
            seen += chunk
            if b"event: state" in seen and b"\n\n" in seen[seen.index(b"event: state") :]:
                end = seen.index(b"\n\n", seen.index(b"event: state")) + 2
                yield seen[:end]
                raise httpx.ReadError("connection reset by peer")
        yield seen

    def close(self) -> None:
        self._response.close()


class AsyncFaults(httpx.AsyncBaseTransport):
    """`Faults` for the asyncio client: a lost answer, or a stream cut after one event."""

    def __init__(self, *plan: tuple[str, str, str]) -> None:
        self.plan = list(plan)
        self.sent: list[httpx.Request] = []
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        fault = next(
            (p for p in self.plan if request.method == p[0] and request.url.path.endswith(p[1])),
            None,
        )
        response = await self._inner.handle_async_request(request)
        if fault is None:
            return response
        self.plan.remove(fault)
        if fault[2] == "answer_lost":
            await response.aread()
            raise httpx.ReadTimeout("read timed out", request=request)
        assert fault[2] == "cut_after_first_event"
        return httpx.Response(
            response.status_code, headers=response.headers, stream=_AsyncCut(response),
            request=request,
        )  # fmt: skip

    async def aclose(self) -> None:
        await self._inner.aclose()


class _AsyncCut(httpx.AsyncByteStream):
    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = b""
        async for chunk in self._response.aiter_raw():
            seen += chunk
            if b"event: state" in seen and b"\n\n" in seen[seen.index(b"event: state") :]:
                yield seen[: seen.index(b"\n\n", seen.index(b"event: state")) + 2]
                raise httpx.ReadError("connection reset by peer")
        yield seen

    async def aclose(self) -> None:
        await self._response.aclose()


@pytest.fixture
def kling(stack_info: dict[str, Any]) -> Iterator[Client]:
    with Client(stack_info["api_url"], stack_info["api_key"], retries=QUICK) as client:
        yield client


@pytest.fixture
def upload_id(kling: Client) -> str:
    return kling.upload(PORTRAIT)["upload_id"]


@contextmanager
def faulty(stack_info: dict[str, Any], faults: Faults, **options: Any) -> Iterator[Client]:
    """A client whose requests go through `faults` (on an `httpx.Client` of the caller's)."""
    with (
        httpx.Client(transport=faults, timeout=60) as http,
        Client(stack_info["api_url"], stack_info["api_key"], http=http, retries=QUICK,
               **options) as client,
    ):  # fmt: skip
        yield client


def test_a_generation_from_upload_to_download(kling: Client, tmp_path: Path) -> None:
    upload = kling.upload(PORTRAIT.read_bytes(), filename="portrait.png")
    assert upload["content_type"] == "image/png" and upload["width"] >= 300
    tag = uuid.uuid4().hex[:8]
    job = kling.create(upload_id=upload["upload_id"], prompt="tilt up", metadata={"suite": tag})
    seen: list[str] = []
    done = kling.wait(job["id"], timeout=120, on_change=lambda j: seen.append(j["status"]))
    assert done["status"] == "completed" and seen[0] == job["status"] and seen[-1] == "completed"
    assert kling.get(job["id"], since="completed") is None  # 304: nothing new
    moved_on = kling.get(job["id"], since="queued")
    assert moved_on is not None and moved_on["status"] == "completed"
    size = kling.download(job["id"], tmp_path / "clip.mp4")
    with av.open(io.BytesIO((tmp_path / "clip.mp4").read_bytes())) as container:
        assert container.streams.video[0].frames == 120
    assert size == done["video"]["bytes"]
    assert not (tmp_path / "clip.mp4.part").exists()
    assert [g["id"] for g in kling.list(metadata={"suite": tag})["data"]] == [job["id"]]
    history = kling.history(job["id"])
    assert history["events"][-1]["to_state"] == "completed"


def test_batch_dry_run_cancel_retry_and_paging(kling: Client, upload_id: str) -> None:
    tag = uuid.uuid4().hex[:8]
    priced = kling.dry_run(upload_id=upload_id, prompt="pan left")
    assert priced["dry_run"] is True and float(priced["price_usd"]) > 0
    items = [{"upload_id": upload_id, "prompt": f"pan {i}", "metadata": {"suite": tag}}
             for i in range(3)] + [{"prompt": ""}]  # fmt: skip
    batch = kling.batch(items, idempotency_key=f"batch-{tag}")
    assert (batch["accepted"], batch["refused"]) == (3, 1)
    again = kling.batch(items, idempotency_key=f"batch-{tag}")
    made = [item["generation"]["id"] for item in batch["items"][:3]]
    assert [item["status"] for item in again["items"][:3]] == [200] * 3
    assert [item["generation"]["id"] for item in again["items"][:3]] == made
    pages = list(kling.iterate(metadata={"suite": tag}, limit=1))
    assert sorted(g["id"] for g in pages) == sorted(made)
    cancelled = kling.cancel(made[0])
    assert cancelled["status"] in ("cancelled", "completed")
    ended = kling.wait(made[1], timeout=120)
    retried = kling.retry(made[1])
    assert retried["retry_of"] == ended["id"] and retried["id"] != ended["id"]


def test_refusals_are_typed_errors_with_the_problems_code_and_fields(
    kling: Client, stack_info: dict[str, Any]
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        kling.create(image_url="http://169.254.169.254/x.png", prompt="p")
    assert caught.value.status == 422 and caught.value.code == "url_not_allowed"
    with pytest.raises(InvalidRequest) as invalid:
        kling.create(image_url="https://example.com/x.png", prompt="", duration=7)
    assert invalid.value.code == "validation_error"
    assert {e["field"] for e in invalid.value.errors} >= {"prompt"}
    with pytest.raises(NotFound) as missing:
        kling.get(str(uuid.uuid4()))
    assert missing.value.code == "not_found" and missing.value.status == 404
    with (
        Client(stack_info["api_url"], "kl_not-a-key", retries=QUICK) as stranger,
        pytest.raises(AuthenticationError) as refused,
    ):
        stranger.list()
    assert refused.value.code == "unauthorized"


def test_a_keyed_create_whose_answer_was_lost_is_retried_into_the_same_job(
    stack_info: dict[str, Any], upload_id: str, kling: Client
) -> None:
    tag = uuid.uuid4().hex[:8]
    faults = Faults(("POST", "/v1/generations", "answer_lost"), ("GET", "", "503"))
    with faulty(stack_info, faults) as client:
        job = client.create(upload_id=upload_id, prompt="orbit", metadata={"suite": tag})
        assert client.get(job["id"])["id"] == job["id"]  # through an injected 503
    creates = [r for r in faults.sent if r.method == "POST"]
    assert len(creates) == 2 and creates[0].headers["idempotency-key"].startswith("kc-")
    assert creates[0].headers["idempotency-key"] == creates[1].headers["idempotency-key"]
    assert [g["id"] for g in kling.list(metadata={"suite": tag})["data"]] == [job["id"]]
    assert not faults.plan


def test_a_create_without_a_key_is_retried_only_when_it_certainly_did_nothing(
    stack_info: dict[str, Any], upload_id: str, kling: Client
) -> None:
    tag = uuid.uuid4().hex[:8]
    faults = Faults(
        ("POST", "/v1/generations", "refused"), ("POST", "/v1/generations", "429"),
        ("POST", "/v1/generations", "answer_lost"),
    )  # fmt: skip
    with (
        faulty(stack_info, faults, idempotency_keys=False) as client,
        pytest.raises(KlingConnectionError) as lost,
    ):
        client.create(upload_id=upload_id, prompt="orbit", metadata={"suite": tag})
    assert lost.value.status is None and lost.value.code == "connection_error"
    creates = [r for r in faults.sent if r.method == "POST"]
    assert len(creates) == 3 and all("idempotency-key" not in r.headers for r in creates)
    # The lost answer's job exists: a blind retry would have made a second one.
    assert len(kling.list(metadata={"suite": tag})["data"]) == 1


def test_the_stream_resumes_after_a_drop_without_repeating_a_change(
    stack_info: dict[str, Any], upload_id: str
) -> None:
    faults = Faults(("GET", "/events/stream", "cut_after_first_event"))
    with faulty(stack_info, faults) as client:
        job = client.create(upload_id=upload_id, prompt="push-in")
        changes = list(client.stream(job["id"]))
        assert changes[-1]["generation"]["status"] == "completed"
        ids = [change["id"] for change in changes]
        assert ids == sorted(set(ids)) and len(ids) >= 3
        streams = [r for r in faults.sent if r.url.path.endswith("/events/stream")]
        assert "last-event-id" not in streams[0].headers
        assert streams[1].headers["last-event-id"] == str(ids[0])
        later = list(client.stream(job["id"], last_event_id=ids[1]))
    assert [change["id"] for change in later] == ids[2:]


def test_the_event_feed_pages_on_from_an_events_id(kling: Client, upload_id: str) -> None:
    job = kling.create(upload_id=upload_id, prompt="pull-out")
    kling.wait(job["id"], timeout=120)
    completed = [
        e for e in kling.iter_events(types=["generation.completed"]) if e["data"]["id"] == job["id"]
    ]
    assert len(completed) == 1
    first = kling.events(limit=1)["data"][0]
    after = kling.events(after=first["id"], limit=5)["data"]
    assert first["id"] not in [e["id"] for e in after]


def test_the_async_client(stack_info: dict[str, Any], upload_id: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]

    async def scenario() -> None:
        async with AsyncClient(stack_info["api_url"], stack_info["api_key"], retries=QUICK) as k:
            jobs = await asyncio.gather(
                *(
                    k.create(upload_id=upload_id, prompt=f"orbit {i}", metadata={"suite": tag})
                    for i in range(3)
                )
            )
            done = await asyncio.gather(*(k.wait(j["id"], timeout=120) for j in jobs))
            assert [j["status"] for j in done] == ["completed"] * 3
            assert await k.get(jobs[0]["id"], since="completed") is None
            changes = [c async for c in k.stream(jobs[0]["id"])]
            assert changes[-1]["to"] == "completed"
            size = await k.download(jobs[0]["id"], tmp_path / "async.mp4")
            assert size == (tmp_path / "async.mp4").stat().st_size > 0
            listed = [g["id"] async for g in k.iterate(metadata={"suite": tag}, limit=2)]
            assert sorted(listed) == sorted(j["id"] for j in jobs)
            assert (await k.history(jobs[2]["id"]))["events"][-1]["to_state"] == "completed"
            with pytest.raises(InvalidRequest) as caught:
                await k.create(image_url="http://169.254.169.254/x.png", prompt="p")
            assert caught.value.code == "url_not_allowed"
            with pytest.raises(NotFound):
                await k.cancel(str(uuid.uuid4()))

    asyncio.run(scenario())


def test_the_async_client_retries_a_lost_create_and_resumes_a_cut_stream(
    stack_info: dict[str, Any], upload_id: str, kling: Client
) -> None:
    tag = uuid.uuid4().hex[:8]
    faults = AsyncFaults(
        ("POST", "/v1/generations", "answer_lost"),
        ("GET", "/events/stream", "cut_after_first_event"),
    )

    async def scenario() -> tuple[Any, list[Any]]:
        async with (
            httpx.AsyncClient(transport=faults, timeout=60) as http,
            AsyncClient(stack_info["api_url"], stack_info["api_key"], http=http,
                        retries=QUICK) as k,
        ):  # fmt: skip
            job = await k.create(upload_id=upload_id, prompt="orbit", metadata={"suite": tag})
            return job, [change async for change in k.stream(job["id"])]

    job, changes = asyncio.run(scenario())
    creates = [r for r in faults.sent if r.method == "POST"]
    assert len(creates) == 2 and len({r.headers["idempotency-key"] for r in creates}) == 1
    assert [g["id"] for g in kling.list(metadata={"suite": tag})["data"]] == [job["id"]]
    ids = [change["id"] for change in changes]
    assert ids == sorted(set(ids)) and changes[-1]["generation"]["status"] == "completed"
    streams = [r for r in faults.sent if r.url.path.endswith("/events/stream")]
    assert len(streams) == 2 and streams[1].headers["last-event-id"] == str(ids[0])
    assert not faults.plan


def test_send_request_puts_a_generation_request_on_the_broker(
    stack: Stack, stack_info: dict[str, Any], kling: Client, upload_id: str
) -> None:
    app = Celery("producer", broker=stack.env["REDIS_URL"])
    try:
        request_id = send_request(
            app, api_key=stack_info["api_key"], upload_id=upload_id, prompt="slow push-in",
            metadata={"via": "broker"},
        )  # fmt: skip
    finally:
        app.close()
    assert request_id.startswith("req-")
    with pytest.raises(NotFound):
        kling.get_request(f"never-sent-{uuid.uuid4().hex}")
    outcome = wait_for(lambda: _taken(kling, request_id))
    assert outcome["status"] == "accepted"
    job = kling.get(str(outcome["job_id"]))
    assert job["request_id"] == request_id and job["metadata"] == {"via": "broker"}


def _taken(kling: Client, request_id: str) -> dict[str, Any] | None:
    try:
        return dict(kling.get_request(request_id))
    except NotFound:
        return None


def test_verify_webhook_accepts_ours_and_refuses_forgeries(
    kling: Client, stack_info: dict[str, Any], upload_id: str
) -> None:
    with serve(Receiver()) as receiver:
        job = kling.create(upload_id=upload_id, prompt="pull-out", webhook_url=receiver.url)
        wait_for(lambda: receiver.received, timeout=120)
    received = receiver.received[0]
    event = verify_webhook(stack_info["webhook_secret"], received.body, received.headers)
    assert event["type"] == "generation.completed" and event["data"]["id"] == job["id"]
    with pytest.raises(InvalidWebhook):
        verify_webhook(stack_info["webhook_secret"], received.body + b" ", received.headers)


def test_the_readme_example_runs(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "producer.mp4"
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "producer.py"),
         "--stack", str(stack.root / "stack.json"), "--out", str(out)],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "callback generation.completed verified" in run.stdout
    assert out.stat().st_size > 0
