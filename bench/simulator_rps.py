"""How many submit+result pairs a second the WaveSpeed simulator answers over loopback.

    python -m bench.simulator_rps [--pairs 1000] [--concurrency 8] [--baseline-requests 2000]

Starts the simulator as its own process (placeholder render, zero inference, as a load test
would run it), measures `GET /_sim/health` requests a second through the same clients as the
baseline, then submit+result pairs a second, and prints one JSON line and one markdown row.
Every phase is bounded by a request count and a time limit.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx

from sandbox.wavespeed.config import DEFAULT_API_KEY, MODEL_ID
from sandbox.wavespeed.testing import sample_image

STARTUP_SECONDS = 20.0
# A few pairs first, so connection set-up and the first placeholder encode are not measured.
WARM_UP_SECONDS = 5.0


@dataclass
class Phase:
    """What one measured phase did."""

    done: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def per_second(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float:
        if len(self.latencies_ms) < 2:
            return self.latencies_ms[0] if self.latencies_ms else 0.0
        return statistics.quantiles(self.latencies_ms, n=100)[round(fraction * 100) - 1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def simulator_process() -> Iterator[str]:
    """A placeholder-mode simulator in its own process, so it does not share our GIL."""
    port = _free_port()
    argv = [
        sys.executable, "-m", "sandbox.wavespeed", "--port", str(port),
        "--render-mode", "placeholder", "--inference-seconds", "0", "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, process)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


def _wait_healthy(base: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the simulator exited during start-up")
        try:
            if httpx.get(f"{base}/_sim/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("the simulator did not become healthy")


def run_phase(
    clients: list[httpx.Client], total: int, time_limit: float, unit: Callable[[httpx.Client], None]
) -> Phase:
    """Run `unit` `total` times spread over one thread per client, stopping at `time_limit`."""
    phase = Phase()
    counter = iter(range(total))
    deadline = time.monotonic() + time_limit

    def worker(client: httpx.Client) -> None:
        while time.monotonic() < deadline:
            with phase.lock:
                if next(counter, None) is None:
                    return
            started = time.perf_counter()
            try:
                unit(client)
            except (httpx.HTTPError, KeyError, ValueError):
                with phase.lock:
                    phase.errors += 1
                continue
            elapsed_ms = (time.perf_counter() - started) * 1000
            with phase.lock:
                phase.done += 1
                phase.latencies_ms.append(elapsed_ms)

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    phase.seconds = time.perf_counter() - started
    return phase


def health(client: httpx.Client) -> None:
    """The baseline unit: the cheapest request the simulator answers."""
    client.get("/_sim/health").raise_for_status()


def submit_and_result(image_url: str) -> Callable[[httpx.Client], None]:
    """The measured unit: one submit, then one poll of its result."""

    def unit(client: httpx.Client) -> None:
        body = {"image": image_url, "prompt": "slow push-in", "duration": 5}
        answer = client.post(f"/api/v3/{MODEL_ID}", json=body).raise_for_status().json()
        prediction_id = answer["data"]["id"]
        client.get(f"/api/v3/predictions/{prediction_id}/result").raise_for_status()

    return unit


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.simulator_rps", description=__doc__)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--baseline-requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=15.0, help="seconds per phase")
    return parser.parse_args(argv)


def report(args: argparse.Namespace, baseline: Phase, pairs: Phase) -> dict[str, object]:
    """The one-line JSON result."""
    ratio = pairs.per_second / baseline.per_second if baseline.per_second else 0.0
    return {
        "bench": "simulator_rps",
        "concurrency": args.concurrency,
        "pairs": pairs.done,
        "pair_errors": pairs.errors,
        "pairs_per_second": round(pairs.per_second, 1),
        "pair_p50_ms": round(pairs.percentile(0.50), 2),
        "pair_p95_ms": round(pairs.percentile(0.95), 2),
        "baseline_requests": baseline.done,
        "baseline_requests_per_second": round(baseline.per_second, 1),
        "ratio_pairs_to_baseline": round(ratio, 3),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure and print; exit 1 if any request failed."""
    args = parse_args(argv)
    headers = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
    with simulator_process() as base:
        clients = [
            httpx.Client(base_url=base, headers=headers, timeout=10)
            for _ in range(args.concurrency)
        ]
        try:
            upload = clients[0].post(
                "/api/v3/media/upload/binary", files={"file": ("bench.png", sample_image(320, 320))}
            )
            image_url = upload.raise_for_status().json()["data"]["download_url"]
            run_phase(clients, 50, WARM_UP_SECONDS, submit_and_result(image_url))
            baseline = run_phase(clients, args.baseline_requests, args.time_limit, health)
            pairs = run_phase(clients, args.pairs, args.time_limit, submit_and_result(image_url))
        finally:
            for client in clients:
                client.close()
    result = report(args, baseline, pairs)
    print(json.dumps(result))
    print(
        f"| simulator submit+result | {result['pairs_per_second']} pairs/s "
        f"| baseline GET /_sim/health {result['baseline_requests_per_second']} req/s "
        f"| ratio {result['ratio_pairs_to_baseline']} "
        f"| p50 {result['pair_p50_ms']} ms, p95 {result['pair_p95_ms']} ms |"
    )
    return 1 if pairs.errors or baseline.errors else 0


if __name__ == "__main__":
    sys.exit(main())
