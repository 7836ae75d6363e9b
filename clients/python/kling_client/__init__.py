"""The kling API for Python producers: sync (`Client`) and asyncio (`AsyncClient`).

from kling_client import Client

with Client("https://kling.example.com", api_key) as kling:
    job = kling.create(image_url="https://example.com/me.jpg", prompt="slow push-in")
    job = kling.wait(job["id"])
    kling.download(job["id"], "clip.mp4")

# in your callback receiver:
event = verify_webhook(signing_secret, request_body, request_headers)
"""

from kling_client.aio import AsyncClient
from kling_client.client import Client
from kling_client.errors import (
    AuthenticationError,
    BadRequest,
    Conflict,
    InvalidRequest,
    KlingConnectionError,
    KlingError,
    NotFound,
    PayloadTooLarge,
    PaymentRequired,
    PermissionDenied,
    RateLimited,
    ServerError,
    Unavailable,
)
from kling_client.retries import Retries, new_idempotency_key
from kling_client.types import TERMINAL, Generation
from kling_client.webhooks import InvalidWebhook, verify_webhook

__all__ = [
    "TERMINAL",
    "AsyncClient",
    "AuthenticationError",
    "BadRequest",
    "Client",
    "Conflict",
    "Generation",
    "InvalidRequest",
    "InvalidWebhook",
    "KlingConnectionError",
    "KlingError",
    "NotFound",
    "PayloadTooLarge",
    "PaymentRequired",
    "PermissionDenied",
    "RateLimited",
    "Retries",
    "ServerError",
    "Unavailable",
    "new_idempotency_key",
    "verify_webhook",
]
