"""Helpers for tests that drive the simulator: a quick config, a small client, sample images
and a webhook receiver."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import httpx
from PIL import Image, ImageDraw

from sandbox.wavespeed.config import DEFAULT_API_KEY, MODEL_ID, SimulatorConfig
from sandbox.wavespeed.server import serve_in_thread
from sandbox.wavespeed.simulator import tls_context
from sandbox.wavespeed.store import TERMINAL_STATUSES


def quick_config(**overrides: Any) -> SimulatorConfig:
    """A config for tests: free port, no inference wait, placeholder video, instant refunds."""
    settings: dict[str, Any] = {
        "port": 0,
        "inference_seconds": 0.0,
        "render_mode": "placeholder",
        "refund_delay_seconds": 0.0,
        "webhook_backoff_seconds": 0.05,
        "sync_timeout_seconds": 5.0,
    }
    settings.update(overrides)
    return SimulatorConfig(**settings)


class SimulatorClient:
    """A thin httpx client for the simulator's API and admin endpoints."""

    def __init__(self, base_url: str, api_key: str = DEFAULT_API_KEY, timeout: float = 10.0):
        self.base_url = base_url
        self.api_key = api_key
        self.http = httpx.Client(
            base_url=base_url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {api_key}"},
            verify=tls_context(),
        )
        # For the CDN and admin URLs, and for checking what happens without a key.
        self.anon = httpx.Client(base_url=base_url, timeout=timeout, verify=tls_context())

    def close(self) -> None:
        """Release the connection pools."""
        self.http.close()
        self.anon.close()

    def submit(self, image: str, prompt: str = "slow push-in", **fields: Any) -> httpx.Response:
        """POST a task; `webhook=` goes to the query string, the rest into the body."""
        webhook = fields.pop("webhook", None)
        params = {"webhook": webhook} if webhook else None
        body = {"image": image, "prompt": prompt, **fields}
        return self.http.post(f"/api/v3/{MODEL_ID}", json=body, params=params)

    def submit_ok(self, image: str, prompt: str = "slow push-in", **fields: Any) -> dict[str, Any]:
        """Submit and answer `data`, failing loudly on anything but HTTP 200."""
        response = self.submit(image, prompt, **fields)
        response.raise_for_status()
        data: dict[str, Any] = response.json()["data"]
        return data

    def result(self, prediction_id: str) -> dict[str, Any]:
        """The prediction object from `/result`."""
        response = self.http.get(f"/api/v3/predictions/{prediction_id}/result")
        response.raise_for_status()
        data: dict[str, Any] = response.json()["data"]
        return data

    def wait(self, prediction_id: str, timeout: float = 20.0) -> dict[str, Any]:
        """Poll until the prediction is terminal."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.result(prediction_id)
            if data["status"] in TERMINAL_STATUSES:
                return data
            time.sleep(0.02)
        raise TimeoutError(f"prediction {prediction_id} still not finished after {timeout}s")

    def upload(self, data: bytes, filename: str = "input.png") -> str:
        """Store `data` through the binary upload; answers its download URL."""
        response = self.http.post("/api/v3/media/upload/binary", files={"file": (filename, data)})
        response.raise_for_status()
        return str(response.json()["data"]["download_url"])

    def ledger(self) -> dict[str, Any]:
        """`GET /_sim/ledger`."""
        ledger: dict[str, Any] = self.anon.get("/_sim/ledger").raise_for_status().json()
        return ledger

    def set_faults(self, **knobs: Any) -> None:
        """Replace the fault profile."""
        self.anon.put("/_sim/faults", json=knobs).raise_for_status()


@contextlib.contextmanager
def simulator_client(**overrides: Any) -> Iterator[SimulatorClient]:
    """Serve a fresh `quick_config(**overrides)` simulator in a thread; yield a client for it."""
    with serve_in_thread(quick_config(**overrides)) as running:
        client = SimulatorClient(running.base_url)
        try:
            yield client
        finally:
            client.close()


def sample_image(width: int = 640, height: int = 360, *, image_format: str = "PNG") -> bytes:
    """A picture with structure (gradient, grid, shapes) so camera motion is visible."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):
        shade = int(255 * y / max(1, height - 1))
        draw.line([(0, y), (width, y)], fill=(shade, 120, 255 - shade))
    for x in range(0, width, max(8, width // 16)):
        draw.line([(x, 0), (x, height)], fill=(255, 255, 255))
    radius = min(width, height) // 5
    centre = (width // 2, height // 2)
    draw.ellipse(
        [centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius],
        fill=(220, 30, 30),
    )
    out = io.BytesIO()
    image.save(out, format=image_format)
    return out.getvalue()


@dataclass(frozen=True)
class ReceivedWebhook:
    """One request the sink received."""

    path: str
    headers: dict[str, str]
    body: bytes


class WebhookSink:
    """A tiny HTTP server recording POSTs; answers the given statuses in turn, then 200."""

    def __init__(self, statuses: Iterable[int] = ()) -> None:
        self.received: list[ReceivedWebhook] = []
        self._statuses = deque(statuses)
        self._arrived = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        """Where to point `?webhook=`."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedWebhook]:
        """Block until `count` requests arrived (or fail after `timeout`)."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.received) >= count, timeout):
                raise TimeoutError(f"{len(self.received)} of {count} webhooks arrived")
            return list(self.received)

    def __enter__(self) -> WebhookSink:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _record(self, request: ReceivedWebhook) -> int:
        with self._arrived:
            self.received.append(request)
            self._arrived.notify_all()
            return self._statuses.popleft() if self._statuses else 200

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                status = sink._record(ReceivedWebhook(self.path, headers, body))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                """Keep test output quiet."""

        return Handler
