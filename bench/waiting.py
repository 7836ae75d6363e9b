"""Waiting for jobs on one API process: `Prefer: wait=60` long-polls against the same number of
clients polling once a second, in the same run (`bench.api` runs it after its create phase).

Each client follows a job of its own. The API alone runs (no worker: jobs stay queued until
the run moves them). Both phases go the same way: every client starts waiting, the run lets
`--settle` seconds pass, then moves the jobs on one at a time (`--pace` a second) by a
transition committed straight in the database (the same `job_events` insert the pipeline
makes, whose trigger notifies), and ends once every client has seen its job change.
Reported per phase: wake-up latency (from a job's commit to its client's answer) p50/p99,
requests made, the API's CPU ms per client, and its RSS growth while the clients wait.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import psycopg

from bench.harness import mib, percentile, tree_cpu_seconds

MOVE = """
WITH moved AS (
    UPDATE jobs SET status = %(to)s, updated_at = now() WHERE id = %(id)s AND status = %(from)s
    RETURNING id
)
INSERT INTO job_events (job_id, from_state, to_state, reason)
SELECT id, %(from)s, %(to)s, 'bench.waiting' FROM moved
"""


@dataclass
class Watch:
    name: str
    requests: int = 0
    errors: int = 0
    seen_at: dict[str, float] = field(default_factory=dict)
    moved_at: dict[str, float] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    rss_growth: int = 0

    def figures(self, clients: int) -> dict[str, Any]:
        latencies = [
            (self.seen_at[j] - self.moved_at[j]) * 1000 for j in self.seen_at if j in self.moved_at
        ]
        return {
            "clients": clients,
            "saw_change": len(latencies),
            "errors": self.errors,
            "requests": self.requests,
            "wake_p50_ms": round(percentile(latencies, 0.50), 1),
            "wake_p99_ms": round(percentile(latencies, 0.99), 1),
            "api_cpu_ms_per_client": round(self.cpu_seconds * 1000 / max(1, clients), 2),
            "api_rss_growth_mib": mib(self.rss_growth),
            "api_rss_per_client_kib": round(self.rss_growth / 1024 / max(1, clients), 1),
        }


async def _long_poll(client: httpx.AsyncClient, job_id: str, watch: Watch) -> None:
    headers = {"Prefer": "wait=60", "If-None-Match": 'W/"queued"'}
    while job_id not in watch.seen_at:
        try:
            answer = await client.get(f"/v1/generations/{job_id}", headers=headers)
        except httpx.HTTPError:
            watch.errors += 1
            continue
        watch.requests += 1
        if answer.status_code == 200 and answer.json()["status"] != "queued":
            watch.seen_at[job_id] = time.monotonic()
        elif answer.status_code not in (200, 304):
            watch.errors += 1
            await asyncio.sleep(1)


async def _poll(client: httpx.AsyncClient, job_id: str, watch: Watch) -> None:
    while job_id not in watch.seen_at:
        try:
            answer = await client.get(f"/v1/generations/{job_id}")
        except httpx.HTTPError:
            watch.errors += 1
            await asyncio.sleep(1)
            continue
        watch.requests += 1
        if answer.status_code == 200 and answer.json()["status"] != "queued":
            watch.seen_at[job_id] = time.monotonic()
        else:
            await asyncio.sleep(1)


def _move(dsn: str, job_ids: list[str], pace: float, watch: Watch, reset: bool) -> None:
    """Move every job (queued -> cancelled, or back with `reset`), one commit each."""
    src, dst = ("cancelled", "queued") if reset else ("queued", "cancelled")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for job_id in job_ids:
            conn.execute(MOVE, {"id": uuid.UUID(job_id), "from": src, "to": dst})
            if not reset:
                watch.moved_at[job_id] = time.monotonic()
                time.sleep(1 / pace)


async def phase(
    name: str,
    info: dict[str, Any],
    dsn: str,
    api_pid: int,
    job_ids: list[str],
    options: Any,
) -> Watch:
    watch = Watch(name)
    follow = _long_poll if name == "long_poll" else _poll
    api = psutil.Process(api_pid)
    limits = httpx.Limits(max_connections=len(job_ids) + 10)
    auth = {"Authorization": f"Bearer {info['api_key']}"}
    async with httpx.AsyncClient(
        base_url=info["api_url"], headers=auth, limits=limits, timeout=120
    ) as client:
        rss_before, cpu = api.memory_info().rss, tree_cpu_seconds([api_pid])
        followers = [asyncio.create_task(follow(client, j, watch)) for j in job_ids]
        await asyncio.sleep(options.settle)
        watch.rss_growth = api.memory_info().rss - rss_before
        await asyncio.to_thread(_move, dsn, job_ids, options.pace, watch, False)
        await asyncio.wait_for(asyncio.gather(*followers), timeout=120)
        watch.cpu_seconds = tree_cpu_seconds([api_pid]) - cpu
    await asyncio.to_thread(_move, dsn, job_ids, options.pace, watch, True)
    return watch


def create_jobs(info: dict[str, Any], upload_id: str, count: int) -> list[str]:
    async def go() -> list[str]:
        auth = {"Authorization": f"Bearer {info['api_key']}"}
        body = {"upload_id": upload_id, "prompt": "slow push-in", "duration": 5}
        async with httpx.AsyncClient(base_url=info["api_url"], headers=auth, timeout=60) as c:
            made: list[str] = []

            async def creator() -> None:
                while len(made) < count:
                    answer = await c.post("/v1/generations", json=body)
                    made.append(answer.raise_for_status().json()["id"])

            await asyncio.gather(*(creator() for _ in range(8)))
            return made[:count]

    return asyncio.run(go())


def run(info: dict[str, Any], dsn: str, api_pid: int, upload_id: str, options: Any) -> dict:
    job_ids = create_jobs(info, upload_id, options.waiters)
    # Alternated, so neither has the machine to itself: long-poll, poll, long-poll, poll.
    runs: dict[str, list[Watch]] = {"long_poll": [], "poll_1s": []}
    for _ in range(options.rounds):
        for name in runs:
            runs[name].append(asyncio.run(phase(name, info, dsn, api_pid, job_ids, options)))
    figures = {name: _best(watches, options.waiters) for name, watches in runs.items()}
    waited, polled = figures["long_poll"], figures["poll_1s"]
    return {
        "bench": "api.waiters",
        "long_poll": waited,
        "poll_1s": polled,
        "ratio_cpu_long_poll_to_poll": round(
            waited["api_cpu_ms_per_client"] / max(0.001, polled["api_cpu_ms_per_client"]), 3
        ),
        "ratio_wake_p50_long_poll_to_poll": round(
            waited["wake_p50_ms"] / max(0.001, polled["wake_p50_ms"]), 3
        ),
    }


def _best(watches: list[Watch], clients: int) -> dict[str, Any]:
    """The round with the lowest API CPU: the one least disturbed by the machine."""
    return min((w.figures(clients) for w in watches), key=lambda f: f["api_cpu_ms_per_client"])
