"""The Celery application: broker, queues, routes, beat schedule and logging hooks, in one place.

`celery -A workers.celery_app worker|beat` imports this module as its entrypoint.
"""

from __future__ import annotations

import os
from typing import Any

import structlog
from celery import Celery, signals
from kombu import Exchange, Queue

from config import Settings, tracing
from config.logging import configure_logging
from workers import broker, metrics, migrate
from workers.dispatch import NOTIFY, QUEUES, RECONCILE, ROUTES, STORE, SUBMIT

log = structlog.get_logger(__name__)

# The message header that carries the API's request id into tasks.
REQUEST_ID_HEADER = "request_id"


def create_celery(settings: Settings) -> Celery:
    celery = Celery("kling", broker=settings.redis_url, include=["workers.tasks", "api.inbox"])
    broker_timeout = settings.broker_timeout_seconds
    limit = settings.task_time_limit_seconds
    lease = settings.store_stall_seconds
    store_limit = lease - min(60.0, lease / 4)
    celery.conf.update(
        # A broker that is gone is noticed within seconds, not at the kernel's TCP timeout.
        broker_connection_timeout=broker_timeout,
        # Of the URL Celery will use (CELERY_BROKER_URL, if set, overrides `broker=`).
        broker_transport=broker.transport_for(celery.conf.broker_url),
        task_publish_retry_policy={"max_retries": 2, "interval_step": 0.5, "interval_max": 1},
        # Soft: the task gets an exception and cleans up; hard: its process is killed (and,
        # if that keeps happening, the message is put aside: workers.poison).
        task_soft_time_limit=limit,
        task_time_limit=limit + 30,
        task_annotations={
            # Past its hard limit no submit's POST can still reach WaveSpeed (`recover`).
            SUBMIT: {
                "soft_time_limit": settings.submit_time_limit_seconds - 5,
                "time_limit": settings.submit_time_limit_seconds,
            },
            # A store holds its job for `store_stall_seconds`; it ends before another try may.
            STORE: {
                "soft_time_limit": store_limit - min(30.0, lease / 8),
                "time_limit": store_limit,
            },
        },
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # Every task is idempotent, so a message is acknowledged only once it is done and
        # redelivered if the worker dies mid-task.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Explicit exchange and key per queue: a bare Queue(name) would inherit the default
        # queue's binding, and a message routed to one queue would land in all of them.
        task_queues=[Queue(name, Exchange(name), routing_key=name) for name in QUEUES],
        task_default_queue="maintenance",
        task_routes={
            name: {"queue": queue, "routing_key": queue} for name, queue in ROUTES.items()
        },
        # Countdowns stay far below this, so ETA messages are not redelivered while waiting.
        broker_transport_options={
            "visibility_timeout": 1800,
            "socket_timeout": broker_timeout,
            "socket_connect_timeout": broker_timeout,
            "socket_keepalive": True,
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        beat_schedule={"reconcile": _every(settings.reconcile_interval_seconds, RECONCILE)},
    )
    return celery


def _every(seconds: float, task: str) -> dict[str, Any]:
    # Each tick expires when the next is due: ticks that waited out a backlog (or a worker
    # outage) are dropped, not run late back to back; the next one does their work.
    return {"task": task, "schedule": seconds, "options": {"expires": seconds}}


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)


@signals.before_task_publish.connect
def _carry_request_id(headers: dict[str, Any] | None = None, **_: Any) -> None:
    # The API request (or the task) that asked for this task, so one id follows a job's
    # whole chain through the logs.
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    if headers is not None and request_id:
        headers[REQUEST_ID_HEADER] = request_id


@signals.task_prerun.connect
def _bind_task_context(task: Any = None, args: Any = None, **_: Any) -> None:
    structlog.contextvars.clear_contextvars()
    key = "delivery_id" if task is not None and task.name == NOTIFY else "job_id"
    structlog.contextvars.bind_contextvars(
        task=task.name if task else None,
        request_id=task.request.get(REQUEST_ID_HEADER) if task else None,
        **{key: args[0] if args else None},
    )


@signals.task_postrun.connect
def _clear_task_context(**_: Any) -> None:
    structlog.contextvars.clear_contextvars()


@signals.worker_init.connect
def _require_schema(**_: Any) -> None:
    # In the main process, before the pool forks: a worker on another schema would fail (or,
    # worse, half-succeed) task by task. Celery logs and ignores an exception in a signal
    # handler, so the refusal is an exit. Celery sets up logging only after this signal.
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    try:
        migrate.require_head(settings)
    except migrate.SchemaNotAtHead as exc:
        log.critical("schema.not_at_head", error=str(exc))
        raise SystemExit(f"refusing to start: {exc}") from exc


@signals.worker_init.connect
def _clean_metrics(**_: Any) -> None:
    # In the main process, before the pool forks: children must not find a predecessor's files.
    metrics.clean_multiproc_dir()


@signals.worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    # From the main process, which outlives its pool children and sees all their files.
    settings = Settings()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, settings.metrics_host)


@signals.worker_process_init.connect
def _setup_tracing(**_: Any) -> None:
    # In each pool process, after the fork: the exporter's thread and sockets must be its own.
    # Connected here, before `workers.tasks` builds the runtime, so its engines are traced.
    tracing.setup("worker")


@signals.worker_process_shutdown.connect
def _forget_process(pid: int | None = None, **_: Any) -> None:
    metrics.process_dead(pid or os.getpid())
    tracing.flush()


app = create_celery(Settings())
