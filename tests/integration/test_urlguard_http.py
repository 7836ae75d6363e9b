"""The URL guard over real sockets, against a small HTTP(S) server on 127.0.0.1.

Self-contained: no stack, no internet. Fake names (`*.example.test`) resolve to 127.0.0.1
through an injected resolver, and the allow-list opens 127.0.0.1 where a test needs it.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from workers.urlguard import POST_ANSWER_LIMIT, UrlGuard, UrlPolicy, UrlRefused
from workers.wavespeed import make_http_client

pytestmark = pytest.mark.integration

IMAGE = bytes(range(256)) * 4
NAMES = {"hooks.example.test": ["127.0.0.1"], "images.example.test": ["127.0.0.1"]}


@dataclass
class Seen:
    method: str
    path: str
    host: str | None
    body: bytes
    cookie: str | None = None


class Handler(BaseHTTPRequestHandler):
    """A few fixed routes; every request is recorded on the server before it is answered."""

    server: Server

    def do_GET(self) -> None:
        self._record(b"")
        path, query = self._route()
        if path == "/image":
            self._answer(200, IMAGE, content_type="image/png")
        elif path == "/image-cookie":
            self._answer(200, IMAGE, content_type="image/png", cookie="host=tenant-a")
        elif path == "/big":
            self._answer(200, b"x" * 5000)
        elif path == "/big-undeclared":
            self._answer(200, b"x" * 5000, declare_length=False)
        elif path == "/slow":
            time.sleep(1.0)
            self._answer(200, b"late")
        elif path == "/drip":
            self._drip()
        elif path == "/redirect":
            self._redirect(302, query["to"][0])
        elif path == "/loop":
            self._redirect(302, "/loop")
        else:
            self._answer(404, b"no such thing")

    def do_POST(self) -> None:
        self._record(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        path, _ = self._route()
        if path == "/hook":
            self._answer(200, b"thanks")
        elif path == "/hook-cookie":
            self._answer(200, b"thanks", cookie="receiver=tenant-a")
        elif path == "/hook-redirect":
            self._redirect(307, "/hook")
        elif path == "/hook-chatty":
            self._answer(200, b"y" * (POST_ANSWER_LIMIT * 3))
        else:
            self._answer(404, b"no such thing")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def _route(self) -> tuple[str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        return parts.path, parse_qs(parts.query)

    def _record(self, body: bytes) -> None:
        headers = self.headers
        seen = Seen(self.command, self.path, headers.get("Host"), body, headers.get("Cookie"))
        self.server.seen.append(seen)

    def _answer(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "text/plain",
        declare_length: bool = True,
        cookie: str | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if cookie:
            self.send_header("Set-Cookie", f"{cookie}; Path=/")
        if declare_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, status: int, location: str) -> None:
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _drip(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "20")
        self.end_headers()
        for _ in range(20):
            self.wfile.write(b".")
            self.wfile.flush()
            time.sleep(0.1)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a handler still sleeping must not hold up teardown

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.seen: list[Seen] = []
        self.sni: list[str | None] = []
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)
            self.socket = tls.wrap_socket(self.socket, server_side=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up on slow answers is what the timeout tests do


def serve(tls: ssl.SSLContext | None = None) -> Iterator[Server]:
    server = Server(tls)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def server() -> Iterator[Server]:
    yield from serve()


class Resolver:
    """Resolves the fake names to 127.0.0.1 and records every lookup."""

    def __init__(self) -> None:
        self.lookups: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        return NAMES[host]


@pytest.fixture
def resolver() -> Resolver:
    return Resolver()


@pytest.fixture(scope="module")
def ca_bundle() -> ssl.SSLContext:
    return httpx.create_ssl_context()  # loading it is most of what building a guard costs


@pytest.fixture
def make_guard(resolver: Resolver, ca_bundle: ssl.SSLContext) -> Iterator[Callable[..., UrlGuard]]:
    guards: list[UrlGuard] = []

    def make(
        *, resolve: Any = resolver, ssl_context: ssl.SSLContext = ca_bundle, **policy: Any
    ) -> UrlGuard:
        guard = UrlGuard(UrlPolicy(**policy), resolve, ssl_context=ssl_context)
        guards.append(guard)
        return guard

    yield make
    for guard in guards:
        guard.close()


@pytest.fixture
def local_guard(make_guard: Callable[..., UrlGuard]) -> UrlGuard:
    return make_guard(allow_hosts=("127.0.0.1",))


def refusal(call: Callable[..., Any], *args: Any, **kwargs: Any) -> UrlRefused:
    with pytest.raises(UrlRefused) as caught:
        call(*args, **kwargs)
    return caught.value


# -- fetch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "hooks.example.test", "localhost"])
def test_loopback_is_refused_without_the_allow_list(
    make_guard: Callable[..., UrlGuard], server: Server, host: str
) -> None:
    # localhost goes through the real system resolver; the fake names through ours.
    guard = make_guard(resolve=None) if host == "localhost" else make_guard()

    error = refusal(guard.fetch, server.url("/image", host), max_bytes=10_000)

    assert error.code == "host_not_public"
    assert server.seen == []


def test_an_allowed_host_is_fetched(local_guard: UrlGuard, server: Server) -> None:
    fetched = local_guard.fetch(server.url("/image"), max_bytes=len(IMAGE))

    assert fetched.content == IMAGE
    assert fetched.status == 200
    assert fetched.content_type == "image/png"
    assert fetched.url == server.url("/image")


def test_the_host_name_is_kept_while_connecting_to_the_pinned_address(
    local_guard: UrlGuard, server: Server, resolver: Resolver
) -> None:
    local_guard.fetch(server.url("/image", "hooks.example.test"), max_bytes=len(IMAGE))
    local_guard.post(server.url("/hook", "hooks.example.test"), content=b"{}", headers={})

    assert [seen.host for seen in server.seen] == [f"hooks.example.test:{server.port}"] * 2
    assert "hooks.example.test" in resolver.lookups


@pytest.mark.parametrize("path", ["/big", "/big-undeclared"])
def test_a_body_over_the_limit_is_too_large(
    local_guard: UrlGuard, server: Server, path: str
) -> None:
    assert refusal(local_guard.fetch, server.url(path), max_bytes=4999).code == "too_large"
    assert local_guard.fetch(server.url(path), max_bytes=5000).content == b"x" * 5000


def test_a_slow_answer_times_out(make_guard: Callable[..., UrlGuard], server: Server) -> None:
    guard = make_guard(allow_hosts=("127.0.0.1",), read_timeout=0.2)
    started = time.monotonic()

    assert refusal(guard.fetch, server.url("/slow"), max_bytes=100).code == "timeout"
    assert time.monotonic() - started < 0.8


def test_a_dripping_answer_stops_at_the_overall_deadline(
    make_guard: Callable[..., UrlGuard], server: Server
) -> None:
    # Every read is well within the read timeout; only the overall deadline can stop this.
    guard = make_guard(allow_hosts=("127.0.0.1",), read_timeout=1.0, total_timeout=0.4)
    started = time.monotonic()

    assert refusal(guard.fetch, server.url("/drip"), max_bytes=100).code == "timeout"
    assert time.monotonic() - started < 0.9


def test_a_closed_port_is_unreachable(local_guard: UrlGuard) -> None:
    with Server() as idle:  # bound, then closed: nothing listens on its port any more
        url = idle.url("/image")
    assert refusal(local_guard.fetch, url, max_bytes=100).code == "unreachable"


def test_a_non_2xx_answer_is_a_bad_status(local_guard: UrlGuard, server: Server) -> None:
    error = refusal(local_guard.fetch, server.url("/missing"), max_bytes=100)

    assert (error.code, error.status) == ("bad_status", 404)


# -- redirects -----------------------------------------------------------------------------


def test_a_redirect_to_an_allowed_host_is_followed_and_vetted_again(
    local_guard: UrlGuard, server: Server, resolver: Resolver
) -> None:
    target = server.url("/image", "images.example.test")
    start = server.url(f"/redirect?to={target}", "hooks.example.test")

    fetched = local_guard.fetch(start, max_bytes=len(IMAGE))

    assert fetched.content == IMAGE
    assert fetched.url == target
    assert resolver.lookups == ["hooks.example.test", "images.example.test"]
    assert [seen.host for seen in server.seen] == [
        f"hooks.example.test:{server.port}",
        f"images.example.test:{server.port}",
    ]


@pytest.mark.parametrize(
    ("target", "code"),
    [
        ("http://169.254.169.254/latest/meta-data/", "host_not_public"),
        ("http://127.0.0.2:{port}/image", "host_not_public"),
        ("http://[::ffff:10.0.0.1]/", "host_not_public"),
        ("file:///etc/passwd", "scheme_not_allowed"),
    ],
)
def test_a_redirect_to_a_refused_url_is_refused(
    local_guard: UrlGuard, server: Server, target: str, code: str
) -> None:
    start = server.url(f"/redirect?to={target.format(port=server.port)}")

    assert refusal(local_guard.fetch, start, max_bytes=100).code == code
    assert len(server.seen) == 1  # only the redirect itself was asked for


def test_redirects_stop_after_the_limit(
    make_guard: Callable[..., UrlGuard], server: Server
) -> None:
    guard = make_guard(allow_hosts=("127.0.0.1",), max_redirects=2)

    assert refusal(guard.fetch, server.url("/loop"), max_bytes=100).code == "too_many_redirects"
    assert len(server.seen) == 3


def test_redirects_are_refused_when_turned_off(
    make_guard: Callable[..., UrlGuard], server: Server
) -> None:
    guard = make_guard(allow_hosts=("127.0.0.1",), max_redirects=0)
    start = server.url(f"/redirect?to={server.url('/image')}")

    assert refusal(guard.fetch, start, max_bytes=100).code == "redirect_refused"
    assert len(server.seen) == 1


# -- post ----------------------------------------------------------------------------------


def test_post_sends_the_body_and_headers(local_guard: UrlGuard, server: Server) -> None:
    response = local_guard.post(
        server.url("/hook"), content=b'{"ok": true}', headers={"Webhook-Id": "msg_1"}, timeout=2
    )

    assert (response.status_code, response.content) == (200, b"thanks")
    assert server.seen[0].body == b'{"ok": true}'


def test_post_does_not_follow_redirects(local_guard: UrlGuard, server: Server) -> None:
    response = local_guard.post(server.url("/hook-redirect"), content=b"{}", headers={})

    assert response.status_code == 307
    assert response.headers["location"] == "/hook"
    assert [seen.path for seen in server.seen] == ["/hook-redirect"]


def test_post_keeps_only_the_start_of_a_long_answer(local_guard: UrlGuard, server: Server) -> None:
    response = local_guard.post(server.url("/hook-chatty"), content=b"{}", headers={})

    assert response.is_success
    assert response.content == b"y" * POST_ANSWER_LIMIT


def test_no_cookie_an_answer_sets_is_kept_or_sent_again(
    local_guard: UrlGuard, server: Server
) -> None:
    """The guard is shared by every tenant in the process: a cookie one tenant's receiver or
    image host sets must not ride along on the next call to that host, whoever's it is, nor
    pile up in the process for as long as it lives."""
    local_guard.post(server.url("/hook-cookie"), content=b"{}", headers={})
    local_guard.post(server.url("/hook"), content=b"{}", headers={})
    local_guard.fetch(server.url("/image-cookie"), max_bytes=len(IMAGE))
    local_guard.fetch(server.url("/image"), max_bytes=len(IMAGE))

    assert [seen.cookie for seen in server.seen] == [None] * 4


def test_the_wavespeed_and_download_client_keeps_no_cookies_either(server: Server) -> None:
    """It fetches every job's output: a CDN's cookie must not go with the next download."""
    with make_http_client(connect_timeout=5, read_timeout=5) as client:
        client.get(server.url("/image-cookie")).raise_for_status()
        client.get(server.url("/image")).raise_for_status()
    assert [seen.cookie for seen in server.seen] == [None, None]


def test_post_to_a_refused_host_sends_nothing(
    make_guard: Callable[..., UrlGuard], server: Server
) -> None:
    error = refusal(make_guard().post, server.url("/hook"), content=b"{}", headers={})

    assert error.code == "host_not_public"
    assert server.seen == []


# -- TLS -----------------------------------------------------------------------------------


@dataclass
class Certificate:
    chain: Path
    key: Path
    pem: bytes


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for hooks.example.test only."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hooks.example.test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("hooks.example.test")]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (folder / "cert.pem").write_bytes(pem)
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Certificate(folder / "cert.pem", folder / "key.pem", pem)


@pytest.fixture
def tls_server(certificate: Certificate) -> Iterator[Server]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate.chain, certificate.key)
    yield from serve(context)


@pytest.fixture
def tls_guard(make_guard: Callable[..., UrlGuard], certificate: Certificate) -> UrlGuard:
    trust = ssl.create_default_context(cadata=certificate.pem.decode())
    return make_guard(allow_hosts=("127.0.0.1",), ssl_context=trust)


def test_tls_is_verified_against_the_name_while_connecting_to_the_pinned_address(
    tls_guard: UrlGuard, tls_server: Server
) -> None:
    url = tls_server.url("/image", "hooks.example.test", scheme="https")

    assert tls_guard.fetch(url, max_bytes=len(IMAGE)).content == IMAGE
    assert tls_server.sni == ["hooks.example.test"]
    assert tls_server.seen[0].host == f"hooks.example.test:{tls_server.port}"


def test_tls_refuses_a_certificate_for_another_name(
    tls_guard: UrlGuard, tls_server: Server
) -> None:
    url = tls_server.url("/image", "images.example.test", scheme="https")

    assert refusal(tls_guard.fetch, url, max_bytes=len(IMAGE)).code == "unreachable"
    assert tls_server.seen == []
