"""The fault run: outages that last minutes and hostile callers, against the embedded stack
with TCP fault proxies in front of Redis, PostgreSQL, S3 and WaveSpeed. Then the invariants of
`make chaos` are checked (nothing lost, nothing paid twice, every object matching, every
failure coded, every callback delivered), with what each phase promises on top; one line each,
and a non-zero exit status if any broke.

    python -m bench.faults [--outage-seconds 120] [--jobs 12] ...

Phases, one after the other, each outage `--outage-seconds` long:
- broker-cut: Redis black-holed while producers POST (answers bounded, 201 only for jobs made);
- s3-cut: S3 black-holed while finished videos are being copied;
- history-down: WaveSpeed drops submit answers and its history answers 500;
- result-404: `/result` answers 404 for ever for the phase's predictions (WaveSpeed's webhook
  off);
- cdn-404: the CDN answers 404 just after completion;
- wavespeed-cut-cancel: WaveSpeed black-holed while the producer cancels jobs running there;
- receiver-blackhole: one tenant's callback receiver black-holed, another tenant's healthy;
- host-cut: one of two worker hosts cut off from Redis and PostgreSQL, then let back in;
- hostile: the corpus of `bench.hostile` (bombs, NaN, oversized bodies, bad signatures);
- load: one key far over its rate limit while another key works.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from standardwebhooks.webhooks import Webhook

from bench import hostile
from bench.chaos import (
    TERMINAL,
    Result,
    Run,
    check_charged,
    check_charges,
    check_error_codes,
    check_nothing_lost,
    check_objects,
    check_withdrawn,
    job_rows,
    ledger,
    settle_ledger,
)
from sandbox.faultproxy import ProxyHandle, ProxyThread
from sandbox.receiver import Received, Receiver, flaky, serve
from sandbox.stack import Stack

IMAGE = (Path(__file__).resolve().parent.parent / "examples" / "portrait.png").read_bytes()
PROMPT = "slow push-in, hair moving in the wind"
# Standard Webhooks' freshness window for a callback's timestamp.
TOLERANCE_SECONDS = 300
# What a producer accepts as "answered in a few seconds" while a dependency is gone.
ANSWER_BOUND_SECONDS = 15.0
# A healthy tenant's callbacks while another's receiver black-holes: at most this late.
HEALTHY_CALLBACK_P99_SECONDS = 10.0


@dataclass
class Options:
    outage_seconds: float = 120.0
    jobs: int = 12  # per phase that runs jobs
    inference_seconds: float = 4.0
    timeout: float = 1800.0
    root: Path | None = None


@dataclass
class Tenant:
    name: str
    key: str
    secret: str
    receiver: Receiver


@dataclass
class Faults:
    options: Options
    stack: Stack
    run: Run  # the chaos run's shape: its checks read jobs, the ledger and S3 from it
    tenants: dict[str, Tenant] = field(default_factory=dict)
    host_b: dict[str, ProxyHandle] = field(default_factory=dict)
    # In front of the black-holed tenant's callback receiver.
    receiver_proxy: ProxyHandle | None = None
    jobs: dict[str, str] = field(default_factory=dict)  # job id -> tenant name
    results: list[Result] = field(default_factory=list)

    def log(self, message: str) -> None:
        self.run.log(message)

    def api(self, tenant: str = "main", timeout: float = 60) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tenants[tenant].key}"}
        return httpx.Client(base_url=self.stack.info["api_url"], headers=headers, timeout=timeout)

    def sim(self, method: str, path: str, **kwargs: Any) -> None:
        url = f"{self.stack.direct_env['WAVESPEED_BASE_URL']}{path}"
        httpx.request(method, url, timeout=30, **kwargs).raise_for_status()

    def faults(self, **knobs: Any) -> None:
        """Replace the simulator's fault profile (inference time always set)."""
        inference = [self.options.inference_seconds, self.options.inference_seconds]
        knobs.setdefault("inference_seconds", inference)
        self.sim("PUT", "/_sim/faults", json=knobs)

    def create(self, count: int, tenant: str = "main", **body: Any) -> list[str]:
        """`count` jobs of `tenant`, with its receiver as callback URL."""
        receiver = self.tenants[tenant].receiver
        with self.api(tenant) as client:
            made = [
                client.post(
                    "/v1/generations",
                    json={
                        "upload_id": self.upload(client),
                        "prompt": f"{PROMPT} {n}",
                        "webhook_url": receiver.url,
                        **body,
                    },
                )
                for n in range(count)
            ]
        ids = [answer.raise_for_status().json()["id"] for answer in made]
        self.jobs.update(dict.fromkeys(ids, tenant))
        return ids

    def upload(self, client: httpx.Client) -> str:
        answer = client.post("/v1/uploads", files={"file": ("p.png", IMAGE, "image/png")})
        return str(answer.raise_for_status().json()["upload_id"])

    def statuses(self, ids: list[str]) -> dict[str, str]:
        return {i: row["status"] for i, row in job_rows(self.run, ids).items()}

    def wait(self, ids: list[str], done: Callable[[str], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(done(s) for s in self.statuses(ids).values()):
                return True
            time.sleep(1)
        return False

    def outage(self, proxy: ProxyHandle | list[ProxyHandle], what: str) -> None:
        """Black-hole `proxy` for the outage, then let traffic through again."""
        proxies = proxy if isinstance(proxy, list) else [proxy]
        for one in proxies:
            one.set_mode("blackhole")
        self.log(f"{what}: black-holed for {self.options.outage_seconds:.0f}s")
        time.sleep(self.options.outage_seconds)
        for one in proxies:
            one.set_mode("up")
        self.log(f"{what}: back")

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.results.append(Result(name, ok, detail))
        self.log(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")


# -- phases -------------------------------------------------------------------------------


def broker_cut(run: Faults) -> None:
    """Producers POST while Redis is black-holed: every request is answered within a few
    seconds, 201 exactly for the jobs that were made (one each), the rest 503."""
    before = _count_jobs(run)
    answers: list[tuple[int, float, str | None]] = []
    lock = threading.Lock()

    def producer(n: int) -> None:
        with run.api(timeout=ANSWER_BOUND_SECONDS * 4) as client:
            body = {"upload_id": upload_id, "prompt": f"{PROMPT}, broker cut {n}",
                    "webhook_url": run.tenants["main"].receiver.url}  # fmt: skip
            started = time.monotonic()
            try:
                answer = client.post("/v1/generations", json=body)
                status, job = answer.status_code, answer.json().get("id")
            except httpx.HTTPError:
                status, job = 0, None
            with lock:
                answers.append((status, time.monotonic() - started, job))

    with run.api() as client:
        upload_id = run.upload(client)
    redis = run.stack.proxies["redis"]
    redis.set_mode("blackhole")
    run.log("broker-cut: Redis black-holed; producers POST")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(producer, range(run.options.jobs)))
    time.sleep(max(0.0, run.options.outage_seconds - max(t for _, t, _ in answers)))
    redis.set_mode("up")
    run.log("broker-cut: back")
    created = [job for status, _, job in answers if status == 201 and job]
    run.jobs.update(dict.fromkeys(created, "main"))
    slowest = max(t for _, t, _ in answers)
    statuses = sorted({s for s, _, _ in answers})
    run.check(
        "broker cut: every POST answered in a few seconds, 201 or 503",
        slowest <= ANSWER_BOUND_SECONDS and set(statuses) <= {201, 503},
        f"statuses={statuses}, slowest={slowest:.1f}s (bound {ANSWER_BOUND_SECONDS:.0f}s)",
    )
    made = _count_jobs(run) - before
    run.check(
        "broker cut: one job per 201, none for anything else",
        made == len(created),
        f"jobs made={made}, answered 201={len(created)}",
    )


def s3_cut(run: Faults) -> None:
    """S3 black-holed while finished videos are being copied: the stores wait it out."""
    ids = run.create(run.options.jobs)
    _wait_fetched(run, ids)  # WaveSpeed fetches inputs through the S3 proxy too (sandbox)
    run.outage(run.stack.proxies["s3"], "s3-cut")
    _expect_completed(run, ids, "s3 cut: every video copied once S3 is back")


def history_down(run: Faults) -> None:
    """Half the submit answers are dropped (the prediction made all the same) while WaveSpeed's
    history answers 500: the ambiguous submits wait, then are adopted, never paid twice."""
    run.faults(submit_drop_after_create=0.5, history_500=1.0)
    ids = run.create(run.options.jobs)
    time.sleep(run.options.outage_seconds)
    run.faults()
    run.log("history-down: WaveSpeed's history back")
    _expect_completed(run, ids, "history down: every ambiguous submit settled")


def result_404(run: Faults) -> None:
    """`/result` answers 404 for ever for every prediction of the phase, and WaveSpeed's
    webhook is off: each job ends as `prediction_lost` after a few tries rather than being
    polled for ever, and gives its admission slot back (the later phases need the slots)."""
    # A sticky 404 strikes every prediction polled while it is on: a job of an earlier phase
    # still running (one requeued and submitted again through history-down, say) would end
    # `prediction_lost` with the phase's own. They finish first.
    run.wait(list(run.jobs), lambda s: s in TERMINAL, max(180.0, run.options.outage_seconds))
    run.faults(result_404=1.0, result_404_sticky=True, webhook_drop=1.0)
    ids = run.create(run.options.jobs)
    ended = run.wait(ids, lambda s: s in TERMINAL, max(180.0, run.options.outage_seconds))
    run.faults()
    codes = Counter(r["error_code"] for r in job_rows(run.run, ids).values())
    run.check(
        "result 404 for ever: every job ended as prediction_lost",
        ended and codes["prediction_lost"] == len(ids),
        f"{dict(codes)} of {len(ids)}",
    )


def cdn_404(run: Faults) -> None:
    """The CDN answers 404 for a while after completion: stores retry, and complete."""
    run.faults(output_404_seconds=run.options.outage_seconds)
    ids = run.create(run.options.jobs)
    _expect_completed(run, ids, "CDN 404 after completion: every video stored in the end")
    run.faults()


def wavespeed_cut_cancel(run: Faults) -> None:
    """WaveSpeed black-holed while the producer cancels jobs running there: every cancel is
    answered at once, and once WaveSpeed is back every cancelled job's prediction is deleted
    there (each delete backed off through the outage, its tries on the job's record)."""
    outage = run.options.outage_seconds
    run.faults(inference_seconds=[outage * 4, outage * 4])  # still running when it ends
    ids = run.create(run.options.jobs)
    _wait_fetched(run, ids)
    run.wait(ids, lambda s: s == "processing", 120)
    proxy = run.stack.proxies["simulator"]
    proxy.set_mode("blackhole")
    run.log(f"wavespeed-cut-cancel: WaveSpeed black-holed for {outage:.0f}s; producer cancels")
    slowest = 0.0
    with run.api(timeout=ANSWER_BOUND_SECONDS * 4) as client:
        for job_id in ids:
            started = time.monotonic()
            client.post(f"/v1/generations/{job_id}/cancel").raise_for_status()
            slowest = max(slowest, time.monotonic() - started)
    time.sleep(outage)
    proxy.set_mode("up")
    run.log("wavespeed-cut-cancel: back")
    run.check(
        "wavespeed cut: every cancel answered in a few seconds",
        slowest <= ANSWER_BOUND_SECONDS, f"slowest={slowest:.1f}s",
    )  # fmt: skip
    deadline = time.monotonic() + max(300.0, outage * 2)
    while time.monotonic() < deadline and any(
        row["withdrawing"] for row in job_rows(run.run, ids).values()
    ):
        time.sleep(1)
    status = {entry["id"]: entry["status"] for entry in ledger(run.run)["predictions"]}
    rows = job_rows(run.run, ids).values()
    deleted = sum(status.get(row["prediction_id"]) == "deleted" for row in rows)
    run.check(
        "wavespeed cut: every cancelled job's prediction deleted once WaveSpeed is back",
        deleted == len(ids), f"deleted={deleted} of {len(ids)}",
    )  # fmt: skip
    run.faults()


def receiver_blackhole(run: Faults) -> None:
    """One tenant's receiver takes connections and never answers; another tenant's callbacks
    keep arriving on time, and the black-holed one's arrive once its receiver is back."""
    healthy, proxy = run.tenants["main"], run.receiver_proxy
    assert proxy is not None
    proxy.set_mode("blackhole")
    run.log("receiver-blackhole: tenant 'blackholed' receiver black-holed")
    stuck = run.create(run.options.jobs, "blackholed")
    time.sleep(2)
    fine = run.create(run.options.jobs)
    run.wait(fine, lambda s: s in TERMINAL, 180)
    latencies = _callback_latencies(run, fine, healthy)
    time.sleep(max(0.0, run.options.outage_seconds - 30))
    proxy.set_mode("up")
    run.log("receiver-blackhole: receiver back")
    p99 = _p99(latencies)
    run.check(
        "black-holed receiver: another tenant's callbacks stay on time",
        len(latencies) == len(fine) and p99 <= HEALTHY_CALLBACK_P99_SECONDS,
        f"healthy callbacks={len(latencies)}/{len(fine)}, p99={p99:.1f}s",
    )
    run.log(f"receiver-blackhole: {len(stuck)} jobs' callbacks wait for their receiver")


def host_cut(run: Faults) -> None:
    """One of two worker hosts loses Redis and PostgreSQL while it holds poll countdowns and
    stores in flight; the other host and the reconciler carry on, and when the cut host comes
    back its stale messages change nothing."""
    ids = run.create(run.options.jobs)
    _wait_fetched(run, ids)
    run.outage([run.host_b["redis"], run.host_b["postgres"]], "host-cut")
    _expect_completed(run, ids, "host cut: every job finished, by the other host or after")


def hostile_inputs(run: Faults) -> None:
    """The corpus: each case answered as issue 10 wants, and a job made only where the case
    wants a 201 (the request-id cases and a batch's valid item); those jobs must finish."""
    before = _count_jobs(run)
    wrong: list[str] = []
    made: list[str] = []
    with run.api() as client:
        upload_id = run.upload(client)
        secret = run.stack.direct_env["WAVESPEED_WEBHOOK_SECRET"]
        corpus = hostile.cases(upload_id=upload_id, webhook_secret=secret)
        for case in corpus:
            answer: httpx.Response | None = None
            try:
                answer = client.request(**hostile.request_kwargs(case, run.tenants["main"].key))
                status = answer.status_code
            except httpx.HTTPError as exc:  # a refusal while the body still streamed in
                status = 413 if case.expect_status == 413 else -1
                run.log(f"hostile: {case.name}: connection ended early ({type(exc).__name__})")
            if status != case.expect_status:
                wrong.append(f"{case.name}={status} (want {case.expect_status})")
            elif answer is not None:
                wrong += _hostile_body(case, answer, made)
    run.jobs.update(dict.fromkeys(made, "main"))
    count = _count_jobs(run) - before
    run.check(
        "hostile input: every case answered as wanted, a job only for each 201",
        not wrong and count == len(made),
        f"cases={len(corpus)}, wrong={wrong}, jobs made={count}, 201s={len(made)}",
    )


def _hostile_body(case: hostile.Case, answer: httpx.Response, made: list[str]) -> list[str]:
    """What is wrong with an answer whose status was right; the ids of jobs it made."""
    body = answer.json() if answer.headers.get("content-type", "").endswith("json") else {}
    if case.expect_status == 201:
        made.append(body["id"])
    if case.expect_code and body.get("code") != case.expect_code:
        return [f"{case.name}: code {body.get('code')} (want {case.expect_code})"]
    if case.expect_items:
        items = body.get("items", [])
        made += [item["generation"]["id"] for item in items if item["status"] == 201]
        if tuple(item["status"] for item in items) != case.expect_items:
            return [f"{case.name}: items {[item['status'] for item in items]}"]
    if case.request_id_replaced:
        sent = case.headers.get("x-request-id", b"")
        if answer.headers.get("x-request-id", "").encode("latin-1") == sent:
            return [f"{case.name}: request id echoed"]
    return []


def load(run: Faults) -> None:
    """One key far over its rate limit gets 429s with Retry-After; another key is untouched."""
    with run.api("noisy") as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.get("/v1/generations"), range(400)))
    with run.api() as client:
        others = [client.get("/v1/generations").status_code for _ in range(10)]
    limited = [a for a in answers if a.status_code == 429]
    ok = (
        limited
        and all(a.headers.get("retry-after", "").isdigit() for a in limited)
        and {a.status_code for a in answers} <= {200, 429}
        and set(others) == {200}
    )
    run.check(
        "load: a key over its limit gets 429, another key does not",
        bool(ok),
        f"noisy: {len(answers) - len(limited)} ok, {len(limited)} limited; calm: {others}",
    )


PHASES: dict[str, Callable[[Faults], None]] = {
    "broker-cut": broker_cut,
    "s3-cut": s3_cut,
    "history-down": history_down,
    "result-404": result_404,
    "cdn-404": cdn_404,
    "wavespeed-cut-cancel": wavespeed_cut_cancel,
    "receiver-blackhole": receiver_blackhole,
    "host-cut": host_cut,
    "hostile": hostile_inputs,
    "load": load,
}


# -- helpers ------------------------------------------------------------------------------


def _wait_fetched(run: Faults, ids: list[str], timeout: float = 120) -> None:
    """Until WaveSpeed has every job's prediction past fetching its image."""
    deadline = time.monotonic() + timeout
    wanted = set(ids)
    while time.monotonic() < deadline:
        running = set()
        for entry in ledger(run.run)["predictions"]:
            image = str((entry.get("input") or {}).get("image", ""))
            if entry["status"] in ("processing", "completed") and "inputs/" in image:
                running.add(image.split("inputs/", 1)[1].split("/", 1)[0])
        if wanted <= running:
            return
        time.sleep(0.5)


def _count_jobs(run: Faults) -> int:
    dsn = run.stack.direct_env["DATABASE_URL"].replace("+psycopg", "")
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM jobs").fetchone()
        return int(row[0]) if row else 0


def _expect_completed(run: Faults, ids: list[str], name: str) -> None:
    run.wait(ids, lambda s: s in TERMINAL, run.options.timeout / 4)
    statuses = run.statuses(ids)
    done = sum(1 for s in statuses.values() if s == "completed")
    run.check(
        name, done == len(ids), f"completed={done} of {len(ids)} ({sorted(set(statuses.values()))})"
    )


def _verified(tenant: Tenant) -> dict[str, tuple[set[str], float]]:
    """Job id -> event types delivered (2xx) to the tenant's receiver, and when the first
    terminal one arrived."""
    seen: dict[str, tuple[set[str], float]] = {}
    for item in list(tenant.receiver.received):
        event = _verified_on_arrival(tenant.secret, item)
        if event is not None and item.status < 300:
            types, first = seen.get(event["data"]["id"], (set(), item.at))
            seen[event["data"]["id"]] = (types | {event["type"]}, min(first, item.at))
    return seen


def _verified_on_arrival(secret: str, item: Received) -> dict[str, Any] | None:
    """The callback's event if its signature is the tenant's and its timestamp was fresh
    when it arrived (the run outlasts the 5 min tolerance of checking it now)."""
    try:
        sent = datetime.fromtimestamp(int(item.headers["webhook-timestamp"]), UTC)
        expected = Webhook(secret).sign(item.headers["webhook-id"], sent, item.body.decode())
    except (KeyError, ValueError):
        return None
    offered = item.headers.get("webhook-signature", "").split()
    if expected not in offered or abs(item.at - sent.timestamp()) > TOLERANCE_SECONDS:
        return None
    event: dict[str, Any] = json.loads(item.body)
    return event


def _callback_latencies(run: Faults, ids: list[str], tenant: Tenant) -> list[float]:
    """Seconds from each job's completion to its callback arriving."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_verified(tenant).keys() & set(ids)) < len(ids):
        time.sleep(0.5)
    seen = _verified(tenant)
    dsn = run.stack.direct_env["DATABASE_URL"].replace("+psycopg", "")
    with psycopg.connect(dsn) as conn:
        query = "SELECT id::text, extract(epoch FROM completed_at) FROM jobs"
        rows = conn.execute(f"{query} WHERE id = ANY(%s::uuid[])", (ids,)).fetchall()
    return [max(0.0, seen[i][1] - float(at)) for i, at in rows if i in seen and at is not None]


def _p99(values: list[float]) -> float:
    if not values:
        return float("inf")
    return max(values) if len(values) < 100 else statistics.quantiles(values, n=100)[98]


def check_callbacks(run: Faults) -> Result:
    missing = []
    for job_id, row in job_rows(run.run, list(run.jobs)).items():
        tenant = run.tenants[run.jobs[job_id]]
        if row["status"] in TERMINAL and row["webhook_url"]:  # the corpus's jobs name none
            types, _ = _verified(tenant).get(job_id, (set(), 0.0))
            if f"generation.{row['status']}" not in types:
                missing.append(job_id)
    return Result("every terminal job's callback arrived and verifies", not missing,
                  f"missing={len(missing)} of {len(run.jobs)}")  # fmt: skip


def settle_callbacks(run: Faults, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not check_callbacks(run).ok:
        time.sleep(2)


# -- the run ------------------------------------------------------------------------------


def environ() -> dict[str, str]:
    """The stack's settings for the run: compressed callback retries and circuit breaker, a
    rate limit the load phase can cross, outages the store and recovery deadlines outlast."""
    return {
        **os.environ,
        "CALLBACK_SCHEDULE_SECONDS": "[0, 1, 2, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8]",
        "CALLBACK_TIMEOUT_SECONDS": "3",
        "CALLBACK_BREAKER_SECONDS": "2",
        "CALLBACK_BREAKER_MAX_SECONDS": "8",
        "RATE_LIMIT": "240/minute",
        "RECOVER_MAX_INTERVAL_SECONDS": "10",
        "STORE_RETRY_MAX_SECONDS": "10",
    }


def run(options: Options, phases: list[str] | None = None) -> list[Result]:
    root = options.root or Path(tempfile.mkdtemp(prefix="kling-faults-"))
    simulator_args = [
        "--render-mode",
        "real",
        "--resolution",
        "160x96",
        "--refund-delay-seconds",
        "1",
    ]
    stack = Stack(root, environ=environ(), simulator_args=simulator_args,
                  proxied={"redis", "postgres", "s3", "simulator"})  # fmt: skip
    main = Receiver(status_for=flaky(0.1, seed=3))
    blackholed = Receiver()
    stack.up()
    try:
        with serve(main), serve(blackholed), ProxyThread() as receivers:
            # The black-holed tenant's receiver sits behind a proxy the phase can cut.
            port = int(blackholed.url.split(":")[2].split("/")[0])
            proxy = receivers.add("receiver", ("127.0.0.1", port))
            return _run(options, stack, main, blackholed, proxy, phases)
    finally:
        stack.down()


def _run(
    options: Options, stack: Stack, main: Receiver, blackholed: Receiver, proxy: ProxyHandle,
    phases: list[str] | None,
) -> list[Result]:  # fmt: skip
    faults = Faults(options, stack, Run(options, stack, main), receiver_proxy=proxy)  # type: ignore[arg-type]
    faults.tenants["main"] = Tenant(
        "main", stack.info["api_key"], stack.info["webhook_secret"], main
    )
    for name, receiver in (("blackholed", blackholed), ("noisy", Receiver())):
        made = json.loads(stack._cli("tenants", "create", f"{name}-{os.getpid()}"))
        faults.tenants[name] = Tenant(name, made["api_key"], made["webhook_secret"], receiver)
    blackholed_url = blackholed.url
    blackholed.url = f"http://127.0.0.1:{proxy.port}/{blackholed_url.split('/', 3)[3]}"
    faults.host_b = stack.new_proxies("host-b", {"redis", "postgres"})
    stack.start_worker("worker-b", concurrency=2, through=faults.host_b)
    faults.faults()
    for name in phases or list(PHASES):
        faults.log(f"== {name}")
        PHASES[name](faults)
    faults.sim("DELETE", "/_sim/faults")
    for handle in [*stack.proxies.values(), *faults.host_b.values(), proxy]:
        handle.set_mode("up")
    ids = list(faults.jobs)
    faults.wait(ids, lambda s: s in TERMINAL, options.timeout / 2)
    settle_ledger(faults.run)
    settle_callbacks(faults, 180)
    rows = job_rows(faults.run, ids)
    book = ledger(faults.run)
    faults.log(f"faults fired: {json.dumps(book.get('faults_fired', {}), sort_keys=True)}")
    faults.log(f"proxies: {json.dumps(_proxy_summary(stack), sort_keys=True)}")
    return [
        *faults.results,
        check_nothing_lost(rows, ids),
        check_charges(rows, book["predictions"]),
        check_charged(rows, book["predictions"]),
        check_withdrawn(rows, book["predictions"]),
        check_objects(faults.run, rows, book["predictions"]),
        check_error_codes(rows),
        check_callbacks(faults),
    ]


def _proxy_summary(stack: Stack) -> dict[str, Any]:
    """Per proxy: connections and bytes dropped while black-holed."""
    summary = {}
    for name, stats in stack.proxy_stats().items():
        hole = stats.get("by_mode", {}).get("blackhole", {})
        summary[name] = {"blackholed_connections": hole.get("connections", 0),
                         "bytes_dropped": hole.get("bytes_dropped", 0)}  # fmt: skip
    return summary


def parse(argv: list[str] | None) -> tuple[Options, list[str] | None]:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__)
    defaults = Options()
    for name, value in vars(defaults).items():
        if name == "root":
            parser.add_argument("--root", type=Path, default=None)
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated")
    args = vars(parser.parse_args(argv))
    phases = args.pop("phases").split(",")
    return Options(**args), phases


def main(argv: list[str] | None = None) -> int:
    options, phases = parse(argv)
    started = time.monotonic()
    results = run(options, phases)
    print()
    for result in results:
        print(result.line())
    summary = {
        "phases": phases,
        "outage_seconds": options.outage_seconds,
        "seconds": round(time.monotonic() - started, 1),
        "passed": all(r.ok for r in results),
    }
    print(json.dumps(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
