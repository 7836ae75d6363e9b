"""CPU per broker message: `workers.broker`'s Redis transport against kombu's own (the
baseline), alternated in one process on one embedded Redis (or `REDIS_URL`).

    python -m bench.broker [--messages 2000] [--rounds 4]

A message is published (a task's next message), taken and acknowledged (the worker's parent
acknowledges each task run). A worker takes its messages by BRPOP on a client of its own, which
the transport leaves as it is, so this overstates the gain for a worker: `bench.inflight
--profile-dir` shows a worker's share. Each round
runs both transports, so both see the same minutes of a noisy machine; the figure is the
lowest round of each, and the ratio baseline ÷ ours (above 1: ours costs less).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kombu import Connection, Exchange, Producer, Queue

from bench.harness import emit
from sandbox.services import EmbeddedRedis
from workers.broker import TRANSPORT

# kombu's own transport for a redis:// URL.
BASELINE = "redis"


def round_trip(channel: Any, queue: Queue, bodies: Sequence[Any]) -> list[Any]:
    """Publish each of `bodies` to `queue`, then take and acknowledge as many messages: the
    messages taken, in order."""
    producer = Producer(channel)
    for body in bodies:
        producer.publish(body, exchange=queue.exchange, routing_key=queue.routing_key)
    taken = []
    for _ in bodies:
        message = channel.basic_get(queue.name, no_ack=False)
        assert message is not None, "a published message was not there to take"
        channel.basic_ack(message.delivery_tag)
        taken.append(message)
    return taken


def cpu_us_per_message(url: str, transport: str, messages: int) -> float:
    """Publish `messages`, then take and acknowledge each; CPU microseconds a message."""
    queue = Queue("bench-broker", Exchange("bench-broker"), "bench-broker")
    bodies = [{"job_id": "0b7e5a52-6f1c-4c44-9a39-2f8f3b6a0c11", "seq": 3}] * messages
    with Connection(url, transport=transport) as connection:
        channel = connection.channel()
        queue(channel).declare()
        began = time.process_time()
        round_trip(channel, queue, bodies)
        spent = time.process_time() - began
        queue(channel).delete()
        channel.close()
    return spent / messages * 1e6


def measure(url: str, messages: int, rounds: int) -> dict[str, object]:
    runs: dict[str, list[float]] = {BASELINE: [], TRANSPORT: []}
    for _ in range(rounds):
        for transport, figures in runs.items():
            figures.append(cpu_us_per_message(url, transport, messages))
    baseline, ours = min(runs[BASELINE]), min(runs[TRANSPORT])
    return {
        "bench": "broker",
        "messages": messages,
        "rounds": rounds,
        "kombu_cpu_us_per_message": round(baseline, 1),
        "workers_broker_cpu_us_per_message": round(ours, 1),
        "ratio_kombu_to_ours": round(baseline / ours, 2),
        "all_rounds_us": {name: [round(x) for x in figures] for name, figures in runs.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    options = parser.parse_args(argv)
    url = os.environ.get("REDIS_URL")
    embedded = None
    if not url:
        embedded = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="kling-bench-broker-"))).start()
        url = embedded.url()
    try:
        result = measure(url, options.messages, options.rounds)
    finally:
        if embedded is not None:
            embedded.stop()
    row = (
        f"| broker | {result['workers_broker_cpu_us_per_message']} CPU µs a message "
        f"| kombu's transport: {result['kombu_cpu_us_per_message']} "
        f"| x{result['ratio_kombu_to_ours']} | {options.messages} messages, "
        f"best of {options.rounds} rounds |"
    )
    emit(result, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
