"""One simulated WaveSpeed account: its state and the machinery acting it out, built at app
start and torn down at app stop."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import ssl
import sys
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from sandbox.wavespeed.config import SimulatorConfig
from sandbox.wavespeed.faults import FaultInjector, FaultProfile
from sandbox.wavespeed.limits import RateWindow, SlotGate
from sandbox.wavespeed.store import Store
from sandbox.wavespeed.tasks import TaskRunner
from sandbox.wavespeed.webhooks import WebhookSender


def _remember_that_sniffio_is_missing() -> None:
    """httpcore's async client runs `import sniffio` on every request; when sniffio is not
    installed (anyio 4 no longer needs it) each attempt searches the whole import path, which
    cost a third of the simulator's CPU under load. A `None` in `sys.modules` makes the import
    fail at once, exactly as it would anyway."""
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


_remember_that_sniffio_is_missing()


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context per process: building one reads the CA store, which is slow."""
    return ssl.create_default_context()


class Simulator:
    """The shared state every route works on."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.store = Store(config.initial_balance_usd)
        self.faults = FaultInjector(config.faults)
        self.rate = RateWindow()
        self.gate = SlotGate(lambda: self.faults.profile.concurrency)
        self._background: set[asyncio.Task[None]] = set()
        self._http: httpx.AsyncClient | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._runner: TaskRunner | None = None

    @property
    def runner(self) -> TaskRunner:
        """The task runner; exists between `start()` and `stop()`."""
        if self._runner is None:
            raise RuntimeError("simulator not started")
        return self._runner

    async def start(self) -> None:
        """Build the clients and pools that need a running event loop."""
        # httpcore scans every pooled connection per request, so keep the idle pool small.
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=10)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(30.0, connect=5.0), limits=limits, verify=tls_context()
        )
        self._pool = ThreadPoolExecutor(
            max_workers=self.config.render_workers, thread_name_prefix="sim-render"
        )
        webhooks = WebhookSender(
            self._http,
            self.faults,
            secret=self.config.webhook_secret,
            retries=self.config.webhook_retries,
            backoff_seconds=lambda: self.config.webhook_backoff_seconds,
            timeout_seconds=self.config.webhook_timeout_seconds,
        )
        self._runner = TaskRunner(
            config=self.config,
            store=self.store,
            faults=self.faults,
            gate=self.gate,
            http=self._http,
            render_pool=self._pool,
            webhooks=webhooks,
            spawn=self.spawn,
        )

    async def stop(self) -> None:
        """Cancel every background task and release the clients."""
        await self._cancel_background()
        if self._http is not None:
            await self._http.aclose()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run `coroutine` in the background, holding a reference so it is not collected."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def set_faults(self, profile: FaultProfile) -> None:
        """Apply a new fault profile at once, queued tasks included."""
        self.faults.replace(profile)
        await self.gate.limit_changed()

    async def reset(self) -> None:
        """Forget every prediction, upload, charge and fault, as a fresh account."""
        await self._cancel_background()
        self.store = Store(self.config.initial_balance_usd)
        self.rate = RateWindow()
        self.faults.forget()
        await self.set_faults(FaultProfile())
        await self.stop()
        await self.start()

    async def _cancel_background(self) -> None:
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
