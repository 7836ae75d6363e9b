"""A producer's callback endpoint, for tests and the chaos run: records every POST and answers
with a programmable status (fail the first N attempts, fail a fraction, answer 410...)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0  # what the receiver answered
    at: float = field(default_factory=time.time)  # when it arrived (unix seconds)


@dataclass
class Receiver:
    """Answers `status_for(received)`; 204 unless told otherwise."""

    status_for: Callable[[Received], int] = lambda _: 204
    received: list[Received] = field(default_factory=list)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, item: Received) -> int:
        item.status = self.status_for(item)
        with self._lock:
            self.received.append(item)
        return item.status

    def bodies_for(self, webhook_id: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.headers.get("webhook-id") == webhook_id]


def flaky(failure_rate: float, seed: int = 1) -> Callable[[Received], int]:
    """Fail (HTTP 500) a fraction of the attempts, at random but repeatably."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def status(_: Received) -> int:
        with lock:
            return 500 if rng.random() < failure_rate else 204

    return status


@contextmanager
def serve(receiver: Receiver, host: str = "127.0.0.1") -> Iterator[Receiver]:
    """Run the receiver on a free loopback port for the duration of the block."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            status = receiver.record(Received(self.path, headers, body))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return  # quiet: tests read `received` instead

    server = ThreadingHTTPServer((host, 0), Handler)
    receiver.url = f"http://{host}:{server.server_address[1]}/hooks"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
