"""In-flight capacity of one worker host: how many generations one Celery worker with two
prefork processes keeps in flight at WaveSpeed at once, what that costs in memory (worker and
Redis) and in WaveSpeed calls, against the official SDK's `Client.run()` on two processes.

    python -m bench.inflight [--jobs 10000] [--inference-seconds 120] [--baseline-jobs 2]
        [--noop-tasks 2000] [--timeout 2400] [--set KEY=VALUE ...] [--profile-dir DIR]

The stack is the embedded one with a counting simulator (`bench.counting_simulator`, 1080p
outputs (`--render-mode`), every inference exactly `--inference-seconds`, no concurrency cap)
and the production cadence of beat and retries. The measured worker consumes `submit,poll,notify,
maintenance`; nothing consumes `store` (the S3 copy is `bench.copy`'s subject and in
production runs on its own hosts), so a job's run ends when it leaves `processing`. The jobs
are created through the service layer (`workers.intake.accept`, 100 to a transaction), then
published at once with `workers.outbox.relay`; the admission gate is opened to `--jobs`.

The baseline runs at the same time against its own counting simulator (same inference time):
two processes, each calling `wavespeed.Client.run()` (submit, then `GET /result` every second
until done) for `--baseline-jobs` jobs between them.

Per job: the worker's CPU (and per task run, since how many checks a job takes depends on how
far behind the host runs), Postgres commits and Redis commands. After the jobs the same worker
runs `--noop-tasks` of Celery's no-op task: its CPU per task is the floor a task run is
compared with (a poll also pays for its countdown, its publish and its commits).

`--set KEY=VALUE` passes a setting to every process of the stack (a what-if);
`--profile-dir DIR` samples the worker host (pool children included) with py-spy during the run
and prints where its Python CPU went (`bench.pyspy`).
At the default size the run takes about 7 minutes (docs/benchmarks.md); the 40-minute bound
leaves room for a slower machine or a what-if that makes the host fall behind.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import jobs as job_store
from bench import pyspy
from bench.counting_simulator import CountingSimulator
from bench.harness import (
    OUTPUT_RENDER_MODE,
    PRODUCTION_CADENCE,
    Costs,
    Sampler,
    celery_noop,
    cpu_by_process,
    emit,
    mib,
    percentile,
    poll_schedule,
    reconciler_resent,
    redis_keys,
    redis_messages,
    redis_used_memory,
    stack_pids,
    tasks_run,
    tree_memory,
)
from config.settings import settings_from
from sandbox.stack import Stack
from sandbox.wavespeed.config import DEFAULT_API_KEY, MODEL_ID
from sandbox.wavespeed.testing import sample_image

QUEUES = ("submit", "poll", "notify", "maintenance")


@dataclass
class Options:
    jobs: int = 10_000
    inference_seconds: float = 120.0
    concurrency: int = 2
    baseline_jobs: int = 2
    # Celery's own floor, run after the jobs on the same worker: CPU per no-op task.
    noop_tasks: int = 2000
    timeout: float = 2400.0
    render_mode: str = OUTPUT_RENDER_MODE
    root: Path | None = None
    profile_dir: Path | None = None
    # Extra settings for the stack's processes, KEY=VALUE (e.g. a what-if on a grace period).
    set: list[str] = field(default_factory=list)


@dataclass
class Baseline:
    jobs: int
    seconds: float
    calls: Counter[str]
    peak_in_flight: int
    peak_rss: int
    peak_pss: int
    errors: int

    @property
    def per_minute(self) -> float:
        return self.jobs / self.seconds * 60 if self.seconds else 0.0


# -- the baseline: the official SDK, blocking ---------------------------------------------


def sdk_loop(base_url: str, image_url: str, go: Any, todo: Any, done: Any) -> None:
    """One baseline process: take a job, `Client.run()` it to the end, take the next."""
    import wavespeed

    client = wavespeed.Client(api_key=DEFAULT_API_KEY, base_url=base_url)
    body = {"image": image_url, "prompt": "slow push-in", "duration": 5}
    go.wait()  # start-up (imports) is not part of the measured time
    # Blocking get until the sentinel: `get_nowait` can find the pipe empty while the parent's
    # feeder thread, starved by a busy parent, has not written the jobs yet.
    while todo.get() is not None:
        try:
            client.run(MODEL_ID, body, poll_interval=1.0)
            done.put((True, time.time()))
        except Exception:  # counted; the loop goes on
            done.put((False, time.time()))


class SdkBaseline:
    """`concurrency` SDK processes working through `jobs` jobs, started and left running."""

    def __init__(self, simulator: CountingSimulator, concurrency: int, jobs: int) -> None:
        self.simulator = simulator
        self.jobs = jobs
        upload = httpx.post(
            f"{simulator.url}/api/v3/media/upload/binary",
            files={"file": ("bench.png", sample_image(320, 320))},
            headers={"Authorization": f"Bearer {simulator.api_key}"},
        )
        image_url = upload.raise_for_status().json()["data"]["download_url"]
        context = multiprocessing.get_context("spawn")
        self.go, self.todo, self.done = context.Event(), context.Queue(), context.Queue()
        for n in [*range(jobs), *[None] * concurrency]:  # then one stop sentinel each
            self.todo.put(n)
        args = (simulator.url, image_url, self.go, self.todo, self.done)
        self.processes = [context.Process(target=sdk_loop, args=args) for _ in range(concurrency)]
        for process in self.processes:
            process.start()
        self.started = 0.0
        self.finished: list[tuple[bool, float]] = []
        self.memory: Sampler | None = None

    def start(self) -> None:
        pids = [p.pid for p in self.processes if p.pid is not None]
        self.memory = Sampler(lambda: tree_memory(pids), interval=1.0).__enter__()
        self.started = time.time()
        self.go.set()

    def wait(self, deadline: float) -> Baseline:
        while len(self.finished) < self.jobs and time.monotonic() < deadline:
            try:
                self.finished.append(self.done.get(timeout=1))
            except queue.Empty:
                continue
        ends = [at for _, at in self.finished]
        seconds = (max(ends) if ends else time.time()) - self.started
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
        assert self.memory is not None
        self.memory.__exit__()
        memory = self.memory.values() or [(0, 0)]
        counts = self.simulator.counts()
        spans = job_store.upstream_intervals(self.simulator.ledger())
        return Baseline(
            jobs=sum(ok for ok, _ in self.finished),
            seconds=seconds,
            calls=Counter(counts["by_kind"]),
            peak_in_flight=job_store.max_overlap(spans),
            peak_rss=max(rss for rss, _ in memory),
            peak_pss=max(pss for _, pss in memory),
            errors=sum(not ok for ok, _ in self.finished),
        )


# -- the product ----------------------------------------------------------------------------


def probe(stack: Stack, worker_pid: int, simulator: CountingSimulator) -> dict[str, Any]:
    rss, pss = tree_memory([worker_pid])
    return {
        "rss": rss,
        "pss": pss,
        "redis": redis_used_memory(stack.env["REDIS_URL"]),
        "messages": redis_messages(stack.env["REDIS_URL"], (*QUEUES, "store")),
        "statuses": job_store.status_counts(job_store.plain_dsn(stack.env["DATABASE_URL"])),
        "upstream_running": simulator.health()["running"],
    }


def wait_upstream_done(dsn: str, expected: int, deadline: float) -> Counter[str]:
    """Until no job is queued, submitting or processing (or the deadline)."""
    while True:
        counts = job_store.status_counts(dsn)
        unfinished = sum(counts[s] for s in job_store.UNFINISHED)
        if (sum(counts.values()) >= expected and not unfinished) or time.monotonic() > deadline:
            return counts
        time.sleep(2)


def run(options: Options) -> dict[str, Any]:
    root = options.root or Path(tempfile.mkdtemp(prefix="kling-bench-inflight-"))
    (root / "logs").mkdir(parents=True, exist_ok=True)
    sim_args = [
        "--render-mode",
        options.render_mode,
        "--inference-seconds",
        str(options.inference_seconds),
    ]
    simulator = CountingSimulator(root / "logs" / "simulator.log", sim_args).start()
    baseline_sim = CountingSimulator(
        root / "logs" / "baseline-simulator.log", sim_args, name="baseline-simulator"
    ).start()
    gate = str(max(options.jobs, 1))
    environ = {
        **os.environ, **simulator.env, **PRODUCTION_CADENCE,
        **poll_schedule(options.inference_seconds),
        "MAX_IN_FLIGHT": gate, "SUBMITS_PER_MINUTE": gate,
        # Nothing consumes `store` here; without this the reconciler would re-send every
        # `storing` job's message each 10 minutes, work a deployment with store hosts never sees.
        "STORE_STALL_SECONDS": "86400",
        **dict(item.split("=", 1) for item in options.set),
    }  # fmt: skip
    stack = Stack(root, environ=environ, worker_concurrency=options.concurrency)
    try:
        stack.up(apps=False)
        stack.start_api("api", int(stack.env["API_PORT"]))
        worker = stack.start_worker("worker", queues=QUEUES, concurrency=options.concurrency)
        assert worker.pid is not None
        return measure(options, stack, worker.pid, simulator, baseline_sim)
    finally:
        stack.down()
        simulator.stop()
        baseline_sim.stop()


def measure(
    options: Options,
    stack: Stack,
    worker_pid: int,
    simulator: CountingSimulator,
    baseline_sim: CountingSimulator,
) -> dict[str, Any]:
    settings = settings_from(stack.env)
    dsn = job_store.plain_dsn(stack.env["DATABASE_URL"])
    began = time.monotonic()
    tenant_id = stack.env.get("TENANT_ID")
    job_store.create(settings, options.jobs, sample_image(320, 320), tenant_id=tenant_id)
    create_seconds = time.monotonic() - began
    baseline = SdkBaseline(baseline_sim, options.concurrency, options.baseline_jobs)
    job_store.warm_up(settings)
    # Beat starts only now: its reconciler would publish the outbox rows of jobs being created.
    stack.start_beat()
    time.sleep(3)
    idle = probe(stack, worker_pid, simulator)
    named = stack_pids(stack, *(s.process for s in (simulator, baseline_sim) if s.process))
    cpu_before = cpu_by_process(named)
    costs_before = Costs.now(stack, ())
    profile = pyspy.record({"worker": worker_pid}, options.profile_dir)
    with Sampler(lambda: probe(stack, worker_pid, simulator), interval=1.0) as sampler, profile:
        started = time.monotonic()
        baseline.start()
        job_store.publish(settings)
        deadline = started + options.timeout
        final = wait_upstream_done(dsn, options.jobs, deadline)
        elapsed = time.monotonic() - started
        base = baseline.wait(deadline)
    cpu = {k: round(v - cpu_before.get(k, 0.0), 1) for k, v in cpu_by_process(named).items()}
    result = report(
        options, create_seconds, idle, sampler.values(), final, elapsed, cpu, simulator, base, dsn
    )
    tasks = tasks_run(stack.env["REDIS_URL"])
    # What the jobs left behind in Redis once they are done: the queues' keys, and a run
    # count for each task of each job that kept one (`workers.poison`).
    url = stack.env["REDIS_URL"]
    left = {"keys": redis_keys(url), "mib": mib(redis_used_memory(url))}
    # Commits and commands a job cost, the checks after the last finish and the lag of
    # Postgres's statistics included (and the sampler's one query a second).
    time.sleep(Costs.STATS_LAG_SECONDS)
    done = max(1, result["jobs_done_upstream"])
    costs = costs_before.per_unit(Costs.now(stack, ()), done, "job")
    per_task = cpu["worker"] * 1000 / max(1, sum(tasks.values()))
    noop = celery_noop(stack, options.noop_tasks, worker_pid)
    return {
        **result,
        **costs,
        "worker_cpu_ms_per_task": round(per_task, 2),
        "celery_noop_worker_cpu_ms_per_task": round(noop.cpu_ms_per_task, 2),
        "ratio_cpu_per_task_to_noop": round(per_task / noop.cpu_ms_per_task, 2),
        "tasks": tasks,
        "redis_left_after_jobs": left,
        "reconciler_resent": reconciler_resent(stack.logs / "worker.log"),
    }


def report(
    options: Options,
    create_seconds: float,
    idle: dict[str, Any],
    samples: list[dict[str, Any]],
    final: Counter[str],
    elapsed: float,
    cpu: dict[str, float],
    simulator: CountingSimulator,
    base: Baseline,
    dsn: str,
) -> dict[str, Any]:
    counts = simulator.counts()
    calls = Counter(counts["by_kind"])
    polls = list(counts["result_by_prediction"].values())
    ledger = simulator.ledger()
    spans = job_store.upstream_intervals(ledger)
    delays = job_store.detection_delays(ledger["predictions"], job_store.by_prediction(dsn))
    done = final["storing"] + final["completed"]
    in_flight = [sum(s["statuses"][k] for k in job_store.IN_FLIGHT) for s in samples]
    peak_at = max(range(len(samples)), key=lambda i: in_flight[i]) if samples else 0
    peak = samples[peak_at] if samples else idle
    upstream_calls = calls["submit"] + calls["result"] + calls["history"]
    per_minute = done / elapsed * 60 if elapsed else 0.0
    peak_pss = max((s["pss"] for s in samples), default=idle["pss"])
    peak_upstream = job_store.max_overlap(spans)
    return {
        "bench": "inflight",
        "jobs": options.jobs,
        "inference_seconds": options.inference_seconds,
        "settings_overridden": options.set,
        "worker_processes": options.concurrency,
        "create_seconds": round(create_seconds, 1),
        "run_seconds": round(elapsed, 1),
        "jobs_done_upstream": done,
        "jobs_failed": final["failed"],
        "jobs_unfinished": sum(final[s] for s in job_store.UNFINISHED),
        "peak_in_flight_db": max(in_flight, default=0),
        "peak_in_flight_upstream": peak_upstream,
        "peak_upstream_running_sampled": max((s["upstream_running"] for s in samples), default=0),
        "submit_span_seconds": round(job_store.submitted_span(dsn) or 0.0, 1),
        "detection_delay_p50_s": round(percentile(delays, 0.5), 1),
        "detection_delay_p95_s": round(percentile(delays, 0.95), 1),
        "detection_delay_max_s": round(max(delays, default=0.0), 1),
        "worker_rss_idle_mib": mib(idle["rss"]),
        "worker_rss_peak_mib": mib(max((s["rss"] for s in samples), default=idle["rss"])),
        "worker_pss_idle_mib": mib(idle["pss"]),
        "worker_pss_peak_mib": mib(peak_pss),
        "worker_pss_per_in_flight_kib": round(
            (peak_pss - idle["pss"]) / 1024 / max(1, peak_upstream), 2
        ),
        "worker_cpu_ms_per_job": round(cpu["worker"] * 1000 / max(1, done), 1),
        "cpu_seconds_by_process": cpu,
        "redis_used_idle_mib": mib(idle["redis"]),
        "redis_used_at_peak_in_flight_mib": mib(peak["redis"]),
        "redis_used_peak_mib": mib(max((s["redis"] for s in samples), default=idle["redis"])),
        "redis_messages_at_peak_in_flight": peak["messages"],
        "wavespeed_calls": dict(calls),
        "wavespeed_calls_per_job": round(upstream_calls / max(1, done), 2),
        "result_polls_per_prediction_p50": percentile(polls, 0.5),
        "result_polls_per_prediction_max": max(polls, default=0),
        "jobs_per_minute": round(per_minute, 1),
        "baseline": {
            **{k: v for k, v in asdict(base).items() if k != "calls"},
            "calls": dict(base.calls),
            "jobs_per_minute": round(base.per_minute, 2),
            "wavespeed_calls_per_job": round(
                (base.calls["submit"] + base.calls["result"]) / max(1, base.jobs), 1
            ),
            "peak_rss_mib": mib(base.peak_rss),
            "peak_pss_mib": mib(base.peak_pss),
        },
        "ratio_in_flight": round(peak_upstream / max(1, base.peak_in_flight), 1),
        "ratio_jobs_per_minute": round(per_minute / base.per_minute, 1)
        if base.per_minute
        else None,
    }


def parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.inflight", description=__doc__)
    defaults = Options()
    for name, value in vars(defaults).items():
        if name == "set":
            parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
            continue
        kind = Path if name in ("root", "profile_dir") else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    return Options(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    """Measure and print; exit 1 if a job did not get through WaveSpeed."""
    options = parse(argv)
    result = run(options)
    base = result["baseline"]
    emit(
        result,
        f"| inflight | {result['peak_in_flight_upstream']} in flight on "
        f"{options.concurrency} processes, {result['jobs_per_minute']} jobs/min, "
        f"worker PSS {result['worker_pss_peak_mib']} MiB, "
        f"Redis {result['redis_used_peak_mib']} MiB, "
        f"{result['wavespeed_calls_per_job']} calls/job "
        f"| SDK run(): {base['peak_in_flight']} in flight, {base['jobs_per_minute']} jobs/min, "
        f"{base['wavespeed_calls_per_job']} calls/job "
        f"| x{result['ratio_in_flight']} in flight, x{result['ratio_jobs_per_minute']} jobs/min "
        f"| {options.jobs} jobs, {options.inference_seconds:g} s inference, "
        f"run {result['run_seconds']} s |",
    )
    if options.profile_dir:
        print(pyspy.summary(options.profile_dir / "worker.txt"))
    ok = result["jobs_done_upstream"] == options.jobs and base["errors"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
