"""End-to-end throughput and callback latency (benchmarks 1 and 6).

    python -m bench.throughput [--jobs 200] [--latency-jobs 20] [--noop 2000]

1. Throughput: generations a second from the first accepted request to the last callback
   received, through the whole product (API -> submit -> poll -> store into S3 -> signed
   callback), simulator with outputs as large as real ones (`--render-mode full_size`: 1080p,
   about 7 MB for 5 s) and zero inference. Baseline: Celery's own ceiling, no-op tasks a
   second through the same broker and the same worker (2 processes). Per job, from accepted
   to callback delivered: CPU ms of the API, the worker (pool children included) and beat,
   Postgres commits (`pg_stat_database.xact_commit`) and Redis commands (`INFO commandstats`).
Intake: requests a second taken in over HTTP creates and over the broker's
   `generation.request`, in the same run, the pipeline idle before each.
6. Callback latency: from the simulator marking a prediction completed to our callback arriving
   at the producer, p50/p99, with WaveSpeed's webhooks on and with them dropped (polling only).
   Inference times scatter uniformly over `--inference 4 12` seconds while the poll schedule
   expects 6 s, as real ones scatter around what a deployment expects.

Tracing: the throughput run again with the API and the worker restarted with tracing off,
then on (`OTEL_EXPORTER_OTLP_ENDPOINT` naming a sink that takes every export and drops it,
`sandbox.otlp`), in the same run: jobs a second and CPU ms per job each way, and their ratio
(`--tracing-jobs 0` skips it).

`--profile DIR` samples the worker (pool children included) and the API with py-spy during
the throughput phase and prints where their Python CPU went (`--profile-wall`: where their
time went, waiting included) (`bench.pyspy`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench import pyspy
from bench.harness import (
    OUTPUT_RENDER_MODE,
    PRODUCTION_CADENCE,
    Costs,
    celery_noop,
    emit,
    percentile,
    poll_schedule,
    stack_pids,
    tree_cpu_seconds,
)
from bench.jobs import plain_dsn
from config import Settings
from sandbox.otlp import Sink
from sandbox.otlp import serve as serve_sink
from sandbox.receiver import Receiver, serve
from sandbox.stack import Stack
from workers.celery_app import create_celery
from workers.dispatch import QUEUES

IMAGE = Path(__file__).resolve().parent.parent / "examples" / "portrait.png"
# The processes a job's cost is counted in (the worker's pool children with it).
COSTED = ("api", "worker", "beat")
# Requests taken in at once on each intake path: the API's threads, the requests worker's
# processes.
INTAKE_CONCURRENCY = 8


def run_jobs(api: httpx.Client, upload_id: str, receiver: Receiver, count: int) -> list[str]:
    items = [
        {"upload_id": upload_id, "prompt": f"pan left {i}", "webhook_url": receiver.url}
        for i in range(count)
    ]
    ids: list[str] = []
    for start in range(0, count, 100):
        answer = api.post("/v1/generations/batch", json={"items": items[start : start + 100]})
        ids += [item["generation"]["id"] for item in answer.raise_for_status().json()["items"]]
    return ids


def wait_callbacks(receiver: Receiver, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len({r.headers.get("webhook-id") for r in receiver.received}) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(receiver.received)} of {count} callbacks arrived")
        time.sleep(0.05)


def throughput(
    stack: Stack, api: httpx.Client, upload_id: str, jobs: int, profile: Path | None, wall: bool
) -> dict[str, Any]:
    named = stack_pids(stack).items()
    pids = {name: pid for name, pid in named if name in ("api", "worker") and pid}
    before = Costs.now(stack, COSTED)
    with serve(Receiver()) as receiver, pyspy.record(pids, profile, wall=wall):
        started = time.time()
        run_jobs(api, upload_id, receiver, jobs)
        wait_callbacks(receiver, jobs, timeout=600)
        elapsed = max(r.at for r in receiver.received) - started
    # The whole cost of a job, accepted to callback delivered, background sweeps included.
    time.sleep(Costs.STATS_LAG_SECONDS)
    costs = before.per_unit(Costs.now(stack, COSTED), jobs, "job")
    return {
        "jobs": jobs, "seconds": round(elapsed, 2), "jobs_per_s": round(jobs / elapsed, 2),
        **costs,
    }  # fmt: skip


def tracing_overhead(stack: Stack, upload_id: str, jobs: int) -> dict[str, Any]:
    """`throughput` with tracing off, then on, the API and the worker restarted for each
    (fresh processes both ways); the spans go to a sink that drops them."""
    runs: dict[str, dict[str, Any]] = {}
    with serve_sink(Sink(keep=False)) as sink:
        # Empty is off, whatever the caller's environment says.
        for label, endpoint in (("off", ""), ("on", sink.url)):
            _restart_apps(stack, {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
            with _api(stack) as api:
                runs[label] = throughput(stack, api, upload_id, jobs, None, False)
    off, on = runs["off"], runs["on"]
    cpu = {label: _app_cpu_ms(run) for label, run in runs.items()}
    return {
        "tracing_jobs": jobs,
        "tracing_off_jobs_per_s": off["jobs_per_s"],
        "tracing_on_jobs_per_s": on["jobs_per_s"],
        "ratio_tracing_on_to_off": round(on["jobs_per_s"] / off["jobs_per_s"], 3),
        "tracing_off_cpu_ms_per_job": cpu["off"],
        "tracing_on_cpu_ms_per_job": cpu["on"],
        "tracing_cpu_ms_per_job_added": round(cpu["on"] - cpu["off"], 2),
        "tracing_spans_per_job": round(sink.received / jobs, 1),
    }


def _app_cpu_ms(run: dict[str, Any]) -> float:
    """CPU ms per job of the processes tracing runs in: the API and the worker."""
    return round(run.get("api_cpu_ms_per_job", 0.0) + run.get("worker_cpu_ms_per_job", 0.0), 2)


def _restart_apps(stack: Stack, env: dict[str, str]) -> None:
    for process in [p for p in stack.apps if p.name in ("api", "worker")]:
        process.stop()
        stack.apps.remove(process)
    stack.start_api("api", int(stack.env["API_PORT"]), env)
    stack.start_worker(
        "worker", concurrency=stack.worker_concurrency, queues=stack.worker_queues, env=env
    )


def _api(stack: Stack) -> httpx.Client:
    # A client of its own: the restarted API dropped the connections of the last one.
    key = {"Authorization": f"Bearer {stack.info['api_key']}"}
    return httpx.Client(base_url=stack.info["api_url"], timeout=120, headers=key)


def intake(stack: Stack, api: httpx.Client, upload_id: str, count: int) -> dict[str, Any]:
    """Requests a second taken in over HTTP (`POST /v1/generations`, 8 at once, by the API)
    and over the broker (`generation.request` from Celery's `send_task`, by a `requests`
    worker of 8 processes), each from its first request to its last job
    committed, the pipeline idle before each; and the CPU of the process that took them."""
    dsn = plain_dsn(stack.direct_env["DATABASE_URL"])
    pids = stack_pids(stack)
    body = {"upload_id": upload_id, "prompt": "pan left", "duration": 5}
    _settled(dsn)
    cpu, started = tree_cpu_seconds([pids["api"] or 0]), time.monotonic()
    with ThreadPoolExecutor(INTAKE_CONCURRENCY) as pool:
        list(pool.map(lambda _: api.post("/v1/generations", json=body).raise_for_status(),
                      range(count)))  # fmt: skip
    http = (count / (time.monotonic() - started), tree_cpu_seconds([pids["api"] or 0]) - cpu)
    _settled(dsn)
    run = uuid.uuid4().hex[:8]
    celery = create_celery(Settings(redis_url=stack.env["REDIS_URL"]))
    cpu, started = tree_cpu_seconds([pids["requests"] or 0]), time.monotonic()
    for n in range(count):
        kwargs = {"api_key": stack.info["api_key"], "request_id": f"{run}-{n}", **body}
        celery.send_task("generation.request", kwargs=kwargs, queue="requests")
    while _taken(dsn, run) < count:
        time.sleep(0.02)
    broker = (count / (time.monotonic() - started), tree_cpu_seconds([pids["requests"] or 0]) - cpu)
    return {
        "intake_http_creates_per_s": round(http[0], 1),
        "intake_http_api_cpu_ms_per_create": round(http[1] * 1000 / count, 2),
        "intake_broker_requests_per_s": round(broker[0], 1),
        "intake_broker_worker_cpu_ms_per_request": round(broker[1] * 1000 / count, 2),
        "ratio_broker_to_http_intake": round(broker[0] / http[0], 3),
    }


def _settled(dsn: str, timeout: float = 300) -> None:
    """Until no job is on its way: the next phase has the machine to itself."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM jobs WHERE status NOT IN "
                "('completed', 'failed', 'cancelled', 'expired')"
            ).fetchone()
        if row is not None and row[0] == 0:
            return
        time.sleep(0.5)


def _taken(dsn: str, run: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM broker_requests WHERE request_id LIKE %s", (f"{run}-%",)
        ).fetchone()
    return int(row[0]) if row else 0


def latencies(
    stack: Stack,
    api: httpx.Client,
    upload_id: str,
    jobs: int,
    webhooks: bool,
    inference: tuple[float, float],
) -> list[float]:
    simulator = stack.env["WAVESPEED_BASE_URL"]
    # The jobs of the phase before (the intake's) must not be in the way of these.
    _settled(plain_dsn(stack.direct_env["DATABASE_URL"]))
    faults: dict[str, Any] = {"inference_seconds": list(inference)}
    if not webhooks:
        faults["webhook_drop"] = 1.0
    httpx.put(f"{simulator}/_sim/faults", json=faults).raise_for_status()
    with serve(Receiver()) as receiver:
        ids = run_jobs(api, upload_id, receiver, jobs)
        wait_callbacks(receiver, jobs, timeout=300)
    ledger = httpx.get(f"{simulator}/_sim/ledger", timeout=60).json()["predictions"]
    done = {
        p["id"]: datetime.fromisoformat(p["completed_at"]).timestamp()
        for p in ledger
        if p["completed_at"]
    }
    arrived = {}
    for job_id in ids:
        job = api.get(f"/v1/generations/{job_id}").json()
        first = min(r.at for r in receiver.received if job_id.encode() in r.body)
        arrived[job_id] = first - done[job["prediction_id"]]
    httpx.delete(f"{simulator}/_sim/faults").raise_for_status()
    return list(arrived.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--latency-jobs", type=int, default=20)
    parser.add_argument("--intake", type=int, default=200, help="requests per intake path")
    parser.add_argument("--noop", type=int, default=2000)
    parser.add_argument("--tracing-jobs", type=int, default=100, help="jobs each way; 0: skip")
    parser.add_argument("--inference", type=float, nargs=2, default=(4.0, 12.0))
    parser.add_argument("--render-mode", default=OUTPUT_RENDER_MODE)
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR")
    parser.add_argument("--profile-wall", action="store_true", help="wall time, not CPU")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="kling-bench-throughput-"))
    # The production cadence of the background sweeps, so the cost per job is a deployment's.
    environ = {
        **os.environ, **PRODUCTION_CADENCE, **poll_schedule(6),
        "CALLBACK_SCHEDULE_SECONDS": "[0, 1, 2, 4]",
    }  # fmt: skip
    stack = Stack(
        root,
        environ=environ,
        simulator_args=["--render-mode", args.render_mode, "--inference-seconds", "0"],
        worker_queues=[q for q in QUEUES if q != "requests"],
    )
    try:
        stack.up()
        stack.start_worker("requests", concurrency=INTAKE_CONCURRENCY, queues=["requests"])
        info = stack.info
        with httpx.Client(
            base_url=info["api_url"],
            timeout=120,
            headers={"Authorization": f"Bearer {info['api_key']}"},
        ) as api:
            upload = api.post(
                "/v1/uploads", files={"file": ("p.png", IMAGE.read_bytes(), "image/png")}
            )
            upload_id = upload.raise_for_status().json()["upload_id"]
            worker = stack_pids(stack)["worker"]
            assert worker is not None
            baseline = celery_noop(stack, args.noop, worker)
            measured = throughput(stack, api, upload_id, args.jobs, args.profile, args.profile_wall)
            taken = intake(stack, api, upload_id, args.intake)
            on, off = (
                latencies(stack, api, upload_id, args.latency_jobs, hooks, args.inference)
                for hooks in (True, False)
            )
        # Last: it restarts the API and the worker.
        traced = tracing_overhead(stack, upload_id, args.tracing_jobs) if args.tracing_jobs else {}
    finally:
        stack.down()
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "benchmark": "throughput",
        **measured,
        **taken,
        "celery_noop_tasks_per_s": round(baseline.tasks_per_s, 1),
        "celery_noop_worker_cpu_ms_per_task": round(baseline.cpu_ms_per_task, 2),
        "ratio_jobs_to_noop_tasks": round(measured["jobs_per_s"] / baseline.tasks_per_s, 4),
        "latency_inference_seconds": list(args.inference),
        "callback_latency_webhooks_on_p50_s": round(percentile(on, 0.5), 2),
        "callback_latency_webhooks_on_p99_s": round(percentile(on, 0.99), 2),
        "callback_latency_polling_p50_s": round(percentile(off, 0.5), 2),
        "callback_latency_polling_p99_s": round(percentile(off, 0.99), 2),
        **traced,
    }
    on_p = f"{percentile(on, 0.5):.2f}/{percentile(on, 0.99):.2f}"
    off_p = f"{percentile(off, 0.5):.2f}/{percentile(off, 0.99):.2f}"
    row = (
        f"| end to end | {result['jobs_per_s']} jobs/s "
        f"| Celery no-op {result['celery_noop_tasks_per_s']} tasks/s "
        f"| ratio {result['ratio_jobs_to_noop_tasks']} "
        f"| callback p50/p99: webhooks on {on_p} s, polling only {off_p} s "
        f"| per job: worker {measured.get('worker_cpu_ms_per_job')} CPU ms, "
        f"API {measured.get('api_cpu_ms_per_job')} CPU ms, "
        f"{measured['postgres_commits_per_job']} Postgres commits, "
        f"{measured['redis_commands_per_job']} Redis commands "
        f"| intake: HTTP {taken['intake_http_creates_per_s']} creates/s "
        f"({taken['intake_http_api_cpu_ms_per_create']} API CPU ms each), broker "
        f"{taken['intake_broker_requests_per_s']} requests/s "
        f"({taken['intake_broker_worker_cpu_ms_per_request']} worker CPU ms each), "
        f"x{taken['ratio_broker_to_http_intake']} |"
    )
    if traced:
        row += (
            f" tracing on/off: {traced['tracing_on_jobs_per_s']}/"
            f"{traced['tracing_off_jobs_per_s']} jobs/s (x{traced['ratio_tracing_on_to_off']}), "
            f"{traced['tracing_on_cpu_ms_per_job']}/{traced['tracing_off_cpu_ms_per_job']} "
            f"API+worker CPU ms per job |"
        )
    emit(result, row)
    if args.profile:
        for name in ("worker", "api"):
            print(pyspy.summary(args.profile / f"{name}.txt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
