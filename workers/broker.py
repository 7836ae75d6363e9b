"""kombu's Redis transport, with one synchronous client per channel.

kombu's Redis channel builds a new `redis.Redis` for every message it publishes, delivers or
acknowledges, and redis-py copies its table of response callbacks into each one. On a worker
that is three clients a task run, about 6% of the host's CPU in `bench.inflight`'s profile.
A client over a connection pool is safe to share (it takes a connection from the pool for
each command), so this channel keeps one for as long as its pool lives. A new pool (after a
fork or a lost connection, when kombu drops the old one) gets a new client.

Only plain `redis://` brokers use it (`transport_for`): kombu sets up TLS itself for
`rediss://` by the URL's scheme, which naming a transport class would bypass.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from kombu.transport import redis as kombu_redis

TRANSPORT = "workers.broker:Transport"


class Channel(kombu_redis.Channel):
    # The synchronous client, and through it the pool it was built on.
    _shared: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        # The asynchronous client (BRPOP in the event loop) stays kombu's: one per channel.
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        if self._shared is None or self._shared.connection_pool is not pool:
            self._shared = super()._create_client()
        return self._shared


class Transport(kombu_redis.Transport):
    Channel = Channel


def transport_for(broker_url: str) -> str | None:
    """The transport to name for `broker_url`: this module's for `redis://`, else kombu's
    choice by scheme (None)."""
    return TRANSPORT if urlsplit(broker_url).scheme == "redis" else None
