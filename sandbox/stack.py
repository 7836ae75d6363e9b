"""The embedded stack: every stand-in the product needs, plus the API, a worker and beat.

Any service URL already set in the environment (DATABASE_URL, REDIS_URL, S3_ENDPOINT_URL,
WAVESPEED_BASE_URL) replaces its embedded stand-in; so does SECRET_KEYS, which is otherwise a
key made on the stack's first start and kept in its root. With `real_wavespeed` (the CLI's),
a real WAVESPEED_API_KEY and no WAVESPEED_BASE_URL replace the simulator with WaveSpeed itself
(`real_wavespeed_env`). `.stack/stack.json` tells clients where everything is once it is
healthy.

With `proxied={"redis", "postgres", "s3", "simulator"}` the apps reach those services only
through fault proxies (`sandbox.faultproxy`, in a process of their own): `env` is what the apps
get, `direct_env` the real addresses for the harness's own checks, `proxies[service]` the
handle that cuts one. `new_proxies` makes another set for one more worker host, so one host can
be cut off while the others run:

    stack = Stack(root, proxied={"redis", "postgres"})
    stack.up()
    host_b = stack.new_proxies("host-b", {"redis", "postgres"})
    stack.start_worker("worker-b", concurrency=2, through=host_b)
    host_b["redis"].set_mode("blackhole")

WaveSpeed builds output (CDN) and upload URLs from the address a client reached it at, so
outputs of predictions submitted through a simulator proxy are fetched through that same proxy,
by whichever worker stores them. Presigned input URLs name the S3 endpoint of the process that
signed them, so the simulator fetches inputs through the S3 proxy too.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sandbox.faultproxy import ProxyHandle, ProxyProcess, upstream_of
from sandbox.processes import Process, free_port, wait_until
from sandbox.services import EmbeddedPostgres, EmbeddedRedis, EmbeddedS3, Simulator
from workers.dispatch import QUEUES
from workers.sealing import new_key

DATABASE_NAME = "kling"
# The setting that names each service a proxy can stand in front of.
SERVICE_URLS = {
    "postgres": "DATABASE_URL",
    "redis": "REDIS_URL",
    "s3": "S3_ENDPOINT_URL",
    "simulator": "WAVESPEED_BASE_URL",
}

# WaveSpeed itself, where a stack with a real key and no WAVESPEED_BASE_URL sends its jobs.
WAVESPEED_URL = "https://api.wavespeed.ai"
SIMULATOR_API_KEY = Simulator.api_key

# Settings for the sandbox: a simulated clip is done in seconds, so poll on that scale.
SANDBOX_SETTINGS = {
    "POLL_FIRST_DELAY_SECONDS": '{"5": 1.0, "10": 1.5}',
    "POLL_MIN_INTERVAL_SECONDS": "0.5",
    "POLL_MAX_INTERVAL_SECONDS": "3",
    "RETRY_BASE_SECONDS": "0.5",
    "RETRY_MAX_SECONDS": "5",
    "RECONCILE_INTERVAL_SECONDS": "2",
    "OUTBOX_GRACE_SECONDS": "3",
    "POLL_OVERDUE_GRACE_SECONDS": "5",
    "STORE_STALL_SECONDS": "30",
    "POLL_REFUSAL_BASE_SECONDS": "1",
    "WAVESPEED_READ_TIMEOUT": "10",
    # A lost submit answer is settled within about a minute, not the default's three.
    "SUBMIT_TIME_LIMIT_SECONDS": "30",
    "LOG_FORMAT": "json",
    # The simulator has no account tier; gate at a generous one.
    "MAX_IN_FLIGHT": "200",
    # Benchmarks and the chaos run drive thousands of jobs through one development key.
    "RATE_LIMIT": "100000/minute",
    "SUBMITS_PER_MINUTE": "6000",
}
# Those of the sandbox's settings that fit only the simulator: the real service takes minutes
# a clip, and its account tier caps what may run at once.
SIMULATOR_PACE = (
    "POLL_FIRST_DELAY_SECONDS", "POLL_MIN_INTERVAL_SECONDS", "POLL_MAX_INTERVAL_SECONDS",
    "WAVESPEED_READ_TIMEOUT", "SUBMIT_TIME_LIMIT_SECONDS", "MAX_IN_FLIGHT", "SUBMITS_PER_MINUTE",
)  # fmt: skip


def real_wavespeed_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The settings that send a stack's jobs to WaveSpeed itself, when `environ` holds a real
    WAVESPEED_API_KEY (not the simulator's) and no WAVESPEED_BASE_URL; else None (the
    simulator). Inputs are uploaded to WaveSpeed unless INPUT_HOSTING says otherwise: it
    cannot reach the stack's loopback S3."""
    key = environ.get("WAVESPEED_API_KEY", "")
    if not key or key == SIMULATOR_API_KEY or "WAVESPEED_BASE_URL" in environ:
        return None
    return {"WAVESPEED_BASE_URL": WAVESPEED_URL, "INPUT_HOSTING": "wavespeed"}


@dataclass
class Stack:
    """Starts, describes and stops one embedded stack rooted at `root` (usually `.stack/`)."""

    root: Path
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    worker_concurrency: int = 2
    # What the stack's own worker consumes (a benchmark may give a queue a worker of its own).
    worker_queues: Collection[str] = QUEUES
    simulator_args: list[str] = field(default_factory=list)
    proxied: Collection[str] = ()
    # Whether a real WAVESPEED_API_KEY in `environ` may send jobs to WaveSpeed itself
    # (`real_wavespeed_env`): the CLI's `stack up` and `demo` allow it; tests and benchmarks,
    # which inherit a developer's environment, never pay.
    real_wavespeed: bool = False
    services: list[Any] = field(default_factory=list)
    apps: list[Process] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    direct_env: dict[str, str] = field(default_factory=dict)
    proxies: dict[str, ProxyHandle] = field(default_factory=dict)
    proxy_host: ProxyProcess | None = None
    info: dict[str, Any] = field(default_factory=dict)
    metrics_urls: dict[str, str] = field(default_factory=dict)
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    simulator: Simulator | None = None

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def up(self, *, apps: bool = True) -> dict[str, Any]:
        """Start everything; answers (and writes) the stack description."""
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.root / "stack.json").unlink(missing_ok=True)
        try:
            unknown = set(self.proxied) - set(SERVICE_URLS)
            if unknown:
                raise ValueError(f"no such service to proxy: {sorted(unknown)}")
            self.direct_env = self._service_env()
            self._prepare()
            self.proxies = self.new_proxies("", self.proxied)
            self.env = self.env_through(self.proxies, base=self.direct_env)
            if apps:
                self._start_apps()
        except BaseException:
            self.down()
            raise
        self.info = self._describe()
        (self.root / "stack.json").write_text(json.dumps(self.info, indent=2))
        return self.info

    def _service_env(self) -> dict[str, str]:
        real = real_wavespeed_env(self.environ) if self.real_wavespeed else None
        sandbox = {k: v for k, v in SANDBOX_SETTINGS.items() if not (real and k in SIMULATOR_PACE)}
        env = {**sandbox, **(real or {}), **self.environ}
        if "DATABASE_URL" not in self.environ:
            self.postgres = EmbeddedPostgres(self.root / "postgres").start()
            self.services.append(self.postgres)
            env["DATABASE_URL"] = self.postgres.create_database(DATABASE_NAME)
        if "REDIS_URL" not in self.environ:
            self.redis = EmbeddedRedis(self.root / "redis").start()
            self.services.append(self.redis)
            env["REDIS_URL"] = self.redis.url()
        if "S3_ENDPOINT_URL" not in self.environ:
            s3 = EmbeddedS3(self.logs).start()
            self.services.append(s3)
            env.update(S3_ENDPOINT_URL=s3.url, AWS_ACCESS_KEY_ID="sandbox")
            env.update(AWS_SECRET_ACCESS_KEY="sandbox", S3_BUCKET=env.get("S3_BUCKET", "kling"))
        if "WAVESPEED_BASE_URL" not in env:
            # The simulator allows what the product allows, as WaveSpeed's model would.
            durations = json.loads(env.get("ALLOWED_DURATIONS", "[5, 10]"))
            extra = ["--allowed-durations", ",".join(str(d) for d in durations)]
            self.simulator = Simulator(self.logs, extra_args=[*extra, *self.simulator_args]).start()
            self.services.append(self.simulator)
            env.update(
                WAVESPEED_BASE_URL=self.simulator.url,
                WAVESPEED_API_KEY=self.simulator.api_key,
                WAVESPEED_WEBHOOK_SECRET=self.simulator.webhook_secret,
            )
        if "SECRET_KEYS" not in env:
            env["SECRET_KEYS"] = self._secret_keys()
        api_port = free_port()
        env["API_PORT"] = str(api_port)
        # Everything here is on loopback, which the URL guard refuses unless told otherwise.
        env.setdefault("URL_ALLOW_HOSTS", '["127.0.0.1", "localhost"]')
        env.setdefault("PUBLIC_BASE_URL", f"http://127.0.0.1:{api_port}")
        return env

    def _secret_keys(self) -> str:
        """The stack's own SECRET_KEYS, made on its first start and kept beside its data: a
        restarted stack must open the secrets its database already holds."""
        path = self.root / "secret_keys.json"
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(json.dumps([new_key()]))
        return path.read_text()

    def _prepare(self) -> None:
        """Schema, bucket and a development tenant with its key, before any app starts."""
        env = self.direct_env
        self._cli("migrate")
        if "API_KEY" not in env:
            name = "dev-" + secrets.token_hex(3)
            created = json.loads(self._cli("tenants", "create", name))
            env.update(API_KEY=created["api_key"], TENANT_ID=created["tenant_id"])
            env["TENANT_WEBHOOK_SECRET"] = created["webhook_secret"]

    def new_proxies(self, label: str, services: Iterable[str]) -> dict[str, ProxyHandle]:
        """A fault proxy of its own in front of each named service (`label.service` in the
        stats); pass them to `start_worker(through=...)` or `env_through`."""
        made: dict[str, ProxyHandle] = {}
        for service in sorted(services):
            upstream = upstream_of(self.direct_env[SERVICE_URLS[service]])
            name = f"{label}.{service}" if label else service
            made[service] = self._proxy_host().add(name, upstream)
        return made

    def _proxy_host(self) -> ProxyProcess:
        if self.proxy_host is None:
            self.proxy_host = ProxyProcess(self.logs).start()
            self.services.append(self.proxy_host)  # stopped before the services it fronts
        return self.proxy_host

    def env_through(
        self, proxies: Mapping[str, ProxyHandle], base: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """The apps' environment (or `base`) with these services reached through `proxies`."""
        env = dict(self.env if base is None else base)
        for service, proxy in proxies.items():
            setting = SERVICE_URLS[service]
            env[setting] = proxy.rewrite(self.direct_env[setting])
        return env

    def proxy_stats(self) -> dict[str, dict[str, Any]]:
        """Every proxy's mode and counters, by name (empty without proxies)."""
        return self.proxy_host.stats() if self.proxy_host is not None else {}

    def _cli(self, *args: str) -> str:
        with (self.logs / "cli.log").open("ab") as log:
            done = subprocess.run(
                [sys.executable, "-m", "api.cli", *args], env=self.direct_env, check=True,
                stdout=subprocess.PIPE, stderr=log,
            )  # fmt: skip
        return done.stdout.decode()

    def _start_apps(self) -> None:
        self.start_api("api", int(self.env["API_PORT"]))
        self.start_worker("worker", concurrency=self.worker_concurrency, queues=self.worker_queues)
        self.start_beat()

    def start_beat(self, *, through: Mapping[str, ProxyHandle] | None = None) -> Process:
        beat = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "beat",
                "--loglevel", "INFO", "-s", str(self.root / "beat-schedule")]  # fmt: skip
        env = self.env_through(through or {})
        process = Process("beat", beat, self.logs / "beat.log", env=env).start()
        self.apps.append(process)
        return process

    def start_api(
        self,
        name: str,
        port: int,
        env: Mapping[str, str] | None = None,
        *,
        through: Mapping[str, ProxyHandle] | None = None,
    ) -> Process:
        """One more API process on this stack (reaching the services named in `through` by
        those proxies); waits until it answers /healthz."""
        argv = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory",
                "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]  # fmt: skip
        full_env = {**self.env_through(through or {}), **(env or {})}
        api = Process(name, argv, self.logs / f"{name}.log", env=full_env)
        self.apps.append(api.start())
        url = f"http://127.0.0.1:{port}/healthz"
        wait_until(lambda: api.check_alive() and httpx.get(url).is_success, timeout=60, what=name)
        return api

    def start_worker(
        self,
        name: str,
        *,
        concurrency: int,
        env: Mapping[str, str] | None = None,
        queues: Iterable[str] = QUEUES,
        app: str = "workers.celery_app",
        through: Mapping[str, ProxyHandle] | None = None,
        node: str | None = None,
    ) -> Process:
        """One more Celery worker on this stack (all queues unless told), reaching the services
        named in `through` by those proxies (a host of its own); waits until ready. Its node
        name is `node`, or a unique one."""
        node = node or f"{name}-{secrets.token_hex(3)}@%h"
        argv = [sys.executable, "-m", "celery", "-A", app, "worker",
                "-Q", ",".join(queues), "-c", str(concurrency),
                "-n", node, "--loglevel", "INFO"]  # fmt: skip
        log = self.logs / f"{name}.log"
        offset = log.stat().st_size if log.exists() else 0  # a restarted worker appends
        base = self.env_through(through or {})
        worker = Process(name, argv, log, env={**base, **self._metrics_env(name), **(env or {})})
        self.apps.append(worker.start())
        ready = lambda: worker.check_alive() and _ready(log, offset)  # noqa: E731
        wait_until(ready, timeout=90, what=name)
        return worker

    def _metrics_env(self, name: str) -> dict[str, str]:
        """A metrics port and a multiprocess directory of its own for one worker host."""
        port = free_port()
        self.metrics_urls[name] = f"http://127.0.0.1:{port}/metrics"
        return {
            "METRICS_PORT": str(port),
            "METRICS_HOST": "127.0.0.1",
            "PROMETHEUS_MULTIPROC_DIR": str(self.root / "metrics" / name),
        }

    def _describe(self) -> dict[str, Any]:
        env = self.direct_env  # the real addresses; the apps' proxied ones are under "proxies"
        return {
            "pid": os.getpid(),
            "api_url": f"http://127.0.0.1:{env['API_PORT']}",
            "api_key": env["API_KEY"],
            "tenant_id": env.get("TENANT_ID"),
            "webhook_secret": env.get("TENANT_WEBHOOK_SECRET"),
            "simulator_url": env["WAVESPEED_BASE_URL"],
            "s3_endpoint_url": env["S3_ENDPOINT_URL"],
            "s3_bucket": env.get("S3_BUCKET", "kling-videos"),
            "database_url": env["DATABASE_URL"],
            "redis_url": env["REDIS_URL"],
            "metrics_urls": {
                "api": f"http://127.0.0.1:{env['API_PORT']}/metrics",
                **self.metrics_urls,
            },
            "proxies": {service: proxy.address for service, proxy in self.proxies.items()},
            "logs": str(self.logs),
            "pids": {
                p.name: p.pid for p in self.apps + [s.process for s in self.services if s.process]
            },
        }

    def down(self) -> None:
        """Stop apps first (they hold connections), then the services, in reverse order."""
        for process in reversed(self.apps):
            process.stop()
        for service in reversed(self.services):
            service.stop()
        self.apps.clear()
        self.services.clear()
        self.proxies, self.proxy_host = {}, None
        (self.root / "stack.json").unlink(missing_ok=True)


def _ready(log_path: Path, offset: int) -> bool:
    # Celery prints "<name> ready." once every pool process is up and consuming.
    with log_path.open("rb") as log:
        log.seek(offset)
        return b" ready." in log.read()
