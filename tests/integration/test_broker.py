"""The broker transport: one Redis client per channel for all its publishes, deliveries and
acknowledgements, and a fresh one when kombu replaces the channel's connection pool."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue

from bench.broker import round_trip
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


@pytest.fixture
def queue(connection: Connection) -> Iterator[Queue]:
    queue = Queue(f"broker-test-{id(connection)}", Exchange("broker-test"), "broker-test")
    queue(connection.default_channel).declare()
    yield queue
    queue(connection.default_channel).delete()


def taken_back(channel: Any, queue: Queue, count: int) -> list[Any]:
    """Publish `count` messages to `queue`, then take and acknowledge each: the messages."""
    return round_trip(channel, queue, [{"n": n} for n in range(count)])


def settled(channel: Any, queue: Queue, taken: list[Any]) -> bool:
    """Nothing left in the queue, and none of the messages `taken` still unacknowledged (which
    the transport would deliver again after its visibility timeout). Other tests' workers
    share this Redis and its unacknowledged messages: only these count."""
    client = channel.client
    held = [
        tag
        for tag in (message.delivery_tag for message in taken)
        if client.hexists(channel.unacked_key, tag)
        or client.zscore(channel.unacked_index_key, tag) is not None
    ]
    return client.llen(queue.name) == 0 and not held


def test_a_channel_publishes_takes_and_acknowledges_through_one_client(
    connection: Connection, queue: Queue
) -> None:
    channel = connection.default_channel
    assert isinstance(channel, broker.Channel)
    built = Built()
    event_loops = channel.__dict__.get("client")
    channel.Client = built.client_class()

    taken = taken_back(channel, queue, 5)
    assert [message.decode() for message in taken] == [{"n": n} for n in range(5)]
    assert settled(channel, queue, taken)
    # The client that declared the queue serves them all (kombu's own channel builds one or
    # more for every command: 25 here).
    assert built.count == 0
    assert channel.__dict__.get("client") is event_loops  # the event loop's is untouched

    # What a fork does (and a lost connection): kombu drops the pool; a client on the new one.
    channel._after_fork()
    taken = taken_back(channel, queue, 2)
    assert [message.decode() for message in taken] == [{"n": 0}, {"n": 1}]
    assert settled(channel, queue, taken)
    assert built.count == 1
