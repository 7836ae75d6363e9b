"""Builds the process-wide collaborators from the settings: engines, clients, the pipeline."""

from __future__ import annotations

from typing import Any

import httpx

from config import Settings
from workers.callbacks import Callbacks, Policy
from workers.db import engine_for, make_session_factory
from workers.dispatch import CeleryDispatcher
from workers.pipeline import Pipeline
from workers.replies import Replies
from workers.sealing import Sealer
from workers.storage import Storage, make_s3_client
from workers.urlguard import UrlGuard, UrlPolicy
from workers.wavespeed import WaveSpeedClient, make_http_client


def build_s3_client(settings: Settings) -> Any:
    secret = settings.aws_secret_access_key
    return make_s3_client(
        endpoint_url=settings.s3_endpoint_url,
        region=settings.aws_region,
        access_key_id=settings.aws_access_key_id,
        secret_access_key=secret.get_secret_value() if secret else None,
        connect_timeout=settings.s3_connect_timeout,
        read_timeout=settings.s3_read_timeout,
    )


def build_storage(settings: Settings) -> Storage:
    return Storage(
        build_s3_client(settings),
        settings.s3_bucket,
        part_size=settings.s3_part_size,
        max_concurrency=settings.s3_max_concurrency,
    )


def build_wavespeed(settings: Settings, http: httpx.Client) -> WaveSpeedClient:
    return WaveSpeedClient(
        http, settings.wavespeed_base_url, settings.wavespeed_api_key.get_secret_value()
    )


def build_guard(settings: Settings) -> UrlGuard:
    return UrlGuard(
        UrlPolicy(
            allow_hosts=tuple(settings.url_allow_hosts),
            read_timeout=settings.image_fetch_timeout_seconds,
            dns_timeout=settings.url_dns_timeout_seconds,
        )
    )


def build_pipeline(
    settings: Settings, celery: Any, *, pool_size: int | None = None, publish_retry: bool = True
) -> Pipeline:
    """The pipeline of one process. `pool_size` gives it a small pool of its own (the API's
    WaveSpeed webhook, which must not wait behind producer requests); `publish_retry` off
    tries each publish once (a request waiting on it; the outbox catches up later)."""
    http = make_http_client(settings.wavespeed_connect_timeout, settings.wavespeed_read_timeout)
    return Pipeline(
        sessions=make_session_factory(engine_for(settings, pool_size=pool_size)),
        wavespeed=build_wavespeed(settings, http),
        storage=build_storage(settings),
        http=http,
        settings=settings,
        dispatch=CeleryDispatcher(
            celery, max_countdown=settings.max_countdown_seconds, retry=publish_retry
        ),
        guard=build_guard(settings),
        sealer=Sealer.from_settings(settings),
    )


def close_pipeline(pipeline: Pipeline) -> None:
    """Release what `build_pipeline` opened: sockets and the connection pool."""
    pipeline.http.close()
    pipeline.guard.close()
    pipeline.storage.close()
    pipeline.sessions.kw["bind"].dispose()


def build_replies(pipeline: Pipeline) -> Replies:
    """The reply service beside a pipeline: its units of work and its broker."""
    settings = pipeline.settings
    return Replies(
        work=pipeline.work, publish=pipeline.dispatch.reply, clock=pipeline.clock,
        max_attempts=settings.reply_max_attempts, retry_base=settings.retry_base_seconds,
        retry_max=settings.max_countdown_seconds,
    )  # fmt: skip


def build_callbacks(pipeline: Pipeline) -> Callbacks:
    """The callback service beside a pipeline: its units of work, sealer and clock, and
    POSTs through its URL guard."""
    timeout = pipeline.settings.callback_timeout_seconds

    def post(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return pipeline.guard.post(url, content=body, headers=headers, timeout=timeout)

    return Callbacks(
        work=pipeline.work,
        post=post,
        policy=Policy.of(pipeline.settings),
        clock=pipeline.clock,
        sealer=pipeline.sealer,
    )
