"""The FastAPI application factory (`uvicorn api.app:create_app --factory`)."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import redis
import structlog
from fastapi import FastAPI, Request, Response

from api import edge, problems
from api.console.routes import install as install_console
from api.deps import Resources
from api.routes import hooks, router, v1
from api.throttle import KeyRateLimit, TenantSlots
from api.waiters import JobWatch, WaiterSlots
from config import Settings, tracing
from config.logging import configure_logging
from workers.celery_app import create_celery
from workers.estimates import Estimator
from workers.metrics import BacklogCollector, scrape_registry
from workers.migrate import SchemaNotAtHead, require_head
from workers.runtime import build_pipeline, close_pipeline

log = structlog.get_logger(__name__)

# Threads (and database connections) kept for WaveSpeed's webhook alone.
WEBHOOK_THREADS = 4


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_format, settings.log_level)
    tracing.setup("api")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Before anything is built: an API on another schema would fail request by request.
        try:
            await anyio.to_thread.run_sync(require_head, settings)
        except SchemaNotAtHead as exc:
            log.critical("schema.not_at_head", error=str(exc))
            raise
        celery = create_celery(settings)
        # A request never waits on the broker for long: one try, then the outbox's job.
        pipeline = build_pipeline(settings, celery, publish_retry=False)
        webhook_pipeline = build_pipeline(
            settings, celery, pool_size=WEBHOOK_THREADS, publish_retry=False
        )
        watch = JobWatch(settings.database_url)
        timeout = settings.broker_timeout_seconds
        broker = redis.Redis.from_url(
            settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        app.state.resources = Resources(
            settings=settings,
            sessions=pipeline.sessions,
            storage=pipeline.storage,
            guard=pipeline.guard,
            pipeline=pipeline,
            metrics=scrape_registry(
                BacklogCollector(pipeline.sessions, broker, gate=pipeline.gate)
            ),
            broker=broker,
            rate_limit=KeyRateLimit(
                settings.redis_url, settings.rate_limit, settings.broker_timeout_seconds
            ),
            batches=TenantSlots(
                settings.tenant_max_batches, 1.0, field="items", code="too_many_batches",
                what="batches",
            ),
            fetches=TenantSlots(
                settings.tenant_max_image_fetches, settings.image_fetch_timeout_seconds,
                field="image_url", code="too_many_image_fetches", what="image fetches",
            ),
            webhook_pipeline=webhook_pipeline,
            webhook_threads=anyio.CapacityLimiter(WEBHOOK_THREADS),
            watch=watch,
            waits=WaiterSlots(settings.tenant_max_waiters),
            estimator=Estimator(settings),
        )  # fmt: skip
        listener = asyncio.create_task(watch.run())
        yield
        listener.cancel()
        broker.close()
        close_pipeline(webhook_pipeline)
        close_pipeline(pipeline)

    app = FastAPI(
        title="Kling image-to-video",
        version="0.1.0",
        description="Turn images into cinematic videos with WaveSpeed's Kling v2.1 I2V Pro.",
        lifespan=lifespan,
    )
    problems.install(app)
    app.include_router(router)
    app.include_router(v1)
    app.include_router(hooks)
    install_console(app)
    edge.install(
        app,
        default_limit=settings.body_max_bytes,
        limits={
            app.url_path_for("create_upload"): settings.upload_body_max_bytes,
            app.url_path_for("create_batch"): settings.batch_body_max_bytes,
            app.url_path_for("wavespeed_webhook"): settings.wavespeed_webhook_body_max_bytes,
        },
        open_paths={app.url_path_for("wavespeed_webhook")},  # signed by WaveSpeed instead
    )
    # Added last, so it runs first: refusals at the edge carry the request id too.
    app.middleware("http")(_request_context)
    tracing.instrument_app(app)
    return app


# A caller's X-Request-Id is echoed, logged on every line and carried into tasks, so only a
# bounded id of plain characters is taken. Anything else is replaced by a generated id (and
# neither echoed nor logged) rather than refused: a tracing header should not cost a request.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _request_id(sent: str | None) -> str:
    return sent if sent and _REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex


async def _request_context(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    request_id = _request_id(request.headers.get("x-request-id"))
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    response = await call_next(request)
    response.headers["x-request-id"] = request_id
    return response
