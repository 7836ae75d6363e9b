"""Jobs through the service layer, for benchmarks that need thousands of them: settings as a
stack process reads them, creation (`workers.intake.accept`, as `POST /v1/generations` calls
it after loading the upload), the outbox relay, and their state read back from Postgres."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy.orm import Session

from config import Settings
from workers import intake
from workers.celery_app import create_celery
from workers.db import make_engine, make_session_factory, unit_of_work
from workers.dispatch import POLL, CeleryDispatcher
from workers.intake import GenerationInput, accept
from workers.outbox import relay
from workers.runtime import build_storage

try:
    from workers.work import Work
except ImportError:  # a product from before units of work
    Work = None  # type: ignore[assignment, misc]

BATCH = 100
IN_FLIGHT = ("submitting", "processing")
UNFINISHED = ("queued", "submitting", "processing")


def plain_dsn(database_url: str) -> str:
    return database_url.replace("+psycopg", "")


def create(
    settings: Settings, count: int, image: bytes, *, tenant_id: str | None, threads: int = 4
) -> None:
    """Accept `count` jobs, `BATCH` to a transaction, on a few threads; nothing is published.
    `tenant_id` is the stack's development tenant (None before the product had tenants)."""
    engine = make_engine(settings.database_url, pool_size=threads)
    sessions = make_session_factory(engine)
    storage = build_storage(settings)
    request = GenerationInput(
        prompt="slow push-in, hair in the wind", guidance_scale=0.5, duration=5
    )
    call: Any = accept  # its arguments gained the tenant, then lost the storage to `stage`
    staging = getattr(intake, "stage", None)

    def batch(size: int) -> None:
        # Copies first, outside the transaction, where the product has `stage` for it.
        staged = (
            [staging(storage, settings, request, image) for _ in range(size)] if staging else []
        )
        with unit_of_work(sessions) as session:
            owner = () if tenant_id is None else (_tenant(session, tenant_id),)
            # Since units of work, `accept` takes one; a unit sends nothing until it is asked.
            unit = Work(session, 0.0) if Work is not None else session
            for item in staged or [image] * size:
                if staging is None:
                    call(session, storage, settings, *owner, request, item)
                else:
                    call(unit, *owner, request, item)

    sizes = [BATCH] * (count // BATCH) + ([count % BATCH] if count % BATCH else [])
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(batch, sizes))
    finally:
        storage.close()
        engine.dispose()


def _tenant(session: Session, tenant_id: str) -> Any:
    from workers.models import Tenant  # type: ignore[attr-defined, unused-ignore]

    return session.get(Tenant, tenant_id)


def publish(settings: Settings) -> int:
    """Relay every unpublished outbox row (the relay takes 500 at a time)."""
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    dispatch = CeleryDispatcher(create_celery(settings))
    total = 0
    try:
        while sent := relay(sessions, dispatch):
            total += sent
    finally:
        engine.dispose()
    return total


def warm_up(settings: Settings, tasks: int = 20) -> None:
    """No-op poll tasks (for job ids that do not exist), so every pool process has built its
    pipeline (engine, clients) before a benchmark reads the worker's idle footprint."""
    dispatch = CeleryDispatcher(create_celery(settings))
    for _ in range(tasks):
        dispatch(POLL, uuid.uuid4(), seq=0)


def submitted_span(dsn: str) -> float | None:
    """Seconds between the first and the last job reaching WaveSpeed."""
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute("SELECT min(submitted_at), max(submitted_at) FROM jobs").fetchone()
    first, last = row if row else (None, None)
    return (last - first).total_seconds() if first and last else None


def status_counts(dsn: str) -> Counter[str]:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        rows = conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall()
    return Counter({status: n for status, n in rows})


def by_prediction(dsn: str) -> dict[str, dict[str, Any]]:
    """Per prediction id: the job's status and when it last left `processing`."""
    with psycopg.connect(dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            "SELECT j.prediction_id, j.status, max(e.at) AS left_processing FROM jobs j"
            " LEFT JOIN job_events e ON e.job_id = j.id AND e.from_state = 'processing'"
            " GROUP BY j.id"
        )
        return {row["prediction_id"]: row for row in cur.fetchall() if row["prediction_id"]}


def detection_delays(
    entries: list[dict[str, Any]], rows: Mapping[str, dict[str, Any]]
) -> list[float]:
    """Seconds from WaveSpeed finishing a prediction to its job leaving `processing`."""
    delays = []
    for entry in entries:
        row = rows.get(entry["id"])
        if row and row["left_processing"] and entry["completed_at"]:
            finished = datetime.fromisoformat(entry["completed_at"])
            delays.append((row["left_processing"] - finished).total_seconds())
    return delays


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """The largest number of intervals open at one instant."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    best = current = 0
    for _, step in edges:
        current += step
        best = max(best, current)
    return best


def upstream_intervals(ledger: Mapping[str, Any]) -> list[tuple[datetime, datetime]]:
    """[started, completed] of every prediction the simulator finished (its "processing")."""
    spans = []
    for entry in ledger["predictions"]:
        if entry["started_at"] and entry["completed_at"]:
            start = datetime.fromisoformat(entry["started_at"])
            spans.append((start, datetime.fromisoformat(entry["completed_at"])))
    return spans
