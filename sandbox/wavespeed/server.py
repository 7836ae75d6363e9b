"""Running the simulator under uvicorn: in a background thread (tests, embedded use) or in the
foreground (the CLI)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from sandbox.wavespeed.app import create_app
from sandbox.wavespeed.config import SimulatorConfig

STARTUP_TIMEOUT_SECONDS = 10.0


def uvicorn_config(app: FastAPI, host: str, port: int, log_level: str) -> uvicorn.Config:
    """uvicorn settings shared by every way of running the simulator."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        # A held-open submit (submit_timeout, sync mode) must not stall shutdown for long.
        timeout_graceful_shutdown=2,
        lifespan="on",
        # No websocket routes; not loading a websocket library keeps its deprecations away.
        ws="none",
    )


@dataclass(frozen=True)
class RunningSimulator:
    """A simulator serving on a real socket."""

    base_url: str
    app: FastAPI


@contextlib.contextmanager
def serve_in_thread(
    config: SimulatorConfig | None = None, *, log_level: str = "warning"
) -> Iterator[RunningSimulator]:
    """Serve a fresh simulator on `config.host` and a free port (when `config.port` is 0)."""
    config = config or SimulatorConfig(port=0)
    app = create_app(config)
    server = uvicorn.Server(uvicorn_config(app, config.host, config.port, log_level))
    thread = threading.Thread(target=server.run, name="wavespeed-sim", daemon=True)
    thread.start()
    try:
        port = _wait_until_listening(server, thread)
        yield RunningSimulator(base_url=f"http://{config.host}:{port}", app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _wait_until_listening(server: uvicorn.Server, thread: threading.Thread) -> int:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the WaveSpeed simulator did not start")
        time.sleep(0.01)
    socket = server.servers[0].sockets[0]
    return int(socket.getsockname()[1])
