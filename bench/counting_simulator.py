"""The WaveSpeed simulator with a request counter in front, for benchmarks that count calls.

    python -m bench.counting_simulator [every flag of python -m sandbox.wavespeed]

The simulator's ledger lists predictions and webhook attempts but not the requests it answered,
so this wraps its app in an ASGI middleware that counts every request by kind (`submit`,
`result`, `history`, `output`, `media`, `admin`, `other`) and `/result` polls by prediction id.
`GET /_bench/requests` answers the counts; `DELETE /_bench/requests` zeroes them.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from pydantic import ValidationError

from sandbox.processes import Process, free_port, wait_until
from sandbox.wavespeed.__main__ import build_parser, config_from_args, configure_logging
from sandbox.wavespeed.app import create_app
from sandbox.wavespeed.config import DEFAULT_API_KEY, DEFAULT_WEBHOOK_SECRET
from sandbox.wavespeed.server import uvicorn_config

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

COUNTS_PATH = "/_bench/requests"
_RESULT = re.compile(r"^/api/v3/predictions/([^/]+)/result$")


def kind_of(method: str, path: str) -> str:
    """Which WaveSpeed call a request is; `submit` is any other POST under /api/v3/."""
    if _RESULT.match(path):
        return "result"
    if path == "/api/v3/predictions" and method == "POST":
        return "history"
    if path.startswith("/api/v3/media/"):
        return "media"
    if path.startswith("/api/v3/") and method == "POST":
        return "submit"
    if path.startswith("/_sim/outputs/"):
        return "output"
    if path.startswith(("/_sim/media/", "/_sim/uploads/")):
        return "media"
    if path.startswith("/_sim/"):
        return "admin"
    return "other"


@dataclass
class RequestCounter:
    """ASGI middleware: counts, then hands the request to the simulator unchanged."""

    app: App
    by_kind: Counter[str] = field(default_factory=Counter)
    results: Counter[str] = field(default_factory=Counter)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path == COUNTS_PATH:
            await self._answer(method, send)
            return
        kind = kind_of(method, path)
        self.by_kind[kind] += 1
        if kind == "result":
            match = _RESULT.match(path)
            assert match is not None
            self.results[match.group(1)] += 1
        await self.app(scope, receive, send)

    async def _answer(self, method: str, send: Send) -> None:
        if method == "DELETE":
            self.by_kind.clear()
            self.results.clear()
        body = json.dumps({"by_kind": self.by_kind, "result_by_prediction": self.results})
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})


@dataclass
class CountingSimulator:
    """This module as a child process on a free port, like `sandbox.services.Simulator`."""

    log_path: Path
    extra_args: list[str] = field(default_factory=list)
    name: str = "simulator"
    api_key: str = DEFAULT_API_KEY
    webhook_secret: str = DEFAULT_WEBHOOK_SECRET
    port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a stack's processes need to use this simulator instead of their own."""
        return {
            "WAVESPEED_BASE_URL": self.url,
            "WAVESPEED_API_KEY": self.api_key,
            "WAVESPEED_WEBHOOK_SECRET": self.webhook_secret,
        }

    def start(self) -> CountingSimulator:
        argv = [
            sys.executable, "-m", "bench.counting_simulator", "--host", "127.0.0.1",
            "--port", str(self.port), "--api-key", self.api_key,
            "--webhook-secret", self.webhook_secret, "--log-level", "warning", *self.extra_args,
        ]  # fmt: skip
        self.process = Process(self.name, argv, self.log_path).start()
        wait_until(self._ready, timeout=60, what="counting simulator")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        self.process.check_alive()
        return httpx.get(f"{self.url}/_sim/health", timeout=2).status_code == 200

    def counts(self) -> dict[str, Any]:
        """`{"by_kind": {...}, "result_by_prediction": {...}}` so far."""
        return dict(httpx.get(self.url + COUNTS_PATH, timeout=60).raise_for_status().json())

    def ledger(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/_sim/ledger", timeout=120).raise_for_status().json())

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/_sim/health", timeout=10).raise_for_status().json())

    def set_faults(self, **faults: Any) -> None:
        httpx.put(f"{self.url}/_sim/faults", json=faults, timeout=10).raise_for_status()

    def stop(self) -> None:
        if self.process:
            self.process.stop()


def main(argv: list[str] | None = None) -> int:
    """Parse the simulator's own flags and serve it behind the counter."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"invalid simulator settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    app = create_app(config)
    counted = RequestCounter(app)
    server_config = uvicorn_config(app, config.host, config.port, args.log_level)
    server_config.app = counted
    uvicorn.Server(server_config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
