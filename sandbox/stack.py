"""The embedded stack: every stand-in the product needs, plus the API, a worker and beat.

Any service URL already set in the environment (DATABASE_URL, REDIS_URL, S3_ENDPOINT_URL,
WAVESPEED_BASE_URL) replaces its embedded stand-in; so does SECRET_KEYS, which is otherwise a
key made on the stack's first start and kept in its root. `.stack/stack.json` tells clients
where everything is once it is healthy.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sandbox.processes import Process, free_port, wait_until
from sandbox.services import EmbeddedPostgres, EmbeddedRedis, EmbeddedS3, Simulator
from workers.dispatch import QUEUES
from workers.sealing import new_key

DATABASE_NAME = "kling"

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
    "WAVESPEED_READ_TIMEOUT": "10",
    "LOG_FORMAT": "json",
    # The simulator has no account tier; gate at a generous one.
    "MAX_IN_FLIGHT": "200",
    "SUBMITS_PER_MINUTE": "6000",
}


@dataclass
class Stack:
    """Starts, describes and stops one embedded stack rooted at `root` (usually `.stack/`)."""

    root: Path
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    worker_concurrency: int = 2
    simulator_args: list[str] = field(default_factory=list)
    services: list[Any] = field(default_factory=list)
    apps: list[Process] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
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
            self.env = self._service_env()
            self._prepare()
            if apps:
                self._start_apps()
        except BaseException:
            self.down()
            raise
        self.info = self._describe()
        (self.root / "stack.json").write_text(json.dumps(self.info, indent=2))
        return self.info

    def _service_env(self) -> dict[str, str]:
        env = {**SANDBOX_SETTINGS, **self.environ}
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
        if "WAVESPEED_BASE_URL" not in self.environ:
            self.simulator = Simulator(self.logs, extra_args=self.simulator_args).start()
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
        self._cli("migrate")
        if "API_KEY" not in self.env:
            name = "dev-" + secrets.token_hex(3)
            created = json.loads(self._cli("tenants", "create", name))
            self.env.update(API_KEY=created["api_key"], TENANT_ID=created["tenant_id"])
            self.env["TENANT_WEBHOOK_SECRET"] = created["webhook_secret"]

    def _cli(self, *args: str) -> str:
        with (self.logs / "cli.log").open("ab") as log:
            done = subprocess.run(
                [sys.executable, "-m", "api.cli", *args], env=self.env, check=True,
                stdout=subprocess.PIPE, stderr=log,
            )  # fmt: skip
        return done.stdout.decode()

    def _start_apps(self) -> None:
        self.start_api("api", int(self.env["API_PORT"]))
        self.start_worker("worker", concurrency=self.worker_concurrency)
        self.start_beat()

    def start_beat(self) -> Process:
        beat = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "beat",
                "--loglevel", "INFO", "-s", str(self.root / "beat-schedule")]  # fmt: skip
        process = Process("beat", beat, self.logs / "beat.log", env=self.env).start()
        self.apps.append(process)
        return process

    def start_api(self, name: str, port: int, env: Mapping[str, str] | None = None) -> Process:
        """One more API process on this stack; waits until it answers /healthz."""
        argv = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory",
                "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]  # fmt: skip
        api = Process(name, argv, self.logs / f"{name}.log", env={**self.env, **(env or {})})
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
    ) -> Process:
        """One more Celery worker on this stack (all queues unless told); waits until ready."""
        argv = [sys.executable, "-m", "celery", "-A", app, "worker",
                "-Q", ",".join(queues), "-c", str(concurrency),
                "-n", f"{name}-{secrets.token_hex(3)}@%h", "--loglevel", "INFO"]  # fmt: skip
        log = self.logs / f"{name}.log"
        offset = log.stat().st_size if log.exists() else 0  # a restarted worker appends
        worker = Process(
            name, argv, log, env={**self.env, **self._metrics_env(name), **(env or {})}
        )
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
        env = self.env
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
        (self.root / "stack.json").unlink(missing_ok=True)


def _ready(log_path: Path, offset: int) -> bool:
    # Celery prints "<name> ready." once every pool process is up and consuming.
    with log_path.open("rb") as log:
        log.seek(offset)
        return b" ready." in log.read()
