"""Polling reschedules itself instead of waiting: one worker process with one slot keeps many
predictions in flight at WaveSpeed at once."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import select

from bench.jobs import max_overlap
from config import Settings
from config.settings import settings_from
from sandbox.stack import Stack
from tests.support import SimulatorAdmin, wait_for
from workers import tenants
from workers.celery_app import create_celery
from workers.db import make_engine, make_session_factory, unit_of_work
from workers.dispatch import CeleryDispatcher
from workers.intake import GenerationInput, create_job
from workers.models import Job
from workers.outbox import relay
from workers.runtime import build_storage
from workers.sealing import Sealer

pytestmark = pytest.mark.integration

JOBS = 12
INFERENCE_SECONDS = 8


def test_one_single_slot_worker_keeps_ten_predictions_in_flight(
    stack: Stack, database_url: str, simulator: SimulatorAdmin, portrait: bytes
) -> None:
    # A deployment of its own (database and broker), so only this worker serves these jobs.
    redis_url = re.sub(r"/\d+$", "", stack.env["REDIS_URL"]) + "/7"
    settings: Settings = settings_from(stack.env, database_url=database_url, redis_url=redis_url)
    simulator.set_faults(inference_seconds=[INFERENCE_SECONDS, INFERENCE_SECONDS])
    worker = stack.start_worker(
        "single-slot", concurrency=1, env={"DATABASE_URL": database_url, "REDIS_URL": redis_url}
    )
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    storage = build_storage(settings)
    try:
        request = GenerationInput(prompt="slow pan left", guidance_scale=0.5, duration=5)
        with unit_of_work(sessions) as session:
            owner = tenants.create_tenant(session, "single-slot", Sealer.from_settings(settings))
        for _ in range(JOBS):
            create_job(sessions, storage, settings, owner, request, portrait)
        relay(sessions, CeleryDispatcher(create_celery(settings)))

        def finished() -> list[Job] | None:
            with sessions() as session:
                rows = list(session.scalars(select(Job)))
            return rows if all(job.status == "completed" for job in rows) else None

        done = wait_for(finished, timeout=180, interval=1)
    finally:
        worker.stop()
        engine.dispose()
        storage.close()

    ledger: dict[str, Any] = {p["id"]: p for p in simulator.ledger()["predictions"]}
    intervals = []
    for job in done:
        entry = ledger[job.prediction_id]
        start = datetime.fromisoformat(entry["started_at"])
        end = datetime.fromisoformat(entry["completed_at"])
        intervals.append((start, end))
    assert max_overlap(intervals) >= 10
