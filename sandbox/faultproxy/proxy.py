"""One TCP fault proxy: a loopback port in front of one upstream (host:port) whose mode can be
switched while connections are live.

- `up`: bytes flow both ways.
- `refuse`: the port stops listening, so new connections are refused (ECONNREFUSED, as from a
  stopped server), and every live connection is reset.
- `blackhole`: new connections are accepted and never reach the upstream; live ones stall.
  Bytes in either direction are read and dropped, so clients hang until their own timeouts.
  Leaving `blackhole` resets every stalled connection: a client sees a broken connection,
  never one that silently resumes after losing bytes.
- `latency`: as `up`, with every chunk held back `delay` seconds, in both directions.

`reset_after(n_bytes)` arms a rule on top of `up` or `latency`: a connection is reset once it
has forwarded `n_bytes` more bytes (in one direction or both), which is how a store in progress
or an answer cut mid-call is acted out. Every `set_mode` disarms it.

Resets are real TCP RSTs (SO_LINGER 0). Everything runs on one asyncio event loop with
protocols rather than streams: no task per connection, reads paused while the other side's
buffer is full, so hundreds of connections cost little CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast, get_args

Mode = Literal["up", "refuse", "blackhole", "latency"]
Direction = Literal["upstream", "downstream", "both"]
MODES: tuple[Mode, ...] = get_args(Mode)
DIRECTIONS: tuple[Direction, ...] = get_args(Direction)

BACKLOG = 1024
# A connection stops reading once this much is held back by `latency`; memory stays bounded.
MAX_DELAYED_BYTES = 1 << 20
UPSTREAM_CONNECT_TIMEOUT = 10.0
_LINGER_RESET = struct.pack("ii", 1, 0)


class ProxyError(ValueError):
    """A command the proxy cannot carry out (unknown mode, bad argument, unknown proxy)."""


@dataclass
class Tally:
    """What happened while one mode was in force."""

    connections: int = 0  # accepted (refused ones never reach us: the kernel answers them)
    bytes_upstream: int = 0  # client -> service, forwarded
    bytes_downstream: int = 0  # service -> client, forwarded
    bytes_dropped: int = 0  # read and thrown away by `blackhole`
    resets: int = 0  # connections we reset (mode change, rule, drop)
    upstream_failures: int = 0  # the service itself could not be reached


@dataclass
class ResetRule:
    """Reset connections once they forwarded `n_bytes` in `direction`; `times` of them, or all."""

    n_bytes: int
    direction: Direction
    times: int | None
    fired: int = 0

    def counts(self, direction: Direction) -> bool:
        return self.direction in ("both", direction)


class FaultProxy:
    """A proxy on the running event loop; every method is called from that loop."""

    def __init__(self, name: str, upstream: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.name = name
        self.upstream = upstream
        self.host = host
        self.port = 0
        self.mode: Mode = "up"
        self.delay = 0.0
        self.rule: ResetRule | None = None
        self.tallies: dict[Mode, Tally] = {mode: Tally() for mode in MODES}
        self.live: set[Connection] = set()
        self._guard: socket.socket | None = None
        self._server: asyncio.Server | None = None

    @property
    def tally(self) -> Tally:
        """The counters of the mode in force."""
        return self.tallies[self.mode]

    async def start(self) -> FaultProxy:
        """Reserve a free port and listen on it."""
        # The guard keeps the port ours while `refuse` closes the listener: without it another
        # socket could take the port and `up` could not listen again.
        self._guard = _reusable_socket()
        self._guard.bind((self.host, 0))
        self.port = int(self._guard.getsockname()[1])
        await self._listen()
        return self

    async def stop(self) -> None:
        """Stop listening, reset every connection, release the port."""
        self._close_listener()
        self._reset_all(lambda _: True)
        if self._guard is not None:
            self._guard.close()
            self._guard = None

    async def set_mode(self, mode: str, delay: float = 0.0) -> None:
        """Switch modes; takes effect on live connections before it returns."""
        new = _checked_mode(mode, delay)
        old, self.mode = self.mode, new
        self.delay, self.rule = delay, None
        if new == "refuse":
            self._close_listener()
            self._reset_all(lambda _: True)
            return
        if old == "refuse":
            await self._listen()
        if new == "blackhole":
            for connection in list(self.live):
                connection.stall()
        elif old == "blackhole":
            self._reset_all(lambda c: c.stalled, into=self.tallies["blackhole"])

    def reset_after(self, n_bytes: int, direction: str = "both", times: int | None = None) -> None:
        """Arm the reset rule for live and new connections (counting from now)."""
        if n_bytes < 0 or (times is not None and times < 1):
            raise ProxyError("n_bytes must be >= 0 and times >= 1")
        if direction not in DIRECTIONS:
            raise ProxyError(f"direction must be one of {', '.join(DIRECTIONS)}")
        self.rule = ResetRule(n_bytes, cast(Direction, direction), times)
        for connection in self.live:
            connection.rule_bytes = 0

    def drop(self) -> int:
        """Reset every live connection now, mode unchanged; answers how many."""
        return self._reset_all(lambda _: True)

    def stats(self) -> dict[str, Any]:
        """Counters per mode and the state in force, as JSON."""
        return {
            "name": self.name,
            "port": self.port,
            "upstream": f"{self.upstream[0]}:{self.upstream[1]}",
            "mode": self.mode,
            "delay": self.delay,
            "live": len(self.live),
            "stalled": sum(1 for c in self.live if c.stalled),
            "reset_rule": asdict(self.rule) if self.rule else None,
            "by_mode": {mode: asdict(tally) for mode, tally in self.tallies.items()},
        }

    async def _listen(self) -> None:
        listener = _reusable_socket()
        listener.bind((self.host, self.port))
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self).client, sock=listener, backlog=BACKLOG
        )

    def _close_listener(self) -> None:
        # Only the listening socket closes; live connections are ours to reset (wait_closed
        # would wait for them instead).
        if self._server is not None:
            self._server.close()
            self._server = None

    def _reset_all(self, which: Callable[[Connection], bool], into: Tally | None = None) -> int:
        chosen = [c for c in self.live if which(c)]
        for connection in chosen:
            connection.reset(into=into)
        return len(chosen)

    def rule_fired(self) -> None:
        """One more connection reset by the rule; disarm once it has done `times`."""
        assert self.rule is not None
        self.rule.fired += 1
        if self.rule.times is not None and self.rule.fired >= self.rule.times:
            self.rule = None


def _checked_mode(mode: str, delay: float) -> Mode:
    if mode not in MODES:
        raise ProxyError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "latency" and not delay > 0:
        raise ProxyError("latency needs a delay > 0 seconds")
    if mode != "latency" and delay:
        raise ProxyError("only latency takes a delay")
    return cast(Mode, mode)


def _reusable_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setblocking(False)
    return sock


class Side(asyncio.Protocol):
    """One end of a proxied connection: the accepted client or our socket to the upstream."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.transport: asyncio.Transport | None = None
        self.outgoing: Pipe | None = None  # the pipe this side feeds
        self.incoming: Pipe | None = None  # the pipe that writes to this side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.connection.made(self)

    def data_received(self, data: bytes) -> None:
        assert self.outgoing is not None
        self.outgoing.push(data)

    def eof_received(self) -> bool:
        assert self.outgoing is not None
        self.outgoing.push(None)
        return True  # keep the other direction open: half-closed sockets stay half-open

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.connection.lost(self, exc)

    def pause_writing(self) -> None:
        assert self.incoming is not None
        self.incoming.sink_full = True
        self.incoming.throttle()

    def resume_writing(self) -> None:
        assert self.incoming is not None
        self.incoming.sink_full = False
        self.incoming.throttle()

    def abort(self, *, flush: bool = False) -> None:
        """Reset with an RST; `flush` sends what is already buffered first."""
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        if flush:
            self.transport.close()
        else:
            self.transport.abort()


class Pipe:
    """One direction of a connection: holds chunks back for `latency`, keeps their order, and
    pauses the source while the sink is full or too much is held back."""

    def __init__(self, connection: Connection, source: Side, sink: Side, direction: Direction):
        self.connection = connection
        self.source, self.sink = source, sink
        self.direction = direction
        self.source.outgoing, self.sink.incoming = self, self
        self.held: deque[tuple[float, bytes | None]] = deque()  # (due, chunk); None is EOF
        self.held_bytes = 0
        self.sink_full = False
        self.eof_sent = False
        self._timer: asyncio.TimerHandle | None = None

    def push(self, chunk: bytes | None) -> None:
        """A chunk (None: EOF) arrived from the source."""
        proxy = self.connection.proxy
        if self.connection.stalled:
            proxy.tally.bytes_dropped += len(chunk or b"")
            return
        if proxy.delay <= 0 and not self.held:
            self.connection.forward(self, chunk)
            return
        loop = asyncio.get_running_loop()
        self.held.append((loop.time() + proxy.delay, chunk))
        self.held_bytes += len(chunk or b"")
        self._schedule()
        self.throttle()

    def release(self) -> None:
        """Forward every held chunk that is due, in arrival order."""
        self._timer = None
        now = asyncio.get_running_loop().time()
        while self.held and self.held[0][0] <= now and not self.connection.closed:
            _, chunk = self.held.popleft()
            self.held_bytes -= len(chunk or b"")
            self.connection.forward(self, chunk)
        self._schedule()
        self.throttle()

    def discard(self) -> None:
        """Forget what is held (the connection stalls or ends)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.held.clear()
        self.held_bytes = 0
        self.sink_full = False

    def throttle(self) -> None:
        """Read from the source unless the sink or the hold-back is full (always, if stalled)."""
        transport = self.source.transport
        if transport is None or self.connection.closed:
            return
        full = self.sink_full or self.held_bytes > MAX_DELAYED_BYTES
        if full and not self.connection.stalled:
            transport.pause_reading()
        elif self.connection.ready:
            transport.resume_reading()

    def _schedule(self) -> None:
        if self._timer is None and self.held and not self.connection.closed:
            self._timer = asyncio.get_running_loop().call_at(self.held[0][0], self.release)


class Connection:
    """A client connection and, once reached, its upstream connection."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.client = Side(self)
        self.server = Side(self)
        self.to_server = Pipe(self, self.client, self.server, "upstream")
        self.to_client = Pipe(self, self.server, self.client, "downstream")
        self.stalled = False
        self.closed = False
        self.ready = False  # both ends connected and forwarding
        self.rule_bytes = 0
        self._connecting: asyncio.Task[None] | None = None

    def made(self, side: Side) -> None:
        if side is self.server:
            return
        proxy = self.proxy
        proxy.live.add(self)
        proxy.tally.connections += 1
        if proxy.mode == "blackhole":
            self.stalled = True  # never connects upstream: a cut cable answers nothing
            return
        # Bytes the client sends first wait in the kernel until the upstream is reached.
        assert self.client.transport is not None
        self.client.transport.pause_reading()
        self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.proxy.upstream
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: self.server, host, port),
                UPSTREAM_CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError):
            self.proxy.tally.upstream_failures += 1
            self.reset(count=False)
            return
        if self.closed:
            self.server.abort()
        elif not self.stalled:
            self.ready = True
            self.to_server.throttle()
            self.to_client.throttle()

    def forward(self, pipe: Pipe, chunk: bytes | None) -> None:
        """Write one chunk to the pipe's sink, counted; the reset rule may cut it short."""
        transport = pipe.sink.transport
        if transport is None:
            return
        if chunk is None:
            self._forward_eof(pipe, transport)
            return
        rule = self.proxy.rule
        if rule is not None and rule.counts(pipe.direction):
            left = rule.n_bytes - self.rule_bytes
            if len(chunk) >= left:
                self._write(pipe, transport, chunk[:left])
                self.proxy.rule_fired()
                self.reset(flush=pipe.sink)
                return
            self.rule_bytes += len(chunk)
        self._write(pipe, transport, chunk)

    def _write(self, pipe: Pipe, transport: asyncio.Transport, chunk: bytes) -> None:
        tally = self.proxy.tally
        if pipe.direction == "upstream":
            tally.bytes_upstream += len(chunk)
        else:
            tally.bytes_downstream += len(chunk)
        if chunk:
            transport.write(chunk)

    def _forward_eof(self, pipe: Pipe, transport: asyncio.Transport) -> None:
        pipe.eof_sent = True
        if transport.can_write_eof():
            transport.write_eof()
        if self.to_server.eof_sent and self.to_client.eof_sent:
            self.close()

    def stall(self) -> None:
        """From now on read and drop in both directions (`blackhole` on a live connection)."""
        self.stalled, self.ready = True, False
        for pipe in (self.to_server, self.to_client):
            pipe.discard()
            if pipe.source.transport is not None:
                pipe.source.transport.resume_reading()

    def reset(
        self, *, into: Tally | None = None, count: bool = True, flush: Side | None = None
    ) -> None:
        """RST both ends; `flush` first sends what is buffered towards that side."""
        if self.closed:
            return
        if count:
            (into or self.proxy.tally).resets += 1
        self._end()
        self.client.abort(flush=flush is self.client)
        self.server.abort(flush=flush is self.server)

    def close(self) -> None:
        """Both directions ended cleanly: close both ends with FIN."""
        if self.closed:
            return
        self._end()
        for side in (self.client, self.server):
            if side.transport is not None:
                side.transport.close()

    def lost(self, side: Side, exc: Exception | None) -> None:
        """One end went away; the other sees what a TCP peer would: a reset if it was one."""
        if self.closed or (self.stalled and side is self.server):
            return  # a cut cable hides the service's goodbye: the client keeps hanging
        self._end()
        other = self.server if side is self.client else self.client
        if exc is not None:
            other.abort()
        elif other.transport is not None:
            other.transport.close()  # what is already buffered still goes out

    def _end(self) -> None:
        self.closed, self.ready = True, False
        self.proxy.live.discard(self)
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        self.to_server.discard()
        self.to_client.discard()
