"""The broker transport: one Redis client per channel for all its publishes, deliveries and
acknowledgements, and a fresh one when kombu replaces the channel's connection pool."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue

from config.settings import settings_from
from sandbox.stack import Stack
from workers import broker
from workers.celery_app import create_celery


class Built:
    """Counts the synchronous clients a channel builds (each one a real client)."""

    def __init__(self) -> None:
        self.count = 0

    def client_class(self) -> type[redis.Redis]:
        built = self

        class Counted(redis.Redis):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                built.count += 1
                super().__init__(*args, **kwargs)

        return Counted


@pytest.fixture
def connection(stack: Stack) -> Iterator[Connection]:
    app = create_celery(settings_from(stack.env))
    with app.connection_for_write() as conn:
        yield conn


def round_trip(channel: Any, queue: Queue, count: int) -> list[str]:
    """Publish `count` messages to `queue` and take each back, acknowledged."""
    producer = Producer(channel)
    for n in range(count):
        producer.publish({"n": n}, exchange=queue.exchange, routing_key=queue.routing_key)
    bodies = []
    for _ in range(count):
        message = channel.basic_get(queue.name, no_ack=False)
        assert message is not None
        bodies.append(message.body)
        channel.basic_ack(message.delivery_tag)
    return bodies


def test_a_channel_publishes_takes_and_acknowledges_through_one_client(
    connection: Connection,
) -> None:
    channel = connection.default_channel
    assert isinstance(channel, broker.Channel)
    built = Built()
    async_clients = channel.__dict__.get("client")
    channel.Client = built.client_class()
    queue = Queue(f"broker-test-{id(channel)}", Exchange("broker-test"), "broker-test")
    queue(channel).declare()

    assert len(round_trip(channel, queue, 5)) == 5
    assert built.count == 1  # kombu's own channel builds one or more for every command
    assert channel.__dict__.get("client") is async_clients  # the event loop's is untouched

    # What a fork or a lost connection does: kombu drops the pool; a client on the new one.
    channel._disconnect_pools()
    assert len(round_trip(channel, queue, 2)) == 2
    assert built.count == 2
    queue(channel).delete()


def test_a_tls_broker_keeps_kombus_transport() -> None:
    # kombu sets TLS up from the rediss:// scheme, which naming a transport class bypasses.
    tls = create_celery(settings_from({"REDIS_URL": "rediss://cache.internal:6380/0"}))
    assert tls.conf.broker_transport is None
    plain = create_celery(settings_from({"REDIS_URL": "redis://cache.internal:6379/0"}))
    assert plain.conf.broker_transport == broker.TRANSPORT
