"""The fence around every untrusted URL we fetch or call (producer image URLs, callback URLs).

A URL passes when its scheme is http or https and every address its host resolves to is public
(or opened by the allow-list). The connection then goes to an address from that same answer:
the host is resolved once, inside the connect step, so a DNS answer that changes between a check
and the connection (DNS rebinding) cannot steer us somewhere else. The request itself keeps the
URL's host name, so the Host header, TLS SNI and certificate verification all use the name.

Public API::

    UrlRefused(code, message, *, status=None)   .code: RefusalCode, .message, .status
    UrlPolicy(allow_hosts=(), max_redirects=3, connect_timeout=5.0, read_timeout=15.0,
              total_timeout=30.0, dns_timeout=5.0)
    FetchedBody(content, url, content_type, status)
    is_public_address(address) -> bool
    system_resolver(host, port) -> list[str]
    UrlGuard(policy, resolver=None, *, network_backend=None, ssl_context=None)
        .check(url) -> list[IPv4Address | IPv6Address]     vet only, nothing is sent
        .fetch(url, *, max_bytes) -> FetchedBody             GET, redirects followed and vetted
        .post(url, *, content, headers, timeout=None) -> httpx.Response
                                                             POST, redirects never followed
        .close()
    POST_ANSWER_LIMIT; types IPAddress, Resolver ((host, port) -> address strings), RefusalCode

Error codes (`UrlRefused.code`): ``invalid_url``, ``scheme_not_allowed``, ``host_not_public``,
``unresolvable``, ``too_many_redirects``, ``redirect_refused``, ``too_large``, ``timeout``,
``unreachable`` (connection refused or broken, TLS verification failed, protocol error) and
``bad_status`` (`fetch` only: a non-2xx final answer; `UrlRefused.status` holds it).

`post` raises no ``bad_status``: it returns whatever answered, 3xx included, for the caller to
judge. Its body is the first `POST_ANSWER_LIMIT` bytes, as sent. Bodies are never decompressed:
we ask for ``Accept-Encoding: identity`` and read raw, so a small gzip bomb cannot expand past
the size bound. No cookie an answer sets is kept or sent again: one guard serves every tenant
of its process.

Time: `connect_timeout` bounds each connection attempt and TLS handshake, `read_timeout` each
socket read or write, and `total_timeout` (or `post(timeout=...)`) the whole call, redirects and
body included; every socket operation is clamped to what is left of it. A DNS lookup gives up
after `dns_timeout` (``unresolvable``): it runs on a small thread pool of the guard's own, since
the system resolver cannot be interrupted; a lookup that hangs keeps its thread until the
resolver gives up, and once all of them hang further lookups fail fast.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextvars import ContextVar
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Literal

import httpcore
import httpx

IPAddress = IPv4Address | IPv6Address
Resolver = Callable[[str, int], Sequence[str]]
RefusalCode = Literal[
    "invalid_url",
    "scheme_not_allowed",
    "host_not_public",
    "unresolvable",
    "too_many_redirects",
    "redirect_refused",
    "too_large",
    "timeout",
    "unreachable",
    "bad_status",
]

_ALLOWED_SCHEMES = frozenset({"http", "https"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
# A callback receiver's answer only matters for its status; keep a little for the logs.
POST_ANSWER_LIMIT = 64 * 1024
# Headers that describe the body as sent; they no longer hold for the cut, undecoded copy.
_BODY_FRAMING = frozenset({"content-encoding", "content-length", "transfer-encoding"})

_CGNAT = IPv4Network("100.64.0.0/10")
_IPV4_COMPATIBLE = IPv6Network("::/96")
_NAT64 = IPv6Network("64:ff9b::/96")
# Lookups in flight at once per guard; past that they queue (and time out) behind them.
_DNS_THREADS = 8
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?\.?")


class UrlRefused(Exception):
    """The guard would not fetch or call a URL, or the exchange failed; `code` says which way."""

    def __init__(self, code: RefusalCode, message: str, *, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code: RefusalCode = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class UrlPolicy:
    """What the guard lets through, and how long and how far it will go for one call.

    `allow_hosts` opens hosts for local development: a name (``localhost``), an address
    (``127.0.0.1``, ``::1``), a network (``127.0.0.0/8``), each optionally with a port
    (``127.0.0.1:8080``, ``[::1]:8080``, ``localhost:8080``). An allowed name accepts whatever
    it resolves to; an allowed address or network accepts those addresses for any host name.
    Either way the connection is still pinned to the resolved address.
    """

    allow_hosts: tuple[str, ...] = ()
    max_redirects: int = 3
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    total_timeout: float = 30.0
    dns_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.max_redirects < 0:
            raise ValueError("max_redirects must be 0 or more")
        timeouts = (self.connect_timeout, self.read_timeout, self.total_timeout, self.dns_timeout)
        if min(timeouts) <= 0:
            raise ValueError("timeouts must be positive")
        for entry in self.allow_hosts:
            _parse_allow_entry(entry)


@dataclass(frozen=True)
class FetchedBody:
    """A fetched body, with the final URL after redirects and what the server said it is."""

    content: bytes
    url: str
    content_type: str | None
    status: int


# -- addresses -----------------------------------------------------------------------------


def is_public_address(address: IPAddress) -> bool:
    """True if `address` is globally routable unicast, and so safe to connect to.

    IPv6 forms that carry an IPv4 address the packets really go to (IPv4-mapped, IPv4-compatible,
    NAT64) are judged by that IPv4 address; 6to4 and Teredo must be public on both levels.
    """
    if isinstance(address, IPv6Address):
        carried = _carried_ipv4(address)
        if carried is not None:
            return is_public_address(carried)
        if not all(is_public_address(end) for end in _tunnel_endpoints(address)):
            return False
    return _is_global_unicast(address)


def _carried_ipv4(address: IPv6Address) -> IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _IPV4_COMPATIBLE or address in _NAT64:
        return IPv4Address(int(address) & 0xFFFF_FFFF)
    return None


def _tunnel_endpoints(address: IPv6Address) -> list[IPv4Address]:
    if address.sixtofour is not None:
        return [address.sixtofour]
    return list(address.teredo or ())


def _is_global_unicast(address: IPAddress) -> bool:
    # `is_global` alone lets multicast, and on IPv6 the old site-local range, through.
    special = (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )
    if isinstance(address, IPv6Address):
        special = special or address.is_site_local
    else:
        special = special or address in _CGNAT
    return address.is_global and not special


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def system_resolver(host: str, port: int) -> list[str]:
    """Every address, IPv4 and IPv6, the system resolver gives for `host`, in its order."""
    answers = socket.getaddrinfo(host, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(answer[4][0]) for answer in answers))


# -- the allow-list ------------------------------------------------------------------------


@dataclass(frozen=True)
class _AllowRule:
    name: str | None
    network: IPv4Network | IPv6Network | None
    port: int | None

    def allows_name(self, host: str, port: int) -> bool:
        return self.name == _normal_name(host) and self.port in (None, port)

    def allows_address(self, address: IPAddress, port: int) -> bool:
        if self.network is None or self.port not in (None, port):
            return False
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return address in self.network


def _parse_allow_entry(entry: str) -> _AllowRule:
    host, port = _split_port(entry.strip().lower(), entry)
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        if not _HOST_NAME.fullmatch(host):
            raise ValueError(
                f"allow-list entry {entry!r} is not a host, address or network"
            ) from None
        return _AllowRule(name=_normal_name(host), network=None, port=port)
    return _AllowRule(name=None, network=network, port=port)


def _split_port(text: str, entry: str) -> tuple[str, int | None]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"allow-list entry {entry!r} is malformed")
        return host, _port(rest[1:], entry) if rest else None
    if text.count(":") == 1:  # host:port; a bare IPv6 address has two colons or more
        host, _, port = text.partition(":")
        return host, _port(port, entry)
    return text, None


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"allow-list entry {entry!r} has a bad port")
    return int(text)


def _normal_name(host: str) -> str:
    return host.lower().rstrip(".")


# -- the overall deadline ------------------------------------------------------------------

# The deadline of the call running in this thread. Streams read it on every operation, so a
# pooled connection reused by a later call honours that call's deadline, not its creator's.
_DEADLINE: ContextVar[float | None] = ContextVar("urlguard_deadline", default=None)


@contextlib.contextmanager
def _deadline_after(seconds: float) -> Iterator[None]:
    token = _DEADLINE.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _clamped(timeout: float | None, expired: type[httpcore.TimeoutException]) -> float | None:
    """`timeout`, shortened to what is left before the deadline; `expired` once it has passed."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the overall deadline passed")
    return left if timeout is None else min(timeout, left)


# -- pinned connections --------------------------------------------------------------------


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every operation also ends by the call's overall deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _clamped(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _clamped(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _clamped(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Vets a host when httpcore opens a connection to it, then dials the vetted address.

    httpcore hands us the URL's host name; we resolve it once, vet every answer and connect to
    one of those exact addresses, so nothing resolves the name again between check and connect.
    TLS is started afterwards by httpcore with the host name as SNI and for certificate checks.
    """

    def __init__(
        self, vet: Callable[[str, int], list[IPAddress]], inner: httpcore.NetworkBackend
    ) -> None:
        self._vet = vet
        self._inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        failure: httpcore.TimeoutException | httpcore.NetworkError | None = None
        for address in self._vet(host, port):
            try:
                attempt = _clamped(timeout, httpcore.ConnectTimeout)
                stream = self._inner.connect_tcp(
                    str(address), port, attempt, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc  # the next vetted address may answer
                continue
            return _DeadlineStream(stream)
        assert failure is not None, "vetting returns at least one address"
        raise failure

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("the URL guard only opens TCP connections")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _PinnedTransport(httpx.HTTPTransport):
    """httpx's own transport, with its connection pool dialling through `_PinnedBackend`."""

    def __init__(self, backend: httpcore.NetworkBackend, ssl_context: ssl.SSLContext) -> None:
        super().__init__(verify=ssl_context, trust_env=False)
        # httpx 0.28 has no setting for the network backend, so replace the pool it built with
        # the same pool on ours. Fail loudly if httpx renames the attribute: leaving its own pool
        # in place would silently connect to wherever the name resolves at connect time.
        if not isinstance(getattr(self, "_pool", None), httpcore.ConnectionPool):
            raise RuntimeError("httpx.HTTPTransport no longer keeps its pool in _pool")
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=backend,
        )


# -- the guard -----------------------------------------------------------------------------


class NoCookies(http.cookiejar.CookieJar):
    """A cookie jar that keeps nothing (httpx has no option for it). One guard serves every
    tenant in its process: a cookie one tenant's receiver or image host set would otherwise
    go with the next call to that host, whoever's it is, and a hostile one could fill the
    jar for as long as the process lives."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        pass


class UrlGuard:
    """Fetches and calls untrusted URLs, only ever connecting to addresses it has just vetted.

    Built once per process and shared; it keeps a connection pool, so `close` it at shutdown.
    It builds its own HTTP client on purpose: pinning lives in the client's transport, so a
    client passed in could bypass it. Tests pass a `network_backend` (which opens the raw TCP
    connections to the vetted address), a `resolver` or an `ssl_context` instead.
    """

    def __init__(
        self,
        policy: UrlPolicy,
        resolver: Resolver | None = None,
        *,
        network_backend: httpcore.NetworkBackend | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.policy = policy
        self._allow = tuple(_parse_allow_entry(entry) for entry in policy.allow_hosts)
        self._resolve: Resolver = resolver or system_resolver
        self._dns = ThreadPoolExecutor(_DNS_THREADS, thread_name_prefix="urlguard-dns")
        backend = _PinnedBackend(self._vet, network_backend or httpcore.SyncBackend())
        transport = _PinnedTransport(backend, ssl_context or httpx.create_ssl_context())
        self._client = httpx.Client(
            transport=transport,
            trust_env=False,  # proxies and .netrc from the environment stay out of it
            cookies=NoCookies(),
            follow_redirects=False,
            headers={"Accept-Encoding": "identity"},
            timeout=httpx.Timeout(
                connect=policy.connect_timeout,
                read=policy.read_timeout,
                write=policy.read_timeout,
                pool=policy.connect_timeout,
            ),
        )

    def check(self, url: str) -> list[IPAddress]:
        """The vetted addresses of `url`'s host, or `UrlRefused`. Sends nothing.

        `fetch` and `post` vet again as they connect, so a passed check is not a licence.
        """
        target = _parse(url)
        # The ASCII (IDNA) form is the one httpcore hands to the connect step; vet the same.
        host = target.raw_host.decode("ascii")
        return self._vet(host, target.port or _DEFAULT_PORTS[target.scheme])

    def fetch(self, url: str, *, max_bytes: int) -> FetchedBody:
        """GET `url`, following up to `policy.max_redirects` redirects, each hop vetted anew.

        A body over `max_bytes` raises ``too_large`` and a final non-2xx answer ``bad_status``.
        With `max_redirects` 0 any redirect raises ``redirect_refused``.
        """
        target = _parse(url)
        with _deadline_after(self.policy.total_timeout):
            for _ in range(self.policy.max_redirects + 1):
                with self._exchange("GET", target) as response:
                    if not response.is_redirect:
                        return _fetched(response, max_bytes)
                    target = _parse(str(response.url.join(response.headers["location"])))
        if self.policy.max_redirects == 0:
            raise UrlRefused("redirect_refused", f"{url} redirects, and redirects are off")
        raise UrlRefused(
            "too_many_redirects", f"{url} redirects more than {self.policy.max_redirects} times"
        )

    def post(
        self,
        url: str,
        *,
        content: bytes,
        headers: Mapping[str, str],
        timeout: float | None = None,
    ) -> httpx.Response:
        """POST `content` to `url` and return the answer as it came, redirects included.

        `timeout` bounds the whole call (default `policy.total_timeout`). The answer is read
        and closed: its body is the first `POST_ANSWER_LIMIT` bytes, as sent.
        """
        target = _parse(url)
        seconds = self.policy.total_timeout if timeout is None else timeout
        with (
            _deadline_after(seconds),
            self._exchange("POST", target, content=content, headers=headers) as response,
        ):
            return _cut_copy(response, POST_ANSWER_LIMIT)

    def close(self) -> None:
        """Close pooled connections."""
        self._client.close()
        self._dns.shutdown(wait=False, cancel_futures=True)

    def _vet(self, host: str, port: int) -> list[IPAddress]:
        addresses = self._addresses_of(host, port)
        if any(rule.allows_name(host, port) for rule in self._allow):
            return addresses
        for address in addresses:
            if not (is_public_address(address) or self._allows(address, port)):
                raise UrlRefused("host_not_public", f"{host} resolves to non-public {address}")
        return addresses

    def _allows(self, address: IPAddress, port: int) -> bool:
        return any(rule.allows_address(address, port) for rule in self._allow)

    def _addresses_of(self, host: str, port: int) -> list[IPAddress]:
        literal = _literal_address(host)
        if literal is not None:
            return [literal]
        lookup = self._dns.submit(self._resolve, host, port)
        try:
            answers = lookup.result(timeout=self.policy.dns_timeout)
            addresses = [ipaddress.ip_address(answer) for answer in answers]
        except FutureTimeout as exc:
            lookup.cancel()
            message = f"{host} did not resolve within {self.policy.dns_timeout:g}s"
            raise UrlRefused("unresolvable", message) from exc
        except (OSError, UnicodeError, ValueError) as exc:
            raise UrlRefused("unresolvable", f"{host} does not resolve: {exc}") from exc
        if not addresses:
            raise UrlRefused("unresolvable", f"{host} has no addresses")
        return addresses

    @contextlib.contextmanager
    def _exchange(self, method: str, url: httpx.URL, **kwargs: Any) -> Iterator[httpx.Response]:
        """Send one request and stream its answer; transport failures become `UrlRefused`."""
        with _translated_errors(str(url)):
            request = self._client.build_request(method, url, **kwargs)
            response = self._client.send(request, stream=True)
            try:
                yield response
            finally:
                response.close()


def _parse(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UrlRefused("invalid_url", f"{url!r} is not a valid URL: {exc}") from exc
    if parsed.scheme not in _ALLOWED_SCHEMES:
        raise UrlRefused("scheme_not_allowed", f"{url!r}: only http and https are allowed")
    if not parsed.host:
        raise UrlRefused("invalid_url", f"{url!r} has no host")
    return parsed


@contextlib.contextmanager
def _translated_errors(url: str) -> Iterator[None]:
    try:
        yield
    except httpx.TimeoutException as exc:
        raise UrlRefused("timeout", f"{url} did not answer in time ({exc})") from exc
    except httpx.TransportError as exc:
        raise UrlRefused("unreachable", f"{url} cannot be reached: {exc!r}") from exc
    except httpx.InvalidURL as exc:
        raise UrlRefused("invalid_url", f"{url} redirects to an invalid URL: {exc}") from exc


def _fetched(response: httpx.Response, max_bytes: int) -> FetchedBody:
    if not response.is_success:
        raise UrlRefused(
            "bad_status",
            f"{response.url} answered {response.status_code}",
            status=response.status_code,
        )
    return FetchedBody(
        content=_read_bounded(response, max_bytes),
        url=str(response.url),
        content_type=response.headers.get("content-type"),
        status=response.status_code,
    )


def _read_bounded(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise UrlRefused("too_large", f"the answer is {declared} bytes; the limit is {max_bytes}")
    body = bytearray()
    for chunk in response.iter_raw():
        body += chunk
        if len(body) > max_bytes:
            raise UrlRefused("too_large", f"the answer is over the limit of {max_bytes} bytes")
    return bytes(body)


def _cut_copy(response: httpx.Response, limit: int) -> httpx.Response:
    """A closed, in-memory copy of `response` holding at most `limit` bytes of its raw body."""
    body = bytearray()
    for chunk in response.iter_raw():
        body += chunk
        if len(body) >= limit:
            break  # closing the response now drops the rest with the connection
    headers = [
        (name, value)
        for name, value in response.headers.multi_items()
        if name.lower() not in _BODY_FRAMING
    ]
    return httpx.Response(
        response.status_code, headers=headers, content=bytes(body[:limit]), request=response.request
    )
