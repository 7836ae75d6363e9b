"""What the benchmarks share: the output format, memory and time sampling, and the pieces of an
embedded stack that `sandbox.stack.Stack` does not start the way a benchmark needs."""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import psutil
import psycopg
import redis
from celery import Celery

from config import Settings
from sandbox.processes import Process
from sandbox.stack import Stack
from workers.celery_app import create_celery

# The product's own defaults for the background machinery (config/settings.py), not the
# sandbox's seconds-scale ones, so a benchmark sees the cadence a deployment would.
PRODUCTION_CADENCE = {
    "RETRY_BASE_SECONDS": "2",
    "RETRY_MAX_SECONDS": "120",
    "RECONCILE_INTERVAL_SECONDS": "5",
    "OUTBOX_GRACE_SECONDS": "10",
    "POLL_OVERDUE_GRACE_SECONDS": "30",
    "STORE_STALL_SECONDS": "600",
    "WAVESPEED_READ_TIMEOUT": "30",
    "SUBMIT_TIME_LIMIT_SECONDS": "90",
}


# The benchmarks' outputs are as large as real ones (1920x1080, about 7 MB for 5 s): every
# store and copy figure moves the bytes a deployment moves. `placeholder` is the small one.
OUTPUT_RENDER_MODE = "full_size"


def poll_schedule(inference_seconds: float, first: float | None = None) -> dict[str, str]:
    """An adaptive poll schedule for a known inference time: the first check a little before
    the expected finish (110 s for 120 s, unless `first` says otherwise), then 5 s growing
    1.5x a time to at most 30 s."""
    first = first or round(inference_seconds * 110 / 120, 1)
    minimum = max(0.5, round(inference_seconds / 24, 1))
    return {
        "POLL_FIRST_DELAY_SECONDS": json.dumps({"5": first, "10": first}),
        "POLL_MIN_INTERVAL_SECONDS": str(minimum),
        "POLL_MAX_INTERVAL_SECONDS": str(max(minimum, 30.0)),
    }


def emit(result: Mapping[str, Any], row: str) -> None:
    """One JSON line, then one markdown table row."""
    print(json.dumps(result), flush=True)
    print(row, flush=True)


def percentile(values: Iterable[float], fraction: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def mib(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


def tree_memory(pids: Iterable[int]) -> tuple[int, int]:
    """RSS and PSS summed over the processes and all their descendants. PSS splits pages
    shared between a prefork parent and its children, so it does not count them twice."""
    seen: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                seen[proc.pid] = proc
    rss = pss = 0
    for proc in seen.values():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            info = proc.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
    return rss, pss


def tree_cpu_seconds(pids: Iterable[int]) -> float:
    """User+system CPU seconds of the processes and their living descendants."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = proc.cpu_times()
                    total += times.user + times.system
    return total


def cpu_by_process(named: Mapping[str, int | None]) -> dict[str, float]:
    """CPU seconds so far of each named process tree."""
    return {name: tree_cpu_seconds([pid]) for name, pid in named.items() if pid is not None}


def stack_pids(stack: Stack, *extra: Process) -> dict[str, int | None]:
    """Every process of a stack (services and apps) by name, plus `extra` ones."""
    named = {s.process.name: s.process.pid for s in stack.services if s.process is not None}
    named.update({p.name: p.pid for p in [*stack.apps, *extra]})
    return named


@dataclass(frozen=True)
class Noop:
    """Celery's own floor on a stack: no-op tasks a second through its broker and worker, and
    the worker's CPU (pool children included) for each."""

    tasks_per_s: float
    cpu_ms_per_task: float


def celery_noop(stack: Stack, count: int, worker_pid: int, queue: str = "maintenance") -> Noop:
    """Send `count` no-op tasks to `queue` at once and time the worker through them."""
    celery = create_celery(Settings(redis_url=stack.env["REDIS_URL"]))
    waiting = redis.Redis.from_url(stack.env["REDIS_URL"])
    cpu = tree_cpu_seconds([worker_pid])
    started = time.monotonic()
    for _ in range(count):
        # `celery.accumulate` is a built-in that returns its argument: as close to no work
        # as a registered task gets.
        celery.send_task("celery.accumulate", args=[1], queue=queue)
    while cast(int, waiting.llen(queue)) > 0:
        time.sleep(0.01)
    elapsed = time.monotonic() - started
    time.sleep(0.5)  # the last ones taken finish
    cpu = tree_cpu_seconds([worker_pid]) - cpu
    waiting.close()
    celery.close()
    return Noop(count / elapsed, cpu * 1000 / count)


@dataclass(frozen=True)
class Costs:
    """What a stack has spent so far: CPU seconds of each named process tree, transactions
    committed in its database, and commands its Redis has run (by name)."""

    cpu: dict[str, float]
    commits: int
    commands: dict[str, int]

    # Backends report their commits to `pg_stat_database` when idle, at most about 10 s late.
    STATS_LAG_SECONDS = 11.0

    @classmethod
    def now(cls, stack: Stack, names: Iterable[str]) -> Costs:
        pids = stack_pids(stack)
        dsn = stack.direct_env["DATABASE_URL"].replace("+psycopg", "")
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            row = conn.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()
        client = redis.Redis.from_url(stack.direct_env["REDIS_URL"], socket_timeout=10)
        try:
            stats = cast(dict[str, Any], client.info("commandstats"))
        finally:
            client.close()
        return cls(
            cpu={name: tree_cpu_seconds([pid]) for name in names if (pid := pids.get(name))},
            commits=int(row[0]) if row else 0,
            commands={
                name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()
            },
        )

    def per_unit(self, later: Costs, units: int, unit: str) -> dict[str, Any]:
        """Each figure's growth from this snapshot to `later`, divided by `units`."""
        figures: dict[str, Any] = {
            f"{name}_cpu_ms_per_{unit}": round((later.cpu[name] - spent) * 1000 / units, 2)
            for name, spent in self.cpu.items()
            if name in later.cpu
        }
        figures[f"postgres_commits_per_{unit}"] = round((later.commits - self.commits) / units, 2)
        commands = {
            name: calls - self.commands.get(name, 0) for name, calls in later.commands.items()
        }
        figures[f"redis_commands_per_{unit}"] = round(sum(commands.values()) / units, 1)
        # Which commands, so a change in the total can be traced to the client that sent it.
        figures[f"redis_commands_by_name_per_{unit}"] = {
            name: round(calls / units, 2)
            for name, calls in sorted(commands.items(), key=lambda item: -item[1])
            if calls
        }
        return figures


def redis_used_memory(url: str) -> int:
    with redis.Redis.from_url(url, socket_timeout=5) as client:
        return int(cast(dict[str, Any], client.info("memory"))["used_memory"])


def redis_keys(url: str) -> int:
    with redis.Redis.from_url(url, socket_timeout=5) as client:
        return int(cast(int, client.dbsize()))


def redis_messages(url: str, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each Celery queue (a Redis list each), and `unacked`: those a
    worker holds (ETA tasks included), kept by kombu in the `unacked` hash until acked."""
    with redis.Redis.from_url(url, socket_timeout=5) as client:
        counts = {queue: cast(int, client.llen(queue)) for queue in queues}
        counts["unacked"] = cast(int, client.hlen("unacked"))
        return counts


@dataclass
class Sampler:
    """Calls `probe` every `interval` seconds on a thread and keeps (elapsed, value) pairs;
    a probe that raises is recorded as missing, so a busy server does not end the run."""

    probe: Callable[[], Any]
    interval: float = 1.0
    samples: list[tuple[float, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _start: float = field(default_factory=time.monotonic)

    def __enter__(self) -> Sampler:
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value = self.probe()
            except Exception:  # a missed sample is not a failed benchmark
                value = None
            self.samples.append((time.monotonic() - self._start, value))
            self._stop.wait(self.interval)

    def values(self) -> list[Any]:
        return [value for _, value in self.samples if value is not None]


def tasks_run(broker_url: str) -> dict[str, int]:
    """Tasks the stack's workers have run since they started, by name, as the workers count
    them themselves (Celery's remote control `stats`; its per-task log lines are off)."""
    app = Celery(broker=broker_url)
    try:
        replies = app.control.inspect(timeout=5).stats() or {}
    finally:
        app.close()
    total: Counter[str] = Counter()
    for reply in replies.values():
        total.update(reply.get("total", {}))
    return dict(total)


def reconciler_resent(log_path: Path) -> dict[str, int]:
    """From a worker's JSON log: what the reconciler re-sent, by kind."""
    resent: Counter[str] = Counter()
    with log_path.open(errors="replace") as log:
        for line in log:
            if line.startswith("{") and "reconcile.resent" in line:
                record = json.loads(line)
                if record["event"] == "reconcile.resent":
                    resent.update({k: v for k, v in record.items() if isinstance(v, int)})
    return dict(resent)
