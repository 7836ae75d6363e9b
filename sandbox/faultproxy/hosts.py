"""Where proxies run: an event loop in a thread of this process (tests, a callback receiver),
or a process of their own (`python -m sandbox.faultproxy`) driven over the control channel,
so the harness's own work never slows the bytes of the stack it watches."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sandbox.faultproxy.control import ProxyHandle, Registry
from sandbox.faultproxy.proxy import ProxyError
from sandbox.processes import Process, wait_until

CALL_TIMEOUT = 10.0


class ProxyHost:
    """Runs proxies; `call` carries one command (see `control`) to their loop."""

    def call(self, command: dict[str, Any]) -> Any:
        raise NotImplementedError

    def add(self, name: str, upstream: tuple[str, int]) -> ProxyHandle:
        """A new proxy in `up` mode in front of `upstream`, on a free loopback port."""
        host, port = upstream
        listening = self.call({"op": "add", "name": name, "host": host, "port": port})
        return ProxyHandle(name, int(listening), (host, int(port)), self.call)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Every proxy's stats, by name."""
        return dict(self.call({"op": "list"}))

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class ProxyThread(ProxyHost):
    """Proxies on an event loop in a daemon thread of this process."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._registry = Registry()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="faultproxy", daemon=True
        )
        self._thread.start()

    def call(self, command: dict[str, Any]) -> Any:
        future = asyncio.run_coroutine_threadsafe(self._registry.execute(command), self._loop)
        return future.result(CALL_TIMEOUT)

    def stop(self) -> None:
        """Reset every connection, stop the loop and its thread."""
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._registry.close(), self._loop).result(CALL_TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CALL_TIMEOUT)
        self._loop.close()


class ProxyProcess(ProxyHost):
    """Proxies in a child process; commands go over its loopback control channel."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.process: Process | None = None
        self.control_port = 0

    def start(self) -> ProxyProcess:
        """Start the process and wait until its control channel listens."""
        ready = self.log_dir / f"faultproxy-{secrets.token_hex(4)}.json"
        argv = [sys.executable, "-m", "sandbox.faultproxy", "--ready-file", str(ready)]
        self.process = Process("faultproxy", argv, self.log_dir / "faultproxy.log").start()
        process = self.process
        wait_until(lambda: process.check_alive() and ready.exists(), timeout=30, what="faultproxy")
        self.control_port = int(json.loads(ready.read_text())["control_port"])
        ready.unlink()
        return self

    def call(self, command: dict[str, Any]) -> Any:
        address = ("127.0.0.1", self.control_port)
        with socket.create_connection(address, timeout=CALL_TIMEOUT) as sock:
            sock.sendall(json.dumps(command).encode() + b"\n")
            with sock.makefile("rb") as replies:
                reply = json.loads(replies.readline())
        if not reply["ok"]:
            raise ProxyError(reply["error"])
        return reply["result"]

    def stop(self) -> None:
        """Stop the process: the kernel resets whatever it still held."""
        if self.process is not None:
            self.process.stop()
            self.process = None
