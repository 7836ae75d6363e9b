"""The simulator's webhooks under a burst of completions: bounded in flight, none dropped, each
signed when it is sent (not when it started waiting)."""

from __future__ import annotations

import asyncio

import httpx

from sandbox.wavespeed.faults import FaultInjector
from sandbox.wavespeed.store import Prediction
from sandbox.wavespeed.webhooks import WebhookSender

SECRET = "whsec_c2ltdWxhdG9yLWRldmVsb3BtZW50LXNlY3JldA"


class SlowReceiver:
    """A receiver that takes a moment per request and notes how many it holds at once."""

    def __init__(self) -> None:
        self.in_flight = self.peak = self.received = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(0.005)
            self.received += 1
            return httpx.Response(204)
        finally:
            self.in_flight -= 1


def prediction(number: int) -> Prediction:
    return Prediction(
        id=f"p{number}", model="m", input={}, base_url="http://sim",
        webhook_url="http://receiver/hook", charge_usd=0.45,
    )  # fmt: skip


async def burst(receiver: SlowReceiver, count: int, limit: int) -> list[Prediction]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(receiver)) as http:
        sender = WebhookSender(
            http, FaultInjector(), secret=SECRET, retries=0, backoff_seconds=lambda: 0.0,
            timeout_seconds=5.0, max_in_flight=limit,
        )  # fmt: skip
        finished = [prediction(n) for n in range(count)]
        await asyncio.gather(*(sender.deliver(p, b"{}") for p in finished))
    return finished


def test_a_burst_of_completions_is_delivered_a_bounded_number_at_a_time() -> None:
    receiver = SlowReceiver()
    finished = asyncio.run(burst(receiver, count=300, limit=8))
    assert receiver.received == 300
    assert 1 < receiver.peak <= 8
    assert all([a.status_code for a in p.webhook_attempts] == [204] for p in finished)
