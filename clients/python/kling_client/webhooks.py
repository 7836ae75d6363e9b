"""Verifying the callbacks the API sends (Standard Webhooks)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


class InvalidWebhook(ValueError):
    """A callback whose signature or timestamp does not verify."""


def verify_webhook(secret: str, body: bytes | str, headers: Mapping[str, str]) -> dict[str, Any]:
    """Verify a callback (signature, 5-minute timestamp tolerance) and answer its event:
    `{"type": "generation.completed", "timestamp": ..., "data": job}`. Pass the body exactly
    as received: a re-serialised one does not verify."""
    try:
        # Header names in any case: frameworks differ in how they hand them over.
        return dict(Webhook(secret).verify(body, {k.lower(): v for k, v in headers.items()}))
    except WebhookVerificationError as exc:
        raise InvalidWebhook(str(exc)) from exc
