"""Real clients of the embedded Redis, PostgreSQL and simulator through a fault proxy: each
sees a timeout in `blackhole`, a refused connection in `refuse`, and works again after `up`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sandbox.faultproxy import ProxyHandle, ProxyThread, upstream_of
from sandbox.stack import Stack
from tests.support import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def host() -> Iterator[ProxyThread]:
    with ProxyThread() as running:
        yield running


def proxy_for(host: ProxyThread, stack: Stack, setting: str) -> tuple[ProxyHandle, str]:
    """A proxy in front of the service `setting` names, and that URL pointed at it."""
    url = stack.direct_env[setting]
    proxy = host.add(setting.lower(), upstream_of(url))
    return proxy, proxy.rewrite(url)


def test_the_default_stack_has_no_proxies(stack: Stack) -> None:
    assert stack.proxies == {} and stack.proxy_host is None
    assert stack.env == stack.direct_env
    assert stack.info["proxies"] == {}


def test_redis_times_out_in_blackhole_is_refused_in_refuse_and_recovers(
    host: ProxyThread, stack: Stack
) -> None:
    proxy, url = proxy_for(host, stack, "REDIS_URL")
    client = redis.Redis.from_url(
        url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    assert client.ping()
    proxy.set_mode("blackhole")
    with pytest.raises(redis.TimeoutError):
        client.ping()
    proxy.set_mode("refuse")
    with pytest.raises(redis.ConnectionError, match="refused"):
        client.ping()
    proxy.set_mode("up")
    assert client.ping()
    client.close()


def test_postgres_hangs_in_blackhole_until_up_breaks_the_connection(
    host: ProxyThread, stack: Stack
) -> None:
    proxy, url = proxy_for(host, stack, "DATABASE_URL")
    dsn = url.replace("+psycopg", "")
    conn = psycopg.connect(dsn, autocommit=True)
    assert conn.execute("SELECT 1").fetchone() == (1,)
    proxy.set_mode("blackhole")
    outcome: dict[str, Any] = {}

    def query() -> None:
        try:
            outcome["row"] = conn.execute("SELECT 2").fetchone()
        except psycopg.OperationalError as exc:
            outcome["error"] = exc

    waiting = threading.Thread(target=query, daemon=True)
    waiting.start()
    waiting.join(1.0)
    assert waiting.is_alive()  # libpq has no read timeout: the cut cable holds it
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2)  # connects, then the startup goes unanswered
    proxy.set_mode("up")  # the stalled connection is reset, not resumed
    waiting.join(10)
    assert "error" in outcome and "row" not in outcome
    conn.close()
    with psycopg.connect(dsn) as fresh:
        assert fresh.execute("SELECT 3").fetchone() == (3,)
    proxy.set_mode("refuse")
    with pytest.raises(psycopg.OperationalError, match="refused"):
        psycopg.connect(dsn, connect_timeout=2)


def test_http_reads_time_out_in_blackhole_and_connects_fail_in_refuse(
    host: ProxyThread, stack: Stack
) -> None:
    proxy, url = proxy_for(host, stack, "WAVESPEED_BASE_URL")
    with httpx.Client(base_url=url, timeout=httpx.Timeout(0.5)) as client:
        assert client.get("/_sim/health").status_code == 200
        proxy.set_mode("blackhole")
        with pytest.raises(httpx.ReadTimeout):
            client.get("/_sim/health")
        proxy.set_mode("refuse")
        with pytest.raises(httpx.ConnectError):
            client.get("/_sim/health")
        proxy.set_mode("latency", delay=0.05)
        assert client.get("/_sim/health").status_code == 200
    wait_for(lambda: proxy.stats()["live"] == 0, timeout=10)
    counted = proxy.stats()["by_mode"]
    assert counted["latency"]["bytes_downstream"] > 0
    assert counted["blackhole"]["bytes_dropped"] > 0
