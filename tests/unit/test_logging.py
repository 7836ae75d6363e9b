"""No secret reaches a log line: real settings, real presigned URLs, real HTTP clients logging
through the product's logging configuration, captured as the JSON a deployment writes."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import structlog
from celery.app import trace as celery_trace

from config import Settings
from config.logging import configure_logging, scrub
from workers.runtime import build_storage
from workers.wavespeed import WaveSpeedClient, WaveSpeedError

WAVESPEED_KEY = "ws-live-4b1f2a7c9d"
WEBHOOK_SECRET = "whsec_c2VjcmV0LXdlYmhvb2s"
AWS_SECRET = "aws-secret-8c7d6e5f"
TENANT_KEY = "kl_tenant-key-1a2b3c4d"


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("WAVESPEED_API_KEY", WAVESPEED_KEY)
    monkeypatch.setenv("WAVESPEED_WEBHOOK_SECRET", WEBHOOK_SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://s3.test")
    return Settings()


@pytest.fixture
def lines() -> Iterator[Any]:
    """The JSON lines logged during the test, by the handler a deployment gets."""
    configure_logging("json", "INFO")
    captured = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(captured)
    structlog.contextvars.clear_contextvars()

    def read() -> list[dict[str, Any]]:
        return [json.loads(line) for line in captured.getvalue().splitlines()]

    yield read
    structlog.contextvars.clear_contextvars()
    logging.getLogger("httpx").setLevel(logging.WARNING)


def presigned(settings: Settings) -> str:
    storage = build_storage(settings)
    try:
        return storage.presign_get("inputs/job-1/image.png", 3600)
    finally:
        storage.close()


def assert_clean(records: list[dict[str, Any]], *secrets: str) -> None:
    text = json.dumps(records)
    leaked = [secret for secret in secrets if secret in text]
    assert records and not leaked, leaked


def test_settings_logged_whole_show_no_secret(settings: Settings, lines: Any) -> None:
    log = structlog.get_logger("t")
    log.info("settings.loaded", settings=repr(settings), dump=settings.model_dump(mode="json"))
    log.info("settings.raw", wavespeed_api_key=WAVESPEED_KEY, webhook_secret=WEBHOOK_SECRET)
    assert_clean(lines(), WAVESPEED_KEY, WEBHOOK_SECRET, AWS_SECRET)


def test_presigned_urls_lose_their_query_in_any_field(settings: Settings, lines: Any) -> None:
    url = presigned(settings)
    signature = httpx.URL(url).params["X-Amz-Signature"]
    log = structlog.get_logger("t")
    log.warning("job.failed", message=f"output answered HTTP 404: {url}")
    log.info("fetch", url=url, urls=[url], request={"image": url})
    records = lines()
    assert_clean(records, signature, "X-Amz-Credential")
    assert records[1]["url"] == "http://s3.test/kling-videos/inputs/job-1/image.png?[redacted]"


def test_an_http_client_logging_a_presigned_request_leaks_nothing(
    settings: Settings, lines: Any
) -> None:
    # httpx logs every request line at INFO; a deployment that turns it up must stay safe.
    logging.getLogger("httpx").setLevel(logging.INFO)
    url = presigned(settings)
    with httpx.Client(transport=httpx.MockTransport(lambda _: httpx.Response(200))) as http:
        http.get(url)
    records = lines()
    assert any("HTTP Request" in r["event"] for r in records)
    assert_clean(records, httpx.URL(url).params["X-Amz-Signature"])


def test_authorization_values_are_redacted(settings: Settings, lines: Any) -> None:
    seen: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(401, json={"message": "bad key"})

    http = httpx.Client(transport=httpx.MockTransport(refuse))
    client = WaveSpeedClient(
        http, "https://api.test", settings.wavespeed_api_key.get_secret_value()
    )
    log = structlog.get_logger("t")
    with pytest.raises(WaveSpeedError) as failure:
        client.result("p-1")
    log.warning("poll.failed", error=str(failure.value), headers=dict(seen[0].headers))
    log.info("api.request", note=f"Authorization: Bearer {TENANT_KEY}", Authorization=TENANT_KEY)
    logging.getLogger("uvicorn.error").warning("client sent Bearer %s", TENANT_KEY)
    assert_clean(lines(), WAVESPEED_KEY, TENANT_KEY)


def test_tracebacks_are_scrubbed_too(settings: Settings, lines: Any) -> None:
    url = presigned(settings)
    try:
        raise RuntimeError(f"download of {url} broke")
    except RuntimeError:
        structlog.get_logger("t").exception("store.failed")
    records = lines()
    assert "RuntimeError" in records[0]["exception"]
    assert_clean(records, httpx.URL(url).params["X-Amz-Signature"])


def test_ordinary_urls_and_text_are_left_alone() -> None:
    text = "polled https://api.wavespeed.ai/api/v3/predictions/p-1/result?page=2 basic check"
    assert scrub(text) == text


@pytest.mark.parametrize(
    ("url", "scrubbed"),
    [
        ("https://user:pa55@hooks.example.com/in", "https://[redacted]@hooks.example.com/in"),
        ("https://token@hooks.example.com/in", "https://[redacted]@hooks.example.com/in"),
        (
            "postgresql+psycopg://kling:s3cret-pw@db.internal:5432/kling",
            "postgresql+psycopg://[redacted]@db.internal:5432/kling",
        ),
        ("redis://:hunter2hunter2@cache:6379/0", "redis://[redacted]@cache:6379/0"),
        (
            "https://hooks.example.com/services/T000/B000/XXXXXXXXXXXXXXXXXXXX",
            "https://hooks.example.com/services/T000/B000/[redacted]",
        ),
        (
            "https://discord.example/api/webhooks/112233445566778899/aB3dE6gH9jK2mN5pQ8sT1vW4yZ7",
            "https://discord.example/api/webhooks/112233445566778899/[redacted]",
        ),
        (
            "https://api.telegram.example/bot123456:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw/send",
            "https://api.telegram.example/[redacted]/send",
        ),
    ],
)
def test_urls_lose_userinfo_and_path_tokens(url: str, scrubbed: str) -> None:
    assert scrub(f"callback to {url} failed") == f"callback to {scrubbed} failed"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/v1/generations/3f1c2b9e-5a7d-4c8e-9f01-23456789abcd/events",
        "http://s3.test/kling-videos/videos/3f1c2b9e-5a7d-4c8e-9f01-23456789abcd.mp4",
        "http://s3.test/kling-videos/uploads/t-1/9f0e8d7c6b5a49382716a5b4c3d2e1f0",
        "https://api.wavespeed.ai/api/v3/predictions/0d8e1c5a7f2b4e3c9a6d8f1e2b3c4d5e/result",
        "https://api.wavespeed.ai/api/v3/kwaivgi/kling-v2.1-i2v-pro",
        "https://example.com/hooks/webhook-deliveries/internationalization",
    ],
)
def test_ids_and_ordinary_paths_stay_readable(url: str) -> None:
    assert scrub(url) == url


def test_a_callback_url_with_a_token_leaks_nothing_through_the_log_pipeline(lines: Any) -> None:
    token = "aB3dE6gH9jK2mN5pQ8sT1vW4yZ7"
    url = f"https://deploy:hunter2@hooks.example.com/services/T000/B000/{token}"
    structlog.get_logger("t").warning("callback.failed", url=url, error=f"POST {url}: 503")
    records = lines()
    assert_clean(records, token, "hunter2")
    assert records[0]["url"] == "https://[redacted]@hooks.example.com/services/T000/B000/[redacted]"


def test_console_lines_are_scrubbed_too(settings: Settings) -> None:
    configure_logging("console", "INFO")
    captured = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(captured)
    structlog.get_logger("t").info("settings", settings=settings.model_dump())
    logging.getLogger("t").warning("calling %s", f"Bearer {TENANT_KEY}")
    text = captured.getvalue()
    assert "settings" in text and "calling" in text
    assert WAVESPEED_KEY not in text and AWS_SECRET not in text and TENANT_KEY not in text


def test_a_console_traceback_is_scrubbed_and_shows_no_local_variables() -> None:
    """A frame's locals (a key about to be sent, a settings object) and the exception's own
    message (a callback URL with its token) are what a traceback would leak."""
    configure_logging("console", "INFO")
    captured = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(captured)

    def call_wavespeed(api_key: str) -> None:
        raise ConnectionError("POST https://deploy:hunter2@hooks.example.com/hook: refused")

    try:
        call_wavespeed(WAVESPEED_KEY)
    except ConnectionError:
        structlog.get_logger("t").exception("submit.failed")
    text = captured.getvalue()
    assert "submit.failed" in text and "ConnectionError" in text and "call_wavespeed" in text
    assert WAVESPEED_KEY not in text and "hunter2" not in text


def test_celery_lines_for_every_task_are_left_out_unless_debugging(lines: Any) -> None:
    """Two lines a task (received, succeeded) at hundreds of tasks a second cost the worker
    CPU and say nothing the job's own events do not; a retry or a failure is still logged."""
    trace = logging.getLogger("celery.app.trace")
    received = {"id": "1", "name": "generation.poll", "args": "()", "kwargs": "{}", "eta": None}
    logging.getLogger("celery.worker.strategy").info(celery_trace.LOG_RECEIVED, received)
    succeeded = {**received, "return_value": "None", "runtime": 0.01}
    trace.info(celery_trace.LOG_SUCCESS, succeeded)
    retried = {**received, "exc": "OperationalError()"}
    trace.info(celery_trace.LOG_RETRY, retried)
    trace.error("Task generation.poll[2] raised unexpected: RuntimeError()")
    assert [r["event"].split(":")[0] for r in lines()] == [
        "Task generation.poll[1] retry",
        "Task generation.poll[2] raised unexpected",
    ]
    configure_logging("json", "DEBUG")
    try:
        debugging = io.StringIO()
        handler = logging.getLogger().handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(debugging)
        trace.info(celery_trace.LOG_SUCCESS, succeeded)
        assert "Task generation.poll[1] succeeded" in debugging.getvalue()
    finally:
        configure_logging("json", "INFO")
