"""The chaos run: N jobs through the embedded stack under a hostile WaveSpeed, while worker
processes are SIGKILLed, Redis is flushed and restarted and PostgreSQL is restarted, and
producers cancel jobs and let deadlines pass. Then the invariants of DESIGN.md are checked,
one line each; the exit status is non-zero if any broke.

    python -m bench.chaos [--jobs 300] [--workers 2] [--kills 6] [--flushes 2] ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
import psycopg
import redis
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from bench.broker_producer import BrokerProducer, jobs_per_request
from sandbox.processes import Process
from sandbox.receiver import Receiver, flaky, serve
from sandbox.stack import Stack
from workers.errors import ErrorCode

FAULTS: dict[str, Any] = {
    "submit_500": 0.05,
    "submit_429": 0.05,
    "submit_drop_after_create": 0.05,
    "result_500": 0.05,
    "result_429": 0.05,
    "task_fail": {"5000": 0.03, "1403": 0.02},
    "webhook_drop": 0.3,
    "webhook_duplicate": 0.3,
    "output_truncate": 0.05,
    "inference_seconds": [2, 8],
}
# A fraction of callback attempts the producer's endpoint answers with HTTP 500.
CALLBACK_FAILURE_RATE = 0.2
MOVES = ["slow push-in", "pull-out", "pan left", "pan right", "tilt up", "tilt down", "orbit"]
TERMINAL = ("completed", "failed", "cancelled", "expired")


@dataclass
class Options:
    jobs: int = 300
    workers: int = 2
    concurrency: int = 2
    kills: int = 6
    flushes: int = 2
    redis_restarts: int = 1
    postgres_restarts: int = 1
    # Jobs the producer cancels at random moments, wherever they are by then.
    cancels: int = 40
    # Failed or cancelled jobs the producer retries once they ended (their retries are jobs
    # like the others, checked with them).
    retries: int = 10
    # Requests a Celery producer sends onto the broker meanwhile (`generation.request`).
    broker_requests: int = 60
    chaos_seconds: float = 60.0
    timeout: float = 900.0
    seed: int = 7
    root: Path | None = None


@dataclass
class Result:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


@dataclass
class Run:
    options: Options
    stack: Stack
    receiver: Receiver
    workers: list[Process] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f}s] {message}"
        self.events.append(line)
        print(line, flush=True)


def run(options: Options) -> list[Result]:
    """Start a stack, run the jobs through chaos, check the invariants, stop the stack."""
    root = options.root or Path(tempfile.mkdtemp(prefix="kling-chaos-"))
    simulator_args = ["--render-mode", "real", "--resolution", "160x96"]
    simulator_args += ["--refund-delay-seconds", "1"]
    # Callbacks retry on a compressed schedule so the run sees several attempts per job.
    environ = {**os.environ, "CALLBACK_SCHEDULE_SECONDS": "[0, 1, 2, 4, 8, 8, 8, 8, 8, 8]"}
    stack = Stack(root, environ=environ, worker_concurrency=options.concurrency,
                  simulator_args=simulator_args)  # fmt: skip
    receiver = Receiver(status_for=flaky(CALLBACK_FAILURE_RATE, options.seed))
    stack.up()
    chaos = Run(options, stack, receiver)
    try:
        with serve(receiver):
            return _run(chaos)
    finally:
        stack.down()


def _run(chaos: Run) -> list[Result]:
    options, stack = chaos.options, chaos.stack
    simulator = stack.direct_env["WAVESPEED_BASE_URL"]
    chaos.workers = [p for p in stack.apps if p.name == "worker"]
    for n in range(1, options.workers):
        chaos.workers.append(stack.start_worker(f"worker{n}", concurrency=options.concurrency))
    httpx.put(f"{simulator}/_sim/faults", json=FAULTS).raise_for_status()
    job_ids = chaos.job_ids = submit_jobs(chaos)
    with httpx.Client(base_url=stack.info["api_url"], headers=_auth(chaos), timeout=60) as api:
        producer = broker_producer(chaos, api)
        producer.start(options.chaos_seconds / 2)
        unleash(chaos, random.Random(options.seed))
        wait_terminal(chaos, job_ids)
        producer.resend_missing(timeout=300)
        broker_jobs = producer.job_ids()
        chaos.log(f"broker requests: {producer.sent} sent, {producer.resent} sent again after "
                  f"their message was lost, {len(broker_jobs)} accepted")  # fmt: skip
        job_ids += broker_jobs
        wait_terminal(chaos, job_ids)
        job_ids += retry_jobs(chaos, job_ids)
        wait_terminal(chaos, job_ids)
        httpx.delete(f"{simulator}/_sim/faults").raise_for_status()
        settle_ledger(chaos)
        settle_callbacks(chaos, job_ids)
        settle_replies(chaos, producer)
        producer.stop()
        return [*check(chaos, job_ids), *check_broker(chaos, producer)]


def _auth(chaos: Run) -> dict[str, str]:
    return {"Authorization": f"Bearer {chaos.stack.info['api_key']}"}


def broker_producer(chaos: Run, api: httpx.Client) -> BrokerProducer:
    image = (Path(__file__).resolve().parent.parent / "examples" / "portrait.png").read_bytes()
    upload = api.post("/v1/uploads", files={"file": ("p.png", image, "image/png")})
    return BrokerProducer(
        chaos.stack.direct_env["REDIS_URL"], api, chaos.stack.info["api_key"],
        upload.raise_for_status().json()["upload_id"], chaos.receiver.url,
        chaos.options.broker_requests,
    )  # fmt: skip


def _missing_replies(chaos: Run, producer: BrokerProducer) -> list[str]:
    """Requests whose end has not come back as a reply (nor its refusal)."""
    outcomes = producer.outcomes()
    accepted = {r: str(o["job_id"]) for r, o in outcomes.items() if o and o.get("job_id")}
    rows = job_rows(chaos, list(accepted.values()))
    missing = []
    for request_id, found in outcomes.items():
        if found is None:
            missing.append(request_id)
            continue
        job = rows.get(accepted.get(request_id, ""))
        wanted = f"generation.{job['status']}" if job else "generation.refused"
        if wanted not in producer.replies.get(request_id, {}):
            missing.append(request_id)
    return missing


def settle_replies(chaos: Run, producer: BrokerProducer) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _missing_replies(chaos, producer):
        time.sleep(1)


def check_broker(chaos: Run, producer: BrokerProducer) -> list[Result]:
    outcomes = producer.outcomes()
    taken = sum(1 for found in outcomes.values() if found is not None)
    dsn = chaos.stack.direct_env["DATABASE_URL"].replace("+psycopg", "")
    per_request = jobs_per_request(dsn)
    doubled = {r: n for r, n in per_request.items() if n > 1}
    missing = _missing_replies(chaos, producer)
    repeats = sum(len(ids) - 1 for by in producer.replies.values() for ids in by.values())
    return [
        Result(
            "every broker request was taken once, and none became two jobs",
            taken == len(outcomes) and not doubled,
            f"requests={len(outcomes)}, taken={taken}, jobs={sum(per_request.values())}, "
            f"sent again={producer.resent}, doubled={doubled or 'none'}",
        ),
        Result(
            "every broker request's end came back as a reply",
            not missing,
            f"missing={missing[:5] or 'none'}, replies={sum(map(len, producer.replies.values()))}"
            f", the same event more than once={repeats}",
        ),
    ]


def submit_jobs(chaos: Run) -> list[str]:
    info = chaos.stack.info
    headers = {"Authorization": f"Bearer {info['api_key']}"}
    image = (Path(__file__).resolve().parent.parent / "examples" / "portrait.png").read_bytes()
    with httpx.Client(base_url=info["api_url"], headers=headers, timeout=60) as api:
        upload = api.post("/v1/uploads", files={"file": ("p.png", image, "image/png")})
        upload_id = upload.raise_for_status().json()["upload_id"]

        def create(i: int) -> str:
            body = {
                "upload_id": upload_id,
                "prompt": f"{MOVES[i % len(MOVES)]}, take {i}",
                "guidance_scale": round((i % 97) / 96, 3),
                "duration": 5,
                "webhook_url": chaos.receiver.url,
                "priority": ("high", "normal", "low")[i % 3],
            }
            if i % 7 == 3:  # a deadline some of them miss, under these faults
                body["deadline_within_seconds"] = 4 + (i % 5) * 3
            return str(api.post("/v1/generations", json=body).raise_for_status().json()["id"])

        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(create, range(chaos.options.jobs)))
    chaos.log(f"submitted {len(ids)} jobs")
    return ids


def unleash(chaos: Run, rng: random.Random) -> None:
    """Run the chaos events at random moments over `chaos_seconds`."""
    options = chaos.options
    events = (
        ["kill"] * options.kills
        + ["flush"] * options.flushes
        + ["restart-redis"] * options.redis_restarts
        + ["restart-postgres"] * options.postgres_restarts
        + ["cancel"] * options.cancels
    )
    moments = sorted(rng.uniform(0, options.chaos_seconds) for _ in events)
    rng.shuffle(events)
    begin = time.monotonic()
    for moment, event in zip(moments, events, strict=True):
        time.sleep(max(0.0, begin + moment - time.monotonic()))
        {"kill": kill_worker, "flush": flush_redis, "restart-redis": restart_redis,
         "restart-postgres": restart_postgres, "cancel": cancel_job}[event](chaos, rng)  # fmt: skip


def retry_jobs(chaos: Run, job_ids: list[str]) -> list[str]:
    """The producer retries some of the jobs that did not complete: new jobs, same inputs."""
    info = chaos.stack.info
    headers = {"Authorization": f"Bearer {info['api_key']}"}
    ended = [row["id"] for row in job_rows(chaos, job_ids).values()
             if row["status"] in ("failed", "cancelled")]  # fmt: skip
    made = []
    with httpx.Client(base_url=info["api_url"], headers=headers, timeout=60) as api:
        for job_id in sorted(ended)[: chaos.options.retries]:
            answer = api.post(f"/v1/generations/{job_id}/retry")
            if answer.status_code == 201:
                made.append(str(answer.json()["id"]))
            else:
                chaos.log(f"retry of {job_id} answered {answer.status_code}: {answer.text}")
    chaos.log(f"retried {len(made)} of {len(ended)} jobs that did not complete")
    return made


def cancel_job(chaos: Run, rng: random.Random) -> None:
    """The producer cancels one of its jobs, wherever it is by now (a finished one stays)."""
    job_id = rng.choice(chaos.job_ids)
    info = chaos.stack.info
    headers = {"Authorization": f"Bearer {info['api_key']}"}
    try:
        answer = httpx.post(
            f"{info['api_url']}/v1/generations/{job_id}/cancel", headers=headers, timeout=30
        )
    except httpx.HTTPError as exc:  # the API's database may be restarting right now
        chaos.log(f"cancel of {job_id} got no answer: {exc!r}")
        return
    if answer.status_code != 200:
        chaos.log(f"cancel of {job_id} answered {answer.status_code}")


def kill_worker(chaos: Run, rng: random.Random) -> None:
    victim = rng.choice(chaos.workers)
    victim.send(signal.SIGKILL)  # the whole group: the parent and its pool processes
    if victim.popen is not None:
        victim.popen.wait(10)
    chaos.log(f"SIGKILLed {victim.name} (pid {victim.pid})")
    chaos.stack.apps.remove(victim)
    chaos.workers.remove(victim)
    replacement = chaos.stack.start_worker(victim.name, concurrency=chaos.options.concurrency)
    chaos.workers.append(replacement)
    chaos.log(f"restarted {victim.name} (pid {replacement.pid})")


def flush_redis(chaos: Run, _: random.Random) -> None:
    redis.Redis.from_url(chaos.stack.direct_env["REDIS_URL"]).flushall()
    chaos.log("FLUSHALL on Redis")


def restart_redis(chaos: Run, _: random.Random) -> None:
    server = chaos.stack.redis
    if server is None:
        chaos.log("Redis is external: restart skipped")
        return
    server.stop()
    server.start()  # same port, empty (no persistence): every queued message is gone
    chaos.log("restarted Redis")


def restart_postgres(chaos: Run, _: random.Random) -> None:
    server = chaos.stack.postgres
    if server is None:
        chaos.log("PostgreSQL is external: restart skipped")
        return
    server.stop()
    server.start()
    chaos.log("restarted PostgreSQL")


def job_rows(chaos: Run, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    dsn = chaos.stack.direct_env["DATABASE_URL"].replace("+psycopg", "")
    with psycopg.connect(dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            "SELECT id::text, status, prediction_id, s3_key, sha256, error_code, webhook_url,"
            " charged, status IN ('cancelled', 'failed') AND due_at IS NOT NULL AS withdrawing"
            " FROM jobs WHERE id = ANY(%s::uuid[])",
            (job_ids,),
        )
        return {row["id"]: row for row in cur.fetchall()}


def wait_terminal(chaos: Run, job_ids: list[str]) -> None:
    """Until every job has ended and every stopped job's prediction is deleted upstream."""
    deadline = time.monotonic() + chaos.options.timeout
    last = None
    while time.monotonic() < deadline:
        rows = job_rows(chaos, job_ids).values()
        counts = Counter(row["status"] for row in rows)
        counts["withdrawing"] = sum(row["withdrawing"] for row in rows)
        if counts != last:
            chaos.log(f"jobs: {_tally(counts)}")
            last = counts
        if sum(counts[s] for s in TERMINAL) == len(job_ids) and not counts["withdrawing"]:
            return
        time.sleep(2)
    chaos.log("timed out waiting for every job to end")


def ledger(chaos: Run) -> dict[str, Any]:
    url = f"{chaos.stack.direct_env['WAVESPEED_BASE_URL']}/_sim/ledger"
    return dict(httpx.get(url, timeout=60).raise_for_status().json())


def settle_ledger(chaos: Run) -> None:
    """Let WaveSpeed's side finish: predictions still running, refunds still due."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        entries = ledger(chaos)["predictions"]
        running = [p for p in entries if p["status"] not in ("completed", "failed", "deleted")]
        unrefunded = [p for p in entries if p["status"] == "failed" and not p["refunded_usd"]]
        if not running and not unrefunded:
            return
        time.sleep(1)


def settle_callbacks(chaos: Run, job_ids: list[str]) -> None:
    """Wait for every terminal job's callback to have been answered 2xx once."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _missing_callbacks(chaos, job_ids):
        time.sleep(1)


def _verified_callbacks(chaos: Run) -> dict[str, set[str]]:
    """Job id -> event types of the callbacks that verified and were answered 2xx."""
    secret = chaos.stack.info["webhook_secret"]
    verified: dict[str, set[str]] = {}
    for item in list(chaos.receiver.received):
        try:
            event = Webhook(secret).verify(item.body, item.headers)
        except WebhookVerificationError:
            continue
        if item.status < 300:
            verified.setdefault(event["data"]["id"], set()).add(event["type"])
    return verified


def _missing_callbacks(chaos: Run, job_ids: list[str]) -> list[str]:
    rows = job_rows(chaos, job_ids)
    verified = _verified_callbacks(chaos)
    return [
        job_id
        for job_id, row in rows.items()
        if row["status"] in TERMINAL
        and f"generation.{row['status']}" not in verified.get(job_id, set())
    ]


def check(chaos: Run, job_ids: list[str]) -> list[Result]:
    rows = job_rows(chaos, job_ids)
    book = ledger(chaos)
    entries = book["predictions"]
    chaos.log(f"faults fired: {json.dumps(book.get('faults_fired', {}), sort_keys=True)}")
    return [
        check_nothing_lost(rows, job_ids),
        check_charges(rows, entries),
        check_charged(rows, entries),
        check_withdrawn(rows, entries),
        check_objects(chaos, rows, entries),
        check_error_codes(rows),
        check_callbacks(chaos, job_ids),
    ]


def check_nothing_lost(rows: dict[str, dict[str, Any]], job_ids: list[str]) -> Result:
    statuses = Counter(rows[i]["status"] if i in rows else "missing" for i in job_ids)
    lost = sum(n for status, n in statuses.items() if status not in TERMINAL)
    detail = f"lost={lost} of {len(job_ids)} ({_tally(statuses)})"
    return Result("every job reached a terminal state", lost == 0, detail)


def _owner(entry: dict[str, Any], rows: dict[str, dict[str, Any]]) -> str | None:
    image = str((entry.get("input") or {}).get("image", ""))
    marker = image.split("inputs/", 1)[1].split("/", 1)[0] if "inputs/" in image else None
    return marker if marker in rows else None


def _net_charges(rows: dict[str, dict[str, Any]], entries: list[dict[str, Any]]) -> Counter[str]:
    """Job id -> its predictions still charged after refunds."""
    net: Counter[str] = Counter()
    for entry in entries:
        owner = _owner(entry, rows)
        if owner is not None and entry["charge_usd"] - entry["refunded_usd"] > 0:
            net[owner] += 1
    return net


def check_charges(rows: dict[str, dict[str, Any]], entries: list[dict[str, Any]]) -> Result:
    """Net charges (charged minus refunded) per job: at most one, and every job whose
    prediction succeeded upstream has it."""
    net = _net_charges(rows, entries)
    needed = {owner for e in entries if e["status"] == "completed" and (owner := _owner(e, rows))}
    doubles = [job for job, n in net.items() if n > 1]
    unpaid = [job for job in needed if not net[job]]
    ok = not doubles and not unpaid
    detail = (
        f"charged net of refunds={sum(net.values())}, completed upstream={len(needed)}, "
        f"double-charged jobs={len(doubles)}"
    )
    return Result("no double charge", ok, detail)


def check_charged(rows: dict[str, dict[str, Any]], entries: list[dict[str, Any]]) -> Result:
    """Every record's `charged` is what the ledger shows: true is one net charge, false is
    none, unknown may be either (WaveSpeed documents no refund rule for a deleted task)."""
    net = _net_charges(rows, entries)
    said = Counter({True: 0, False: 0, None: 0})
    wrong = []
    for job_id, row in rows.items():
        said[row["charged"]] += 1
        if row["charged"] is not None and net[job_id] != int(row["charged"]):
            wrong.append(job_id)
        if row["status"] == "completed" and row["charged"] is not True:
            wrong.append(job_id)
    detail = (
        f"true={said[True]}, false={said[False]}, unknown={said[None]}, "
        f"disagreeing with the ledger={len(wrong)}"
    )
    return Result("every job's charged agrees with the ledger", not wrong, detail)


def check_withdrawn(rows: dict[str, dict[str, Any]], entries: list[dict[str, Any]]) -> Result:
    """Every job stopped while its prediction was at WaveSpeed (cancelled, or past its
    deadline) had that prediction deleted there."""
    status = {entry["id"]: entry["status"] for entry in entries}
    stopped = [
        row for row in rows.values()
        if row["prediction_id"]
        and (row["status"] == "cancelled" or row["error_code"] == ErrorCode.DEADLINE_EXCEEDED)
    ]  # fmt: skip
    left = [row["id"] for row in stopped if status.get(row["prediction_id"]) != "deleted"]
    detail = f"stopped at WaveSpeed={len(stopped)}, predictions not deleted={len(left)}"
    return Result("every stopped job's prediction was deleted upstream", not left, detail)


def check_objects(
    chaos: Run, rows: dict[str, dict[str, Any]], entries: list[dict[str, Any]]
) -> Result:
    env = chaos.stack.direct_env
    s3 = boto3.client(
        "s3",
        endpoint_url=env["S3_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    bucket = env.get("S3_BUCKET", "kling")
    keys = [
        obj["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="videos/")
        for obj in page.get("Contents", [])
    ]
    outputs = {entry["id"]: entry["output_sha256"] for entry in entries}
    completed = [row for row in rows.values() if row["status"] == "completed"]
    bad = []
    for row in completed:
        body = s3.get_object(Bucket=bucket, Key=row["s3_key"])["Body"].read()
        digest = hashlib.sha256(body).hexdigest()
        if not (digest == row["sha256"] == outputs.get(row["prediction_id"])):
            bad.append(row["id"])
    s3.close()
    expected = {f"videos/{row['id']}.mp4" for row in completed}
    extra = set(keys) - expected
    ok = not bad and len(keys) == len(set(keys)) and not extra and expected <= set(keys)
    detail = (
        f"completed={len(completed)}, objects={len(keys)}, sha256 mismatches={len(bad)}, "
        f"objects without a completed job={len(extra)}"
    )
    return Result("every completed job's object matches the simulator's output", ok, detail)


def check_error_codes(rows: dict[str, dict[str, Any]]) -> Result:
    documented = {code.value for code in ErrorCode}
    failed = [row for row in rows.values() if row["status"] == "failed"]
    codes = Counter(row["error_code"] for row in failed)
    undocumented = [code for code in codes if code not in documented]
    detail = (
        f"failed={len(failed)} ({', '.join(f'{k}={v}' for k, v in sorted(codes.items(), key=str))})"
    )
    return Result("every failed job carries a documented error code", not undocumented, detail)


def _tally(counts: Counter[Any]) -> str:
    return ", ".join(f"{key}={n}" for key, n in sorted(counts.items(), key=str))


def check_callbacks(chaos: Run, job_ids: list[str]) -> Result:
    missing = _missing_callbacks(chaos, job_ids)
    received = chaos.receiver.received
    failed = sum(1 for item in received if item.status >= 300)
    detail = (
        f"missing={len(missing)}, attempts received={len(received)} "
        f"({failed} answered 500 on purpose)"
    )
    return Result("every terminal job's callback arrived and verifies", not missing, detail)


def parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    defaults = Options()
    for name, value in vars(defaults).items():
        if name == "root":
            parser.add_argument("--root", type=Path, default=None)
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return Options(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    started = time.monotonic()
    results = run(options)
    print()
    for result in results:
        print(result.line())
    elapsed = time.monotonic() - started
    summary = {
        "jobs": options.jobs,
        "seconds": round(elapsed, 1),
        "passed": all(r.ok for r in results),
    }
    print(json.dumps(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
