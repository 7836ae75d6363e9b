"""Commands to proxies as JSON, so one interface drives a proxy in this process's loop thread
or in another process over the control channel.

A command is an object with `op` and the proxy's `name`:

    {"op": "add", "name": "redis", "host": "127.0.0.1", "port": 6379}   -> the listening port
    {"op": "set_mode", "name": "redis", "mode": "latency", "delay": 0.2} -> the proxy's stats
    {"op": "reset_after", "name": "s3", "n_bytes": 65536, "direction": "upstream", "times": 1}
    {"op": "drop", "name": "redis"}                                      -> connections reset
    {"op": "stats", "name": "redis"}   {"op": "list"}   {"op": "remove", "name": "redis"}

Over the control channel each command is one JSON line, answered by one line:
`{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sandbox.faultproxy.proxy import FaultProxy, ProxyError
from sandbox.faultproxy.urls import rewrite

Call = Callable[[dict[str, Any]], Any]


class Registry:
    """The proxies of one event loop, by name; carries out commands on that loop."""

    def __init__(self) -> None:
        self.proxies: dict[str, FaultProxy] = {}

    async def execute(self, command: dict[str, Any]) -> Any:
        """Carry out one command; raises `ProxyError` for anything it cannot do."""
        try:
            return await self._execute(command)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ProxyError):
                raise
            raise ProxyError(f"bad command {command!r}: {exc!r}") from exc

    async def _execute(self, command: dict[str, Any]) -> Any:
        op = command.get("op")
        if op == "add":
            return await self._add(str(command["name"]), str(command["host"]), command["port"])
        if op == "list":
            return {name: proxy.stats() for name, proxy in self.proxies.items()}
        proxy = self._proxy(command.get("name"))
        if op == "set_mode":
            await proxy.set_mode(str(command["mode"]), float(command.get("delay") or 0.0))
        elif op == "reset_after":
            times = command.get("times")
            direction = str(command.get("direction", "both"))
            proxy.reset_after(
                int(command["n_bytes"]), direction, None if times is None else int(times)
            )
        elif op == "drop":
            return proxy.drop()
        elif op == "remove":
            await proxy.stop()
            del self.proxies[proxy.name]
            return None
        elif op != "stats":
            raise ProxyError(f"unknown op {op!r}")
        return proxy.stats()

    async def _add(self, name: str, host: str, port: int) -> int:
        if name in self.proxies:
            raise ProxyError(f"a proxy named {name!r} exists already")
        proxy = await FaultProxy(name, (host, int(port))).start()
        self.proxies[name] = proxy
        return proxy.port

    def _proxy(self, name: object) -> FaultProxy:
        proxy = self.proxies.get(str(name))
        if proxy is None:
            raise ProxyError(f"no proxy named {name!r}")
        return proxy

    async def close(self) -> None:
        """Stop every proxy."""
        for proxy in self.proxies.values():
            await proxy.stop()
        self.proxies.clear()


@dataclass(frozen=True)
class ProxyHandle:
    """The synchronous, thread-safe face of one proxy, wherever its loop runs."""

    name: str
    port: int
    upstream: tuple[str, int]
    call: Call
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        """Where clients connect instead of the upstream."""
        return f"{self.host}:{self.port}"

    def set_mode(self, mode: str, delay: float = 0.0) -> dict[str, Any]:
        """`up`, `refuse`, `blackhole` or `latency` (with `delay` seconds per chunk)."""
        return dict(self.call({"op": "set_mode", "name": self.name, "mode": mode, "delay": delay}))

    def reset_after(
        self, n_bytes: int, direction: str = "both", times: int | None = None
    ) -> dict[str, Any]:
        """Reset connections once they forward `n_bytes` more (`upstream`: client to service,
        `downstream`: service to client, or `both`); the first `times` of them, or every one."""
        command = {"op": "reset_after", "name": self.name, "n_bytes": n_bytes}
        return dict(self.call({**command, "direction": direction, "times": times}))

    def drop(self) -> int:
        """Reset every live connection now; answers how many."""
        return int(self.call({"op": "drop", "name": self.name}))

    def stats(self) -> dict[str, Any]:
        """Mode, live connections and the counters per mode."""
        return dict(self.call({"op": "stats", "name": self.name}))

    def rewrite(self, url: str) -> str:
        """`url` with its host and port replaced by this proxy's (user, path, query kept)."""
        return rewrite(url, self.host, self.port)


async def answer(registry: Registry, line: bytes) -> dict[str, Any]:
    """One control-channel reply for one command line."""
    try:
        command = json.loads(line)
        if not isinstance(command, dict):
            raise ProxyError("a command is a JSON object")
        return {"ok": True, "result": await registry.execute(command)}
    except ValueError as exc:  # ProxyError and bad JSON alike
        return {"ok": False, "error": str(exc)}


async def serve_control(registry: Registry, host: str, port: int) -> asyncio.Server:
    """The control channel: JSON lines in, JSON lines out, one connection per client."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(json.dumps(await answer(registry, line)).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass  # the controller went away; nothing to answer
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
