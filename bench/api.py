"""`POST /v1/generations` under concurrent load, against `GET /healthz` on the same server.

    python -m bench.api [--requests 1000] [--baseline-requests 3000] [--concurrency 8]

An embedded stack with the API alone (one uvicorn process as `kling stack up` runs it; no worker
and no beat, so nothing else competes for the two cores and accepted jobs simply wait queued).
One upload (`POST /v1/uploads`), then each generation names it by `upload_id`. Load comes from
`--concurrency` asyncio tasks on one httpx client in this process, each sending its next
request as soon as the last one answered; every phase stops at its request count or its time
limit. Reported: requests a second, p50/p99 latency, and the API process's CPU milliseconds per
request (steadier than req/s on a shared machine). `--profile DIR` samples the API with py-spy
during the POST phase and prints where its Python CPU went (`bench.pyspy`).

Then `--waiters` clients (1000; 0 skips it) each wait for a job of their own, first with
`Prefer: wait=60` and then polling once a second, in the same run (`bench.waiting`): wake-up
latency, requests, the API's CPU per client and its memory while they wait.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import pyspy, waiting
from bench.harness import emit, percentile, tree_cpu_seconds
from sandbox.stack import Stack

PORTRAIT = Path(__file__).resolve().parent.parent / "examples" / "portrait.png"
WARM_UP = 20


@dataclass
class Phase:
    name: str
    done: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    server_cpu_seconds: float = 0.0

    def figures(self) -> dict[str, Any]:
        per_second = self.done / self.seconds if self.seconds else 0.0
        return {
            "requests": self.done,
            "errors": self.errors,
            "statuses": self.statuses,
            "seconds": round(self.seconds, 2),
            "requests_per_second": round(per_second, 1),
            "p50_ms": round(percentile(self.latencies_ms, 0.50), 2),
            "p99_ms": round(percentile(self.latencies_ms, 0.99), 2),
            "server_cpu_ms_per_request": round(
                self.server_cpu_seconds * 1000 / max(1, self.done), 2
            ),
        }


async def load(
    client: httpx.AsyncClient,
    make: Callable[[], httpx.Request],
    expect: int,
    total: int,
    concurrency: int,
    time_limit: float,
    phase: Phase,
) -> None:
    """`concurrency` closed-loop senders sharing one budget of `total` requests."""
    budget = iter(range(total))
    deadline = time.monotonic() + time_limit

    async def sender() -> None:
        while time.monotonic() < deadline and next(budget, None) is not None:
            started = time.perf_counter()
            try:
                response = await client.send(make())
            except httpx.HTTPError:
                phase.errors += 1
                continue
            phase.latencies_ms.append((time.perf_counter() - started) * 1000)
            phase.statuses[response.status_code] = phase.statuses.get(response.status_code, 0) + 1
            if response.status_code == expect:
                phase.done += 1
            else:
                phase.errors += 1

    await asyncio.gather(*(sender() for _ in range(concurrency)))


def measure(
    name: str,
    info: dict[str, Any],
    api_pid: int,
    build: Callable[[httpx.AsyncClient], httpx.Request],
    expect: int,
    total: int,
    options: argparse.Namespace,
) -> Phase:
    async def go() -> Phase:
        limits = httpx.Limits(max_connections=options.concurrency)
        async with httpx.AsyncClient(base_url=info["api_url"], limits=limits, timeout=60) as client:

            def make() -> httpx.Request:
                return build(client)

            await load(client, make, expect, WARM_UP, options.concurrency, 30, Phase("warm-up"))
            phase = Phase(name)
            cpu = tree_cpu_seconds([api_pid])
            started = time.perf_counter()
            await load(client, make, expect, total, options.concurrency, options.time_limit, phase)
            phase.seconds = time.perf_counter() - started
            phase.server_cpu_seconds = tree_cpu_seconds([api_pid]) - cpu
            return phase

    return asyncio.run(go())


def upload(info: dict[str, Any]) -> str:
    headers = {"Authorization": f"Bearer {info['api_key']}"}
    answer = httpx.post(
        f"{info['api_url']}/v1/uploads",
        files={"file": ("portrait.png", PORTRAIT.read_bytes(), "image/png")},
        headers=headers,
        timeout=60,
    )
    return str(answer.raise_for_status().json()["upload_id"])


def run(options: argparse.Namespace) -> dict[str, Any]:
    root = options.root or Path(tempfile.mkdtemp(prefix="kling-bench-api-"))
    # Every waiter of the run belongs to the one development tenant.
    environ = {"TENANT_MAX_WAITERS": str(max(1000, 2 * options.waiters)), **os.environ}
    stack = Stack(root, environ=environ)
    try:
        # The API alone: no worker or beat competing for the cores.
        info = stack.up(apps=False)
        api = stack.start_api("api", int(stack.env["API_PORT"]))
        assert api.pid is not None
        upload_id = upload(info)
        auth = {"Authorization": f"Bearer {info['api_key']}"}
        body = {"upload_id": upload_id, "prompt": "slow push-in, hair in the wind", "duration": 5}

        def healthz(client: httpx.AsyncClient) -> httpx.Request:
            return client.build_request("GET", "/healthz")

        def generation(client: httpx.AsyncClient) -> httpx.Request:
            return client.build_request("POST", "/v1/generations", json=body, headers=auth)

        base = measure("healthz", info, api.pid, healthz, 200, options.baseline_requests, options)
        with pyspy.record({"api": api.pid}, options.profile):
            post = measure("generations", info, api.pid, generation, 201, options.requests, options)
        dsn = stack.direct_env["DATABASE_URL"].replace("+psycopg", "")
        waits = waiting.run(info, dsn, api.pid, upload_id, options) if options.waiters else None
    finally:
        stack.down()
    return {**report(options, base, post), "waiters": waits}


def report(options: argparse.Namespace, base: Phase, post: Phase) -> dict[str, Any]:
    post_figures, base_figures = post.figures(), base.figures()
    ratio = (
        post_figures["requests_per_second"] / base_figures["requests_per_second"]
        if base_figures["requests_per_second"]
        else None
    )
    return {
        "bench": "api",
        "concurrency": options.concurrency,
        "post_generations": post_figures,
        "healthz": base_figures,
        "ratio_rps_post_to_healthz": round(ratio, 4) if ratio is not None else None,
        "ratio_cpu_per_request_post_to_healthz": round(
            post_figures["server_cpu_ms_per_request"]
            / max(0.001, base_figures["server_cpu_ms_per_request"]),
            1,
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--baseline-requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR", help="py-spy, POSTs")
    parser.add_argument("--waiters", type=int, default=1000, help="clients waiting; 0: none")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before jobs move")
    parser.add_argument("--pace", type=float, default=200.0, help="jobs moved a second")
    parser.add_argument("--rounds", type=int, default=2, help="of each way of waiting")
    options = parser.parse_args(argv)
    result = run(options)
    post, base = result["post_generations"], result["healthz"]
    emit(
        result,
        f"| api | POST /v1/generations {post['requests_per_second']} req/s, "
        f"p50 {post['p50_ms']} ms, p99 {post['p99_ms']} ms, "
        f"{post['server_cpu_ms_per_request']} CPU ms/req "
        f"| GET /healthz {base['requests_per_second']} req/s, p50 {base['p50_ms']} ms, "
        f"p99 {base['p99_ms']} ms, {base['server_cpu_ms_per_request']} CPU ms/req "
        f"| x{result['ratio_rps_post_to_healthz']} req/s "
        f"| {post['requests']} + {base['requests']} requests, {options.concurrency} concurrent |",
    )
    waits = result["waiters"]
    if waits:
        held, polled = waits["long_poll"], waits["poll_1s"]
        print(
            f"| api waiters | {held['clients']} long-polls: wake p50 {held['wake_p50_ms']} ms, "
            f"p99 {held['wake_p99_ms']} ms, {held['requests']} requests, "
            f"{held['api_cpu_ms_per_client']} API CPU ms/client, "
            f"+{held['api_rss_growth_mib']} MiB RSS "
            f"| polling 1/s: wake p50 {polled['wake_p50_ms']} ms, p99 {polled['wake_p99_ms']} ms, "
            f"{polled['requests']} requests, {polled['api_cpu_ms_per_client']} API CPU ms/client, "
            f"+{polled['api_rss_growth_mib']} MiB RSS "
            f"| x{waits['ratio_cpu_long_poll_to_poll']} CPU |",
            flush=True,
        )
    if options.profile:
        print(pyspy.summary(options.profile / "api.txt"))
    failed = waits and any(w["errors"] or w["saw_change"] < w["clients"] for w in
                           (waits["long_poll"], waits["poll_1s"]))  # fmt: skip
    return 1 if post["errors"] or base["errors"] or failed else 0


if __name__ == "__main__":
    sys.exit(main())
