"""Prometheus metrics: the counters and histograms the code increments, and how they are served.

Celery's prefork pool runs tasks in child processes, each with its own memory, so a counter
incremented in a child is invisible to a server in the parent. With `PROMETHEUS_MULTIPROC_DIR`
set (before this module is imported), prometheus_client keeps every process's values in
memory-mapped files in that directory and `MultiProcessCollector` sums them at scrape time.
Each process group (one API, one worker host) needs a directory of its own. Without it, the
process's default registry is served, which is right for a single-process API.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import structlog
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from workers import admission
from workers.dispatch import QUEUES
from workers.models import Job

log = structlog.get_logger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Minutes-scale buckets: a clip takes one to several minutes, queueing can add many more.
LATENCY_BUCKETS = (1, 5, 15, 30, 60, 90, 120, 180, 300, 600, 1200, 1800, 3600, 7200, 14400)


def multiproc_dir() -> str | None:
    """The shared directory of this process group, if it runs in multiprocess mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


# Unlabelled metrics open their file as they are created, just below: the directory must exist.
if multiproc_dir():
    os.makedirs(str(multiproc_dir()), exist_ok=True)

WAVESPEED_REQUESTS = Counter(
    "kling_wavespeed_requests",
    "Calls to WaveSpeed's API, by operation, outcome and HTTP status (2xx, 429, 4xx, 5xx, or "
    "none when no answer came)",
    ["operation", "outcome", "status"],
)
SUBMIT_LATENCY = Histogram(
    "kling_submit_latency_seconds",
    "From job creation to WaveSpeed accepting its prediction",
    buckets=LATENCY_BUCKETS,
)
END_TO_END_LATENCY = Histogram(
    "kling_end_to_end_latency_seconds",
    "From job creation to the video stored in S3",
    buckets=LATENCY_BUCKETS,
)
STORE_BYTES = Counter("kling_s3_store_bytes", "Bytes of finished videos copied into S3")
STORE_SECONDS = Histogram(
    "kling_s3_store_seconds",
    "Time to stream one finished video from WaveSpeed's CDN into S3",
    buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300),
)
CALLBACK_ATTEMPTS = Counter(
    "kling_callback_attempts", "Callback attempts to producers, by resulting delivery status",
    ["outcome"],
)  # fmt: skip
SPEND_USD = Counter("kling_spend_usd", "USD committed to WaveSpeed predictions that were adopted")
TRANSITIONS = Counter("kling_job_transitions", "Job state transitions, by target state", ["state"])
RECONCILER_RESENT = Counter(
    "kling_reconciler_resent",
    "Messages the reconciler sent for work that looked lost, by kind (outbox rows, jobs by "
    "state, callbacks)",
    ["kind"],
)
QUARANTINED = Counter(
    "kling_quarantined",
    "Tasks put aside for an operator (they kept killing their worker, or were resent past "
    "the cap), by task",
    ["task"],
)
BROKER_REQUESTS = Counter(
    "kling_broker_requests",
    "Generation requests taken from the broker (`generation.request`), by outcome: accepted, "
    "refused, duplicate (already taken), rejected (no valid key, or no request at all)",
    ["outcome"],
)
REPLIES = Counter(
    "kling_replies", "Events published as producers' own tasks, by outcome", ["outcome"]
)
RECONCILER_DEFERRED = Counter(
    "kling_reconciler_deferred",
    "Reconciler sweeps run with the longer backlog grace, by job state, because the queue "
    "they would send to still held messages",
    ["state"],
)


def wavespeed_call(operation: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Count each call of the decorated client method by its outcome, `ok` or the `outcome`
    of the exception it raised (`rejected`, `unavailable`, `ambiguous`), and by the answer's
    status: 429s and 5xx kept up are what WaveSpeed's own trouble looks like from here."""

    def decorate(method: Callable[P, R]) -> Callable[P, R]:
        @wraps(method)
        def counted(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                result = method(*args, **kwargs)
            except Exception as exc:
                outcome = getattr(exc, "outcome", "error")
                status = _status_class(getattr(exc, "status_code", None))
                WAVESPEED_REQUESTS.labels(operation, outcome, status).inc()
                raise
            WAVESPEED_REQUESTS.labels(operation, "ok", "2xx").inc()
            return result

        return counted

    return decorate


def _status_class(status_code: int | None) -> str:
    if status_code is None:
        return "none"
    return "429" if status_code == 429 else f"{status_code // 100}xx"


def adopted(created_at: datetime, submitted_at: datetime, cost_usd: Decimal | None) -> None:
    """A prediction now belongs to a job: how long it waited, and what it will cost."""
    SUBMIT_LATENCY.observe(_seconds(created_at, submitted_at))
    SPEND_USD.inc(float(cost_usd or 0))


def completed(created_at: datetime, completed_at: datetime) -> None:
    """A job's video is stored."""
    END_TO_END_LATENCY.observe(_seconds(created_at, completed_at))


def _seconds(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds())


# -- scrape time --------------------------------------------------------------------------


class BacklogCollector(Collector):
    """Jobs by state, the admission gate and broker queue depths, read when Prometheus scrapes
    (API process only): three small queries in one Postgres session and one `LLEN` per queue
    in Redis. Without `gate`, the gate's gauges are left out."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        redis: Any,
        queues: Iterable[str] = QUEUES,
        gate: admission.Gate | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._sessions = sessions
        self._redis = redis
        self._queues = tuple(queues)
        self._gate = gate
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._from_postgres()
        depth = GaugeMetricFamily(
            "kling_queue_depth", "Messages waiting in each broker queue", labels=["queue"]
        )
        for queue, length in self._depths():
            depth.add_metric([queue], length)
        yield depth

    def _from_postgres(self) -> list[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("kling_jobs", "Jobs in each state", labels=["state"])
        families = [jobs]
        try:
            with self._sessions() as session:
                for state, count in session.execute(_BY_STATE).all():
                    jobs.add_metric([str(state)], int(count))
                if self._gate is not None:
                    families += self._gate_families(session, self._gate)
        except Exception as exc:  # a scrape reports what it can rather than failing whole
            log.warning("metrics.jobs_unavailable", error=type(exc).__name__)
            return [GaugeMetricFamily("kling_jobs", "Jobs in each state", labels=["state"])]
        return families

    def _gate_families(self, session: Session, gate: admission.Gate) -> list[GaugeMetricFamily]:
        now = self._clock()
        used = admission.usage(session, gate, now, now - timedelta(minutes=1))
        waiting = GaugeMetricFamily(
            "kling_gate_waiting", "Queued jobs the gate has not admitted yet, by priority",
            labels=["priority"],
        )  # fmt: skip
        for rank, count in session.execute(_WAITING_BY_PRIORITY).all():
            waiting.add_metric([admission.PRIORITY_NAMES.get(rank, str(rank))], int(count))
        return [
            GaugeMetricFamily("kling_gate_in_flight", "Predictions the gate counts in flight",
                              value=used.in_flight),
            GaugeMetricFamily("kling_gate_max_in_flight", "The gate's MAX_IN_FLIGHT",
                              value=gate.max_in_flight),
            GaugeMetricFamily("kling_gate_submits_last_minute",
                              "Submits the gate counts in the last minute", value=used.last_minute),
            GaugeMetricFamily("kling_gate_submits_per_minute", "The gate's SUBMITS_PER_MINUTE",
                              value=gate.per_minute),
            waiting,
        ]  # fmt: skip

    def _depths(self) -> list[tuple[str, int]]:
        return queue_depths(self._redis, self._queues)


def queue_depths(redis: Any, queues: Iterable[str] = QUEUES) -> list[tuple[str, int]]:
    """Messages waiting in each broker queue (one round trip); empty when Redis does not
    answer, so a page or a scrape reports what it can rather than failing whole."""
    names = tuple(queues)
    try:
        with redis.pipeline(transaction=False) as pipe:
            for queue in names:
                pipe.llen(queue)
            lengths = pipe.execute()
    except Exception as exc:
        log.warning("metrics.queues_unavailable", error=type(exc).__name__)
        return []
    return list(zip(names, (int(n) for n in lengths), strict=True))


_BY_STATE = select(Job.status, func.count()).group_by(Job.status)
_WAITING_BY_PRIORITY = (
    select(Job.priority, func.count())
    .where(Job.status == "queued", Job.admitted_at.is_(None))
    .group_by(Job.priority)
)


class _DefaultRegistry(Collector):
    # Lets a per-app registry include the process-wide one without re-registering its metrics.
    def collect(self) -> Iterable[Any]:
        return REGISTRY.collect()


def scrape_registry(*extra: Collector) -> CollectorRegistry:
    """The registry to serve: every process of the group (or this process), plus `extra`."""
    registry = CollectorRegistry()
    path = multiproc_dir()
    if path:
        multiprocess.MultiProcessCollector(registry, path=path)
    else:
        registry.register(_DefaultRegistry())
    for collector in extra:
        registry.register(collector)
    return registry


# -- worker hosts -------------------------------------------------------------------------


def clean_multiproc_dir() -> None:
    """Remove what earlier processes left in the directory, so a restarted worker does not
    report their counts again. This process's own files stay: it opened them at import."""
    path = multiproc_dir()
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    mine = f"_{os.getpid()}.db"
    for stale in glob.glob(os.path.join(path, "*.db")):
        if not stale.endswith(mine):
            os.remove(stale)


def serve(port: int, host: str) -> None:
    """Serve the worker host's metrics on `port` from a thread of the calling process."""
    if not multiproc_dir():
        log.warning("metrics.single_process", reason="PROMETHEUS_MULTIPROC_DIR is not set")
    start_http_server(port, addr=host, registry=scrape_registry())
    log.info("metrics.serving", port=port, host=host)


def process_dead(pid: int) -> None:
    """Forget the live gauges of a pool process that exited."""
    if multiproc_dir():
        multiprocess.mark_process_dead(pid)
