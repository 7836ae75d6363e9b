"""Small helpers for tests: the simulator's admin API, a recording dispatcher, settings."""

from __future__ import annotations

import io
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Any

import httpx
import psycopg
from PIL import Image

from config.settings import settings_from
from sandbox.stack import Stack
from workers.dispatch import ROUTES
from workers.runtime import build_s3_client


@dataclass
class RecordingDispatcher:
    """Collects the tasks the pipeline asks for, so a test can run them one by one."""

    sent: list[tuple[str, uuid.UUID, float | None, dict[str, Any]]] = field(default_factory=list)
    # Producers' own tasks published (`workers.replies`): task, queue, body, message id.
    replies: list[tuple[str, str, dict[str, Any], str]] = field(default_factory=list)

    def __call__(
        self, task: str, job_id: uuid.UUID, *, countdown: float | None = None, **kwargs: Any
    ) -> None:
        self.sent.append((task, job_id, countdown, kwargs))

    def take(self) -> list[tuple[str, uuid.UUID, float | None, dict[str, Any]]]:
        """The messages so far, which then count as consumed (or, for a test, lost)."""
        sent, self.sent = self.sent, []
        return sent

    def reply(self, task: str, queue: str, body: dict[str, Any], message_id: str) -> None:
        self.replies.append((task, queue, body, message_id))

    def waiting(self, queue: str) -> int:
        """Like a broker's queue length: messages not yet taken, without a countdown."""
        return sum(
            1 for task, _, countdown, _ in self.sent if ROUTES[task] == queue and not countdown
        )


class SimulatorAdmin:
    """The simulator's `/_sim/` admin API."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._http = httpx.Client(base_url=base_url, timeout=30)

    def close(self) -> None:
        self._http.close()

    def set_faults(self, **faults: Any) -> None:
        self._http.put("/_sim/faults", json=faults).raise_for_status()

    def reset_faults(self) -> None:
        self._http.delete("/_sim/faults").raise_for_status()

    def ledger(self) -> dict[str, Any]:
        return dict(self._http.get("/_sim/ledger").raise_for_status().json())

    @contextmanager
    def configured(self, **changes: Any) -> Iterator[None]:
        """The simulator's runtime config changed (`render_mode`, `inference_seconds`, ...)
        for the block, then put back as it was."""
        before = self._http.get("/_sim/config").raise_for_status().json()
        self._http.put("/_sim/config", json=changes).raise_for_status()
        try:
            yield
        finally:
            restore = {name: before[name] for name in changes}
            self._http.put("/_sim/config", json=restore).raise_for_status()

    def prediction(self, prediction_id: str) -> dict[str, Any]:
        for entry in self.ledger()["predictions"]:
            if entry["id"] == prediction_id:
                return dict(entry)
        raise LookupError(prediction_id)


def wait_for(check: Callable[[], Any], *, timeout: float = 60, interval: float = 0.2) -> Any:
    """Wait for a condition the system under test reaches on its own; fail with a clear error."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout}s")
        time.sleep(interval)


def image_bytes(width: int, height: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 60)).save(buffer, format=fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A real 300x300 PNG of about a kilobyte whose header claims width x height: a
    decompression bomb's shape, without the memory to build one."""
    png = bytearray(image_bytes(300, 300))
    ihdr = png[12:29]  # chunk type and data, which the CRC covers
    ihdr[4:12] = struct.pack(">II", width, height)
    png[12:33] = ihdr + struct.pack(">I", zlib.crc32(ihdr))
    return bytes(png)


def stored_counts(stack: Stack) -> tuple[int, int, int]:
    """Jobs, outbox rows and objects under `inputs/`."""
    with psycopg.connect(stack.env["DATABASE_URL"].replace("+psycopg", "")) as conn:
        jobs = conn.execute("SELECT count(*) FROM jobs").fetchone()
        outbox = conn.execute("SELECT count(*) FROM outbox").fetchone()
    assert jobs is not None and outbox is not None
    settings = settings_from(stack.env)
    s3 = build_s3_client(settings)
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(
            Bucket=settings.s3_bucket, Prefix="inputs/"
        )
        objects = sum(page.get("KeyCount", 0) for page in pages)
    finally:
        s3.close()
    return int(jobs[0]), int(outbox[0]), objects


@contextmanager
def serving(body: bytes, content_type: str) -> Iterator[str]:
    """A loopback URL (the stack's guard allows 127.0.0.1) answering `body` to any GET."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/picture"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class RawAnswer:
    """An HTTP answer read off the socket, and how much of the body had gone out by then."""

    status: int
    headers: dict[str, str]
    body: bytes
    sent: int

    def json(self) -> Any:
        return json.loads(self.body)


def raw_post(
    base_url: str, path: str, headers: dict[str, str], chunks: Iterable[bytes] = (),
    *, timeout: float = 10,
) -> RawAnswer:  # fmt: skip
    """POST over a bare socket, as a client that reads while it sends: `headers` as given
    (declare `content-length` without sending the body to see whether the server waits for
    it), then `chunks` until the server answers. httpx would send the whole body first."""
    url = httpx.URL(base_url)
    head = f"POST {path} HTTP/1.1\r\nhost: {url.host}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    sent = 0
    with socket.create_connection((url.host, url.port or 80), timeout=timeout) as sock:
        sock.sendall(head.encode())
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # answered: the server reads no more
            try:
                sock.sendall(chunk)
            except OSError:  # closed under us once it answered
                break
            sent += len(chunk)
        return _read_answer(sock, sent)


def chunked(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """`pieces` framed for `transfer-encoding: chunked` (the last chunk is never sent)."""
    for piece in pieces:
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"


def _read_answer(sock: socket.socket, sent: int) -> RawAnswer:
    data = b""
    while b"\r\n\r\n" not in data:
        data += _recv(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        body += _recv(sock)
    return RawAnswer(int(status_line.split()[1]), headers, body, sent)


def _recv(sock: socket.socket) -> bytes:
    part = sock.recv(65536)
    if not part:
        raise AssertionError("the connection closed before a whole answer came")
    return part


def kling(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the operator's CLI as a person would, with `env` over this process's."""
    argv = [sys.executable, "-m", "api.cli", *args]
    return subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True)
