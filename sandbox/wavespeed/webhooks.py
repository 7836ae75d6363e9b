"""Webhooks as WaveSpeed sends them: signed, retried with backoff, sometimes late or twice.

The scheme is WaveSpeed's variant of Standard Webhooks: `webhook-signature: v3,<hex>` where the
hex is HMAC-SHA256 over `"{webhook-id}.{webhook-timestamp}.{body}"`, keyed with the secret
minus its `whsec_` prefix taken as plain UTF-8 text (not base64-decoded).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable

import httpx
import structlog

from sandbox.wavespeed.clock import utcnow
from sandbox.wavespeed.faults import FaultInjector
from sandbox.wavespeed.store import Prediction, WebhookAttempt

log = structlog.get_logger("sandbox.wavespeed.webhooks")


def sign(secret: str, webhook_id: str, timestamp: str, body: bytes) -> str:
    """The `webhook-signature` header value for one delivery."""
    key = secret.removeprefix("whsec_").encode("utf-8")
    message = f"{webhook_id}.{timestamp}.".encode() + body
    return "v3," + hmac.new(key, message, hashlib.sha256).hexdigest()


def signed_headers(secret: str, webhook_id: str, body: bytes, now: float) -> dict[str, str]:
    """Every header of one delivery, signed for the moment `now` (unix seconds)."""
    timestamp = str(int(now))
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": sign(secret, webhook_id, timestamp, body),
    }


class WebhookSender:
    """Delivers a finished prediction to its `?webhook=` URL and records every attempt."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        faults: FaultInjector,
        *,
        secret: str,
        retries: int,
        backoff_seconds: Callable[[], float],
        timeout_seconds: float,
        max_in_flight: int = 32,
    ) -> None:
        self._http = http
        self._faults = faults
        self._secret = secret
        self._retries = retries
        self._backoff_seconds = backoff_seconds
        self._timeout = timeout_seconds
        # A burst of completions waits here rather than inside httpx's pool, which scans
        # every waiting request against every connection whenever one frees: with thousands
        # waiting (10,000 predictions finishing within minutes) the loop spent all its time
        # there and stopped answering the API.
        self._slots = asyncio.Semaphore(max_in_flight)

    async def deliver(self, prediction: Prediction, body: bytes) -> None:
        """Send `body` (the prediction object) until a 2xx or the retries run out."""
        if prediction.webhook_url is None:
            return
        if self._faults.hit("webhook_drop"):
            prediction.webhook_attempts.append(
                WebhookAttempt(at=utcnow(), status_code=None, error="dropped by fault profile")
            )
            return
        delay = self._faults.profile.webhook_delay_ms
        if delay is not None:
            await asyncio.sleep(self._faults.uniform(delay) / 1000)
        delivered = await self._send_with_retries(prediction, body)
        if delivered and self._faults.hit("webhook_duplicate"):
            await self._attempt(prediction, body)

    async def _send_with_retries(self, prediction: Prediction, body: bytes) -> bool:
        for attempt in range(self._retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff_seconds() * 2 ** (attempt - 1))
            if await self._attempt(prediction, body):
                return True
        log.info("sim.webhook.gave_up", prediction_id=prediction.id, attempts=attempt + 1)
        return False

    async def _attempt(self, prediction: Prediction, body: bytes) -> bool:
        assert prediction.webhook_url is not None
        try:
            async with self._slots:
                headers = signed_headers(self._secret, prediction.id, body, time.time())
                response = await self._http.post(
                    prediction.webhook_url, content=body, headers=headers, timeout=self._timeout
                )
        except httpx.HTTPError as exc:
            self._record(prediction, None, f"{type(exc).__name__}: {exc}")
            return False
        ok = response.is_success
        self._record(
            prediction, response.status_code, None if ok else f"HTTP {response.status_code}"
        )
        return ok

    @staticmethod
    def _record(prediction: Prediction, status_code: int | None, error: str | None) -> None:
        prediction.webhook_attempts.append(
            WebhookAttempt(at=utcnow(), status_code=status_code, error=error)
        )
