"""The URL guard without sockets: the address table, schemes, the allow-list, numeric hosts and
DNS rebinding. Connections go to a recording network backend that answers canned HTTP."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore
import httpx
import pytest

from workers.urlguard import UrlGuard, UrlPolicy, UrlRefused, is_public_address

OK_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 3\r\n"
    b"Connection: close\r\n\r\npng"
)

REFUSED = [
    "127.0.0.1",
    "127.255.255.254",
    "10.0.0.1",
    "10.255.255.255",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "169.254.0.1",
    "100.64.0.1",  # CGNAT
    "100.127.255.254",
    "0.0.0.0",
    "0.1.2.3",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.1",
    "198.18.0.1",
    "::1",
    "::",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "fe80::1%eth0",
    "fec0::1",
    "ff02::1",
    "ff0e::1",
    "2001:db8::1",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:169.254.169.254",
    "::ffff:10.0.0.1",
    "::127.0.0.1",  # IPv4-compatible
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
]

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "172.32.0.1",
    "100.128.0.1",
    "2606:4700:4700::1111",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",
]


class CannedStream(httpcore.NetworkStream):
    """One connection that records what was sent and answers with canned bytes."""

    def __init__(self, answer: bytes) -> None:
        self.sent = bytearray()
        self._pending = answer

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        chunk, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return chunk

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.sent += buffer

    def close(self) -> None:
        pass


class RecordingBackend(httpcore.NetworkBackend):
    """Records every address dialled; the ones in `refusing` refuse the connection."""

    def __init__(self, answer: bytes = OK_ANSWER, refusing: Iterable[str] = ()) -> None:
        self.dialled: list[tuple[str, int]] = []
        self.streams: list[CannedStream] = []
        self._answer = answer
        self._refusing = set(refusing)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        self.dialled.append((host, port))
        if host in self._refusing:
            raise httpcore.ConnectError("connection refused")
        stream = CannedStream(self._answer)
        self.streams.append(stream)
        return stream


class ScriptedResolver:
    """Gives each lookup the next scripted answer (the last one repeats) and records lookups."""

    def __init__(self, *answers: list[str]) -> None:
        self.lookups: list[str] = []
        self._answers = list(answers)

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        return self._answers.pop(0) if len(self._answers) > 1 else self._answers[0]


@pytest.fixture
def backend() -> RecordingBackend:
    return RecordingBackend()


@pytest.fixture(scope="module")
def tls() -> ssl.SSLContext:
    return httpx.create_ssl_context()  # loading the CA bundle is the slow part of a guard


@pytest.fixture
def make_guard(backend: RecordingBackend, tls: ssl.SSLContext) -> Iterator[Any]:
    guards: list[UrlGuard] = []

    def make(resolver: Any = None, **policy: Any) -> UrlGuard:
        guard = UrlGuard(UrlPolicy(**policy), resolver, network_backend=backend, ssl_context=tls)
        guards.append(guard)
        return guard

    yield make
    for guard in guards:
        guard.close()


def refusal(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(UrlRefused) as caught:
        call(*args, **kwargs)
    return caught.value.code


def url_for(address: str) -> str:
    return f"http://[{address}]/" if ":" in address else f"http://{address}/"


# -- the address table ---------------------------------------------------------------------


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_accepted(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", [a for a in REFUSED if "%" not in a])
def test_a_name_resolving_to_a_non_public_address_is_refused(make_guard: Any, address: str) -> None:
    guard = make_guard(ScriptedResolver([address]))
    assert refusal(guard.check, "https://images.example.test/a.png") == "host_not_public"


@pytest.mark.parametrize("address", [a for a in REFUSED if "%" not in a])
def test_a_literal_non_public_host_is_refused(make_guard: Any, address: str) -> None:
    assert refusal(make_guard().check, url_for(address)) == "host_not_public"


def test_a_public_name_returns_its_vetted_addresses(make_guard: Any) -> None:
    guard = make_guard(ScriptedResolver(["93.184.216.34", "2606:4700:4700::1111"]))
    assert guard.check("https://images.example.test/a.png") == [
        ipaddress.ip_address("93.184.216.34"),
        ipaddress.ip_address("2606:4700:4700::1111"),
    ]


def test_one_non_public_address_among_public_ones_refuses_the_host(make_guard: Any) -> None:
    guard = make_guard(ScriptedResolver(["93.184.216.34", "10.0.0.7"]))
    assert refusal(guard.check, "https://images.example.test/") == "host_not_public"


@pytest.mark.parametrize(
    "resolver",
    [
        lambda host, port: (_ for _ in ()).throw(socket.gaierror(-2, "Name or service not known")),
        lambda host, port: [],
        lambda host, port: ["not-an-address"],
    ],
)
def test_a_host_that_does_not_resolve_is_unresolvable(make_guard: Any, resolver: Any) -> None:
    assert refusal(make_guard(resolver).check, "https://nowhere.example.test/") == "unresolvable"


def test_a_dns_lookup_that_hangs_gives_up_at_the_dns_timeout(make_guard: Any) -> None:
    released = threading.Event()

    def hanging(host: str, port: int) -> list[str]:
        released.wait(30)  # the system resolver stuck on an unanswering name server
        return ["93.184.216.34"]

    guard = make_guard(hanging, dns_timeout=0.2)
    try:
        with pytest.raises(UrlRefused) as caught:
            guard.check("https://slow-dns.example.test/")
        assert caught.value.code == "unresolvable" and "within 0.2s" in caught.value.message
    finally:
        released.set()


# -- schemes and malformed URLs ------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://images.example.test/a.png",
        "file:///etc/passwd",
        "gopher://images.example.test/",
        "javascript:alert(1)",
        "data:image/png;base64,iVBORw0KGgo=",
        "//images.example.test/a.png",
        "images.example.test/a.png",
    ],
)
def test_only_http_and_https_are_allowed(make_guard: Any, url: str) -> None:
    guard = make_guard(ScriptedResolver(["93.184.216.34"]))
    assert refusal(guard.check, url) == "scheme_not_allowed"
    assert refusal(guard.fetch, url, max_bytes=10) == "scheme_not_allowed"


@pytest.mark.parametrize("url", ["http:///a.png", "http://[::1/", "http://0177.0.0.1/"])
def test_malformed_urls_are_invalid(make_guard: Any, url: str) -> None:
    assert refusal(make_guard().check, url) == "invalid_url"


# -- numeric host forms --------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433/",
        "http://0x7f.1/",
        "http://0x7f000001/",
        "http://017700000001/",
        "http://127.1/",
        "http://[::ffff:7f00:1]/",
        "http://[0:0:0:0:0:ffff:127.0.0.1]/",
    ],
)
def test_numeric_forms_of_loopback_are_refused(make_guard: Any, backend: Any, url: str) -> None:
    guard = make_guard()  # the system resolver: numeric forms never reach DNS
    assert refusal(guard.check, url) == "host_not_public"
    assert refusal(guard.fetch, url, max_bytes=10) == "host_not_public"
    assert backend.dialled == []


@pytest.mark.parametrize("url", ["http://2130706433/", "http://0x7f.1/", "http://127.1/"])
def test_the_resolver_turns_numeric_forms_into_the_address_they_mean(
    make_guard: Any, url: str
) -> None:
    guard = make_guard(allow_hosts=("127.0.0.1",))
    assert guard.check(url) == [ipaddress.ip_address("127.0.0.1")]


# -- the allow-list ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "url", "answers", "allowed"),
    [
        ("127.0.0.1", "http://127.0.0.1:8080/", ["127.0.0.1"], True),
        ("127.0.0.1", "http://hooks.example.test/", ["127.0.0.1"], True),
        ("127.0.0.1", "http://127.0.0.2/", ["127.0.0.2"], False),
        ("127.0.0.1", "http://hooks.example.test/", ["127.0.0.1", "10.0.0.1"], False),
        ("localhost", "http://localhost:9000/", ["127.0.0.1", "::1"], True),
        ("LOCALHOST.", "http://localhost/", ["127.0.0.1"], True),
        ("localhost", "http://127.0.0.1/", ["127.0.0.1"], False),
        ("localhost:8080", "http://localhost:8080/", ["127.0.0.1"], True),
        ("localhost:8080", "http://localhost:8081/", ["127.0.0.1"], False),
        ("127.0.0.1:8080", "http://127.0.0.1:8080/", ["127.0.0.1"], True),
        ("127.0.0.1:8080", "http://127.0.0.1/", ["127.0.0.1"], False),
        ("127.0.0.1:443", "https://127.0.0.1/", ["127.0.0.1"], True),
        ("127.0.0.0/8", "http://127.3.4.5/", ["127.3.4.5"], True),
        ("127.0.0.0/8", "http://10.0.0.1/", ["10.0.0.1"], False),
        ("10.0.0.0/8", "http://svc.internal.test/", ["10.1.2.3"], True),
        ("127.0.0.1", "http://[::ffff:127.0.0.1]/", ["::ffff:127.0.0.1"], True),
        ("::1", "http://[::1]:8080/", ["::1"], True),
        ("[::1]:8080", "http://[::1]:8080/", ["::1"], True),
        ("[::1]:8080", "http://[::1]:8081/", ["::1"], False),
        ("fd00::/8", "http://[fd00::5]/", ["fd00::5"], True),
    ],
)
def test_allow_list_forms(
    make_guard: Any, entry: str, url: str, answers: list[str], allowed: bool
) -> None:
    guard = make_guard(ScriptedResolver(answers), allow_hosts=(entry,))
    if allowed:
        assert guard.check(url) == [ipaddress.ip_address(a) for a in answers]
    else:
        assert refusal(guard.check, url) == "host_not_public"


@pytest.mark.parametrize(
    "entry", ["", "http://localhost", "127.0.0.1:99999", "localhost:", "a b", "[::1]x", "[::1]:0"]
)
def test_malformed_allow_list_entries_are_rejected_at_start(entry: str) -> None:
    with pytest.raises(ValueError, match="allow-list entry"):
        UrlPolicy(allow_hosts=(entry,))


@pytest.mark.parametrize(
    "policy",
    [{"max_redirects": -1}, {"connect_timeout": 0}, {"read_timeout": -1}, {"total_timeout": 0}],
)
def test_nonsense_limits_are_rejected_at_start(policy: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        UrlPolicy(**policy)


# -- pinning -------------------------------------------------------------------------------


def test_the_connection_goes_to_the_vetted_address_not_a_second_lookup(
    make_guard: Any, backend: RecordingBackend
) -> None:
    # A rebinding name: public on the first lookup, loopback on every lookup after.
    resolver = ScriptedResolver(["93.184.216.34"], ["127.0.0.1"])
    guard = make_guard(resolver)

    fetched = guard.fetch("http://images.example.test/cat.png", max_bytes=100)

    assert fetched.content == b"png"
    assert resolver.lookups == ["images.example.test"]
    assert backend.dialled == [("93.184.216.34", 80)]
    assert b"Host: images.example.test\r\n" in backend.streams[0].sent


def test_a_passed_check_does_not_license_a_rebound_connection(
    make_guard: Any, backend: RecordingBackend
) -> None:
    guard = make_guard(ScriptedResolver(["93.184.216.34"], ["127.0.0.1"]))

    guard.check("http://images.example.test/cat.png")

    assert refusal(guard.fetch, "http://images.example.test/cat.png", max_bytes=100) == (
        "host_not_public"
    )
    assert backend.dialled == []


@pytest.mark.parametrize("backend", [RecordingBackend(refusing={"93.184.216.34"})])
def test_the_next_vetted_address_is_tried_when_one_refuses(
    make_guard: Any, backend: RecordingBackend
) -> None:
    resolver = ScriptedResolver(["93.184.216.34", "93.184.216.35"])

    make_guard(resolver).fetch("http://images.example.test/cat.png", max_bytes=100)

    assert backend.dialled == [("93.184.216.34", 80), ("93.184.216.35", 80)]
    assert resolver.lookups == ["images.example.test"]


TO_METADATA = (
    b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/latest/meta-data/\r\n"
    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
)


@pytest.mark.parametrize("backend", [RecordingBackend(answer=TO_METADATA)])
def test_a_redirect_to_the_metadata_address_is_refused_before_dialling(
    make_guard: Any, backend: RecordingBackend
) -> None:
    guard = make_guard(ScriptedResolver(["93.184.216.34"]))

    code = refusal(guard.fetch, "http://images.example.test/cat.png", max_bytes=100)

    assert code == "host_not_public"
    assert backend.dialled == [("93.184.216.34", 80)]
