"""Sending generation requests over the broker with a producer's own Celery app.

    from kling_client.celery import send_request

    request_id = send_request(app, api_key="kl_...", image_url="https://...", prompt="...",
                              reply={"task": "myapp.video_ready", "queue": "myapp"})

Nothing here imports Celery: the app is the producer's, so a producer without Celery can
install this package and never load it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

TASK = "generation.request"
QUEUE = "requests"


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def send_request(
    app: Celery,
    *,
    api_key: str,
    request_id: str | None = None,
    reply: Mapping[str, Any] | None = None,
    queue: str = QUEUE,
    **fields: Any,
) -> str:
    """Send `generation.request` with the create's `fields` (`image_url` or `upload_id`,
    `prompt`, ...); answers its `request_id`, generated unless given. Sending it again with
    the same `request_id` never makes a second job: keep it to resend after a broker error.
    `GET /v1/requests/{request_id}` (`Client.get_request`) tells what came of it."""
    request_id = request_id or new_request_id()
    kwargs: dict[str, Any] = {"api_key": api_key, "request_id": request_id, **fields}
    if reply is not None:
        kwargs["reply"] = dict(reply)
    # JSON only: the product refuses pickled messages, whatever the app's default.
    app.send_task(TASK, kwargs=kwargs, queue=queue, serializer="json")
    return request_id
