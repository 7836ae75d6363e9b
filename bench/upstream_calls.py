"""WaveSpeed requests per completed job for a 120 s inference, with WaveSpeed's webhook arriving
and with polling alone, against the official SDK's one poll a second.

    python -m bench.upstream_calls [--jobs 40] [--inference-seconds 120] [--webhook-drop 0.5]

One embedded stack (API, one worker with two processes on every queue, beat; the production
cadence and an adaptive schedule for the inference time: first check at 110 s, then 5 s growing
1.5x to 30 s; `--first-poll-seconds` moves the first check, for a what-if) in front of a
counting simulator (`bench.counting_simulator`, 1080p outputs: `--render-mode`). Both cases
run in the same minutes: the simulator drops the webhook of a seeded random half of the predictions
(`webhook_drop`), which for those jobs is exactly "webhooks off" (the product never hears from
WaveSpeed and has only its polls), and every job is then put in the group its ledger entry shows
(webhook delivered, or dropped). Jobs are created through the HTTP API (`POST /v1/uploads` once,
then `POST /v1/generations` with the `upload_id`).

The SDK baseline is computed, not run: `Client.run()` submits once and polls every second, so
1 + inference_seconds calls (`bench.inflight` runs the real SDK and counts 121 for 120 s).
Also reported: how long after WaveSpeed finished the job left `processing` (detection delay).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import jobs as job_store
from bench.counting_simulator import CountingSimulator
from bench.harness import OUTPUT_RENDER_MODE, PRODUCTION_CADENCE, emit, percentile, poll_schedule
from sandbox.stack import Stack

PORTRAIT = Path(__file__).resolve().parent.parent / "examples" / "portrait.png"


@dataclass
class Options:
    jobs: int = 40
    inference_seconds: float = 120.0
    webhook_drop: float = 0.5
    # 0: the schedule's own (110 s for 120 s); a what-if for a webhook-first schedule otherwise.
    first_poll_seconds: float = 0.0
    seed: int = 7
    timeout: float = 600.0
    render_mode: str = OUTPUT_RENDER_MODE
    root: Path | None = None


def create_jobs(info: dict[str, Any], count: int) -> list[str]:
    headers = {"Authorization": f"Bearer {info['api_key']}"}
    with httpx.Client(base_url=info["api_url"], headers=headers, timeout=60) as api:
        upload = api.post("/v1/uploads", files={"file": ("p.png", PORTRAIT.read_bytes())})
        upload_id = upload.raise_for_status().json()["upload_id"]

        def create(i: int) -> str:
            body = {"upload_id": upload_id, "prompt": f"slow push-in, take {i}", "duration": 5}
            return str(api.post("/v1/generations", json=body).raise_for_status().json()["id"])

        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(create, range(count)))


def wait_terminal(dsn: str, count: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        statuses = job_store.status_counts(dsn)
        if statuses["completed"] + statuses["failed"] >= count:
            return
        time.sleep(2)


def webhook_delivered(entry: dict[str, Any]) -> bool:
    return any(
        a["status_code"] is not None and 200 <= a["status_code"] < 300
        for a in entry["webhook_attempts"]
    )


def group_stats(
    entries: list[dict[str, Any]], polls: dict[str, int], rows: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Calls per completed job (1 submit + its /result polls) and the detection delay."""
    done = [e for e in entries if rows.get(e["id"], {}).get("status") == "completed"]
    calls = [1 + polls.get(e["id"], 0) for e in done]
    delays = job_store.detection_delays(done, rows)
    return {
        "jobs": len(done),
        "calls_per_job_mean": round(sum(calls) / len(calls), 2) if calls else None,
        "calls_per_job_max": max(calls, default=None),
        "detection_delay_p50_s": round(percentile(delays, 0.5), 2),
        "detection_delay_max_s": round(max(delays, default=0.0), 2),
    }


def run(options: Options) -> dict[str, Any]:
    root = options.root or Path(tempfile.mkdtemp(prefix="kling-bench-upstream-"))
    (root / "logs").mkdir(parents=True, exist_ok=True)
    sim_args = [
        "--render-mode",
        options.render_mode,
        "--inference-seconds",
        str(options.inference_seconds),
    ]
    simulator = CountingSimulator(root / "logs" / "simulator.log", sim_args).start()
    gate = str(max(options.jobs, 1))
    environ = {
        **os.environ, **simulator.env, **PRODUCTION_CADENCE,
        **poll_schedule(options.inference_seconds, options.first_poll_seconds),
        "MAX_IN_FLIGHT": gate, "SUBMITS_PER_MINUTE": gate,
    }  # fmt: skip
    stack = Stack(root, environ=environ, worker_concurrency=2)
    try:
        info = stack.up()
        simulator.set_faults(webhook_drop=options.webhook_drop, seed=options.seed)
        started = time.monotonic()
        create_jobs(info, options.jobs)
        dsn = job_store.plain_dsn(stack.env["DATABASE_URL"])
        wait_terminal(dsn, options.jobs, started + options.timeout)
        seconds = time.monotonic() - started
        return report(options, simulator, dsn, seconds)
    finally:
        stack.down()
        simulator.stop()


def report(
    options: Options, simulator: CountingSimulator, dsn: str, seconds: float
) -> dict[str, Any]:
    counts = simulator.counts()
    polls = counts["result_by_prediction"]
    entries = simulator.ledger()["predictions"]
    rows = job_store.by_prediction(dsn)
    pushed = group_stats([e for e in entries if webhook_delivered(e)], polls, rows)
    polled = group_stats([e for e in entries if not webhook_delivered(e)], polls, rows)
    sdk = 1 + options.inference_seconds
    by_kind = counts["by_kind"]
    return {
        "bench": "upstream_calls",
        "jobs": options.jobs,
        "inference_seconds": options.inference_seconds,
        "first_poll_seconds": options.first_poll_seconds or None,
        "seconds": round(seconds, 1),
        "predictions": len(entries),
        "jobs_completed": pushed["jobs"] + polled["jobs"],
        "wavespeed_calls": by_kind,
        "all_calls_per_completed_job": round(
            (by_kind.get("submit", 0) + by_kind.get("result", 0) + by_kind.get("history", 0))
            / max(1, pushed["jobs"] + polled["jobs"]),
            2,
        ),
        "webhook": pushed,
        "polling_only": polled,
        "sdk_calls_per_job": sdk,
        "ratio_webhook_to_sdk": _ratio(pushed["calls_per_job_mean"], sdk),
        "ratio_polling_to_sdk": _ratio(polled["calls_per_job_mean"], sdk),
    }


def _ratio(value: float | None, baseline: float) -> float | None:
    return round(value / baseline, 4) if value is not None else None


def parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream_calls", description=__doc__)
    for name, value in vars(Options()).items():
        kind = Path if name == "root" else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    return Options(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    """Measure and print; exit 1 if a job did not complete or a group came out empty."""
    options = parse(argv)
    result = run(options)
    pushed, polled = result["webhook"], result["polling_only"]
    emit(
        result,
        f"| upstream_calls | webhook: {pushed['calls_per_job_mean']} calls/job "
        f"(n={pushed['jobs']}, detected +{pushed['detection_delay_p50_s']} s p50); "
        f"polling only: {polled['calls_per_job_mean']} calls/job (n={polled['jobs']}, "
        f"+{polled['detection_delay_p50_s']} s p50) "
        f"| SDK run(): {result['sdk_calls_per_job']:g} calls/job (computed) "
        f"| x{result['ratio_webhook_to_sdk']} / x{result['ratio_polling_to_sdk']} "
        f"| {options.jobs} jobs, {options.inference_seconds:g} s inference, first poll at "
        f"{options.first_poll_seconds or round(options.inference_seconds * 110 / 120, 1):g} s |",
    )
    ok = result["jobs_completed"] == options.jobs and pushed["jobs"] and polled["jobs"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
