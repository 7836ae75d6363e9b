"""The fault proxy over real loopback sockets, in front of a tiny echo server: each mode does
what it says, seen from a client with timeouts."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.faultproxy import ProxyError, ProxyHandle, ProxyProcess, ProxyThread
from sandbox.faultproxy.urls import rewrite, upstream_of
from sandbox.processes import free_port
from tests.support import wait_for

pytestmark = pytest.mark.timeout(60)

STALL = 0.3  # how long a client waits before it calls a silence a stall


class Echo:
    """A loopback echo server that keeps every byte each connection sent it; it closes its
    side once the client has closed its sending side."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.received: list[bytearray] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def total_received(self) -> int:
        with self._lock:
            return sum(len(buffer) for buffer in self.received)

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # closed at the end of the test
            while True:
                conn, _ = self.sock.accept()
                threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        buffer = bytearray()
        with self._lock:
            self.received.append(buffer)
        with conn, contextlib.suppress(OSError):  # a reset is what several tests cause
            while data := conn.recv(65536):
                with self._lock:
                    buffer.extend(data)
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[Echo]:
    server = Echo()
    yield server
    server.close()


@pytest.fixture
def host() -> Iterator[ProxyThread]:
    with ProxyThread() as running:
        yield running


@pytest.fixture
def proxy(host: ProxyThread, echo: Echo) -> ProxyHandle:
    return host.add("echo", echo.address)


def connect(proxy: ProxyHandle, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    return read_exactly(sock, len(payload))


def read_until_broken(sock: socket.socket) -> tuple[bytes, type[BaseException] | None]:
    """Everything the socket still yields, and how it ended (None: a clean EOF)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except OSError as exc:
        return data, type(exc)
    return data, None


def test_up_forwards_both_ways_and_counts_the_bytes(proxy: ProxyHandle) -> None:
    with connect(proxy) as sock:
        assert [roundtrip(sock, p) for p in (b"ping", b"x" * 100_000)] == [b"ping", b"x" * 100_000]
    up = proxy.stats()["by_mode"]["up"]
    assert (up["connections"], up["bytes_upstream"], up["bytes_downstream"]) == (
        1,
        100_004,
        100_004,
    )


def test_refuse_refuses_new_connections_and_resets_live_ones(proxy: ProxyHandle) -> None:
    live = connect(proxy)
    assert roundtrip(live, b"before") == b"before"
    proxy.set_mode("refuse")
    with live:
        assert read_until_broken(live) == (b"", ConnectionResetError)
    with pytest.raises(ConnectionRefusedError):
        connect(proxy)
    proxy.set_mode("up")
    with connect(proxy) as again:
        assert roundtrip(again, b"after") == b"after"
    assert proxy.stats()["by_mode"]["refuse"]["resets"] == 1


def test_blackhole_stalls_live_and_new_connections_until_the_clients_time_out(
    proxy: ProxyHandle, echo: Echo
) -> None:
    live = connect(proxy, timeout=STALL)
    assert roundtrip(live, b"before") == b"before"
    proxy.set_mode("blackhole")
    fresh = connect(proxy, timeout=STALL)  # the connect itself succeeds: nothing refuses
    with live, fresh:
        for sock in (live, fresh):
            sock.sendall(b"into the void")
            with pytest.raises(TimeoutError):
                sock.recv(100)
    stats = proxy.stats()
    assert (stats["stalled"], stats["by_mode"]["blackhole"]["connections"]) == (2, 1)
    assert stats["by_mode"]["blackhole"]["bytes_dropped"] == 2 * len(b"into the void")
    assert echo.total_received() == len(b"before")  # nothing reached the service


def test_leaving_blackhole_resets_the_stalled_and_lets_new_connections_through(
    proxy: ProxyHandle,
) -> None:
    live = connect(proxy)
    assert roundtrip(live, b"before") == b"before"
    proxy.set_mode("blackhole")
    stalled = connect(proxy)
    # The kernel completes a handshake before the proxy accepts it: wait until it has.
    wait_for(lambda: proxy.stats()["stalled"] == 2, timeout=5)
    proxy.set_mode("up")
    for sock in (live, stalled):
        with sock:
            assert read_until_broken(sock) == (b"", ConnectionResetError)
    with connect(proxy) as fresh:
        assert roundtrip(fresh, b"after") == b"after"
    stats = proxy.stats()
    assert (stats["stalled"], stats["by_mode"]["blackhole"]["resets"]) == (0, 2)


def test_latency_delays_each_direction_and_keeps_the_order(proxy: ProxyHandle) -> None:
    proxy.set_mode("latency", delay=0.2)
    with connect(proxy) as sock:
        started = time.monotonic()
        assert roundtrip(sock, b"x") == b"x"
        assert time.monotonic() - started >= 0.4  # there and back
        chunks = [f"chunk {i};".encode() for i in range(200)]
        for i, chunk in enumerate(chunks):
            if i == 100:
                proxy.set_mode("up")  # what is held back still arrives first
            sock.sendall(chunk)
        assert read_exactly(sock, sum(map(len, chunks))) == b"".join(chunks)
    assert proxy.stats()["by_mode"]["latency"]["connections"] == 1


def test_reset_after_downstream_cuts_the_answer_after_n_bytes(proxy: ProxyHandle) -> None:
    proxy.reset_after(10, direction="downstream")
    with connect(proxy) as sock:
        sock.sendall(b"0123456789abcdefghij")
        assert read_until_broken(sock) == (b"0123456789", ConnectionResetError)
    assert proxy.stats()["by_mode"]["up"]["resets"] == 1


def test_reset_after_upstream_cuts_the_request_after_n_bytes(
    proxy: ProxyHandle, echo: Echo
) -> None:
    with connect(proxy) as sock:
        assert roundtrip(sock, b"head") == b"head"
        proxy.reset_after(1000, direction="upstream")  # counts from now, live ones included
        with contextlib.suppress(OSError):
            sock.sendall(b"y" * 5000)
        _, ended = read_until_broken(sock)
    assert ended is ConnectionResetError
    wait_for(lambda: echo.total_received() == 1004, timeout=5)
    assert bytes(echo.received[0]) == b"head" + b"y" * 1000


def test_reset_after_times_disarms_once_it_fired(proxy: ProxyHandle) -> None:
    proxy.reset_after(0, times=1)
    with connect(proxy) as first:
        first.sendall(b"cut")
        assert read_until_broken(first)[1] is ConnectionResetError
    with connect(proxy) as second:
        assert roundtrip(second, b"whole") == b"whole"
    assert proxy.stats()["reset_rule"] is None


def test_set_mode_disarms_the_reset_rule(proxy: ProxyHandle) -> None:
    proxy.reset_after(0)
    proxy.set_mode("up")
    with connect(proxy) as sock:
        assert roundtrip(sock, b"kept") == b"kept"


def test_drop_resets_the_live_connections_and_keeps_the_mode(proxy: ProxyHandle) -> None:
    live = [connect(proxy) for _ in range(3)]
    for sock in live:
        assert roundtrip(sock, b"hi") == b"hi"
    assert proxy.drop() == 3
    for sock in live:
        with sock:
            assert read_until_broken(sock)[1] is ConnectionResetError
    with connect(proxy) as fresh:
        assert roundtrip(fresh, b"still up") == b"still up"


def test_a_half_closed_connection_stays_half_open(proxy: ProxyHandle) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)  # the echo server only closes once it sees this EOF
        assert read_until_broken(sock) == (b"last words", None)


def test_an_unreachable_upstream_resets_the_client(host: ProxyThread) -> None:
    proxy = host.add("nobody", ("127.0.0.1", free_port()))
    # The reset may come so fast that the client's own connect() reports it.
    with pytest.raises(ConnectionResetError), connect(proxy) as sock:
        sock.recv(1)
    assert proxy.stats()["by_mode"]["up"]["upstream_failures"] == 1


def test_hundreds_of_concurrent_connections(proxy: ProxyHandle) -> None:
    clients = [connect(proxy) for _ in range(300)]
    for i, sock in enumerate(clients):
        sock.sendall(f"client {i}".encode())
    answers = [read_exactly(sock, len(f"client {i}")) for i, sock in enumerate(clients)]
    assert answers == [f"client {i}".encode() for i in range(300)]
    assert proxy.stats()["live"] == 300
    for sock in clients:
        sock.close()
    wait_for(lambda: proxy.stats()["live"] == 0, timeout=10)


@pytest.mark.parametrize(
    ("mode", "delay"), [("sideways", 0.0), ("latency", 0.0), ("up", 0.5), ("refuse", 1.0)]
)
def test_bad_modes_are_refused(proxy: ProxyHandle, mode: str, delay: float) -> None:
    with pytest.raises(ProxyError):
        proxy.set_mode(mode, delay)
    assert proxy.stats()["mode"] == "up"


def test_bad_commands_are_refused(host: ProxyThread, proxy: ProxyHandle) -> None:
    with pytest.raises(ProxyError):
        proxy.reset_after(-1)
    with pytest.raises(ProxyError):
        proxy.reset_after(10, direction="sideways")
    with pytest.raises(ProxyError):
        host.add("echo", ("127.0.0.1", 1))
    with pytest.raises(ProxyError):
        host.call({"op": "stats", "name": "nobody"})
    with pytest.raises(ProxyError):
        host.call({"op": "explode", "name": "echo"})


def test_a_proxy_process_is_driven_over_its_control_channel(tmp_path: Path, echo: Echo) -> None:
    with ProxyProcess(tmp_path).start() as host:
        proxy = host.add("echo", echo.address)
        with connect(proxy) as sock:
            assert roundtrip(sock, b"remote") == b"remote"
        proxy.set_mode("refuse")
        with pytest.raises(ConnectionRefusedError):
            connect(proxy)
        proxy.set_mode("up")
        with connect(proxy) as sock:
            assert roundtrip(sock, b"back") == b"back"
        with pytest.raises(ProxyError, match="mode must be one of"):
            proxy.set_mode("sideways")
        assert host.stats()["echo"]["by_mode"]["up"]["connections"] == 2


def test_urls_are_pointed_at_the_proxy_with_everything_else_kept() -> None:
    url = "postgresql+psycopg://postgres:pw@db.internal/kling?sslmode=disable"
    assert upstream_of(url) == ("db.internal", 5432)
    assert upstream_of("redis://127.0.0.1:6390/0") == ("127.0.0.1", 6390)
    assert upstream_of("https://api.wavespeed.ai") == ("api.wavespeed.ai", 443)
    assert rewrite(url, "127.0.0.1", 4000) == (
        "postgresql+psycopg://postgres:pw@127.0.0.1:4000/kling?sslmode=disable"
    )
    assert rewrite("http://127.0.0.1:9000", "127.0.0.1", 4001) == "http://127.0.0.1:4001"
