"""CPU per pipeline step, without Celery: what a task body costs the process that runs it,
against the least a step can cost (the baseline): one transaction and one message published.

    python -m bench.steps [--jobs 300] [--rounds 3]

One process builds the worker's pipeline (`workers.runtime.build_pipeline`) on an embedded
stack (Postgres, Redis, S3) and a counting simulator whose predictions run for an hour, and
times with `time.process_time`:

- `submit`: `Pipeline.submit` of a queued job (claim, POST, adoption, the first check's
  message);
- `poll_running`: `Pipeline.poll` of the chain's current message, which finds the
  prediction still running (claim, GET, the next check's message);
- `floor` (baseline): a transaction that reads `SELECT 1`, then a message of a poll's size
  pushed onto Redis with redis-py alone.

Host-level figures (`bench.inflight`) swing by more than a step's gain on a shared machine;
this one moves with the pipeline's own code only, and the ratios to the floor carry across
runs. Each round times every job once per step; a figure is the lowest round's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import select, text

from bench import jobs as job_store
from bench.counting_simulator import CountingSimulator
from bench.harness import OUTPUT_RENDER_MODE, emit
from config.logging import configure_logging
from config.settings import settings_from
from sandbox.stack import Stack
from sandbox.wavespeed.testing import sample_image
from workers.celery_app import create_celery
from workers.db import unit_of_work
from workers.models import Job
from workers.pipeline import Pipeline
from workers.runtime import build_pipeline, close_pipeline

# The floor's message: the size of a poll's message on the broker, on a list nobody reads.
FLOOR_QUEUE = "bench-steps-floor"
FLOOR_MESSAGE_BYTES = 1065


def cpu_ms_each(step: Callable[[Any], object], items: Iterable[Any]) -> float:
    """CPU milliseconds `step` takes per item, over all of `items`."""
    items = list(items)
    began = time.process_time()
    for item in items:
        step(item)
    return (time.process_time() - began) / max(1, len(items)) * 1000


def poll_chains(pipeline: Pipeline, ids: list[uuid.UUID]) -> list[tuple[uuid.UUID, int]]:
    """Each job with its chain's current `seq`: the message a poll of it would carry."""
    with pipeline.sessions() as session:
        rows = session.execute(select(Job.id, Job.poll_seq).where(Job.id.in_(ids))).all()
    return [(job_id, seq) for job_id, seq in rows]


def floor(pipeline: Pipeline, broker: redis.Redis, message: bytes) -> None:
    """The baseline: a transaction that reads `SELECT 1`, and a message of a poll's size
    pushed with redis-py alone (no product code, so no change to it moves the floor)."""
    with unit_of_work(pipeline.sessions) as session:
        session.execute(text("SELECT 1"))
    broker.lpush(FLOOR_QUEUE, message)


def measure(
    pipeline: Pipeline, broker: redis.Redis, rounds: int, jobs: int
) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"floor": [], "submit": [], "poll_running": []}
    with pipeline.sessions() as session:
        queued = list(session.scalars(select(Job.id).order_by(Job.created_at)))
    message = b"x" * FLOOR_MESSAGE_BYTES
    for batch in (queued[n * jobs : (n + 1) * jobs] for n in range(rounds)):
        figures["floor"].append(cpu_ms_each(lambda _: floor(pipeline, broker, message), batch))
        figures["submit"].append(cpu_ms_each(pipeline.submit, batch))
        chains = poll_chains(pipeline, batch)
        figures["poll_running"].append(cpu_ms_each(lambda c: pipeline.poll(*c), chains))
    return figures


def run(jobs: int, rounds: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="kling-bench-steps-"))
    (root / "logs").mkdir(parents=True, exist_ok=True)
    sim_args = ["--render-mode", OUTPUT_RENDER_MODE, "--inference-seconds", "3600"]
    simulator = CountingSimulator(root / "logs" / "simulator.log", sim_args).start()
    total = str(jobs * rounds)
    environ = {**os.environ, **simulator.env, "MAX_IN_FLIGHT": total, "SUBMITS_PER_MINUTE": total}
    stack = Stack(root, environ=environ)
    try:
        stack.up(apps=False)
        settings = settings_from(stack.env)
        tenant_id = stack.env.get("TENANT_ID")
        job_store.create(settings, jobs * rounds, sample_image(320, 320), tenant_id=tenant_id)
        pipeline = build_pipeline(settings, create_celery(settings))
        broker = redis.Redis.from_url(settings.redis_url)
        try:
            return summarise(measure(pipeline, broker, rounds, jobs), jobs, rounds)
        finally:
            broker.close()
            close_pipeline(pipeline)
    finally:
        stack.down()
        simulator.stop()


def summarise(figures: dict[str, list[float]], jobs: int, rounds: int) -> dict[str, Any]:
    best = {step: min(values) for step, values in figures.items()}
    return {
        "bench": "steps",
        "jobs_per_round": jobs,
        "rounds": rounds,
        **{f"{step}_cpu_ms": round(value, 3) for step, value in best.items()},
        **{
            f"ratio_{step}_to_floor": round(value / best["floor"], 2)
            for step, value in best.items()
            if step != "floor"
        },
        "all_rounds_ms": {step: [round(v, 3) for v in values] for step, values in figures.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300, help="jobs a round")
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args(argv)
    # JSON as deployed, but at WARNING: the figures are the steps' code, not their INFO lines.
    configure_logging("json", "WARNING")
    result = run(options.jobs, options.rounds)
    row = (
        f"| steps | submit {result['submit_cpu_ms']} CPU ms, poll (running) "
        f"{result['poll_running_cpu_ms']} | floor (a transaction, an LPUSH): "
        f"{result['floor_cpu_ms']} | x{result['ratio_submit_to_floor']} / "
        f"x{result['ratio_poll_running_to_floor']} | {options.jobs} jobs a round, best of "
        f"{options.rounds} |"
    )
    emit(result, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
