"""A producer that has only `celery[redis]` installed: it sends generation requests straight
onto the product's broker and runs its own task when each reply comes back.

    pip install 'celery[redis]>=5.4'
    export BROKER_URL=redis://... KLING_API_KEY=kl_...
    python producer.py --image-url https://example.com/portrait.jpg --count 20

Every request carries a `request_id` (the idempotency key: sending it again never makes a
second job) and a `reply`: for each of its events the product sends `myapp.video_ready` to
the `myapp` queue, with the body a callback carries and the event's id as the task id. This
script then works that queue itself until every request has ended, printing one JSON line a
reply.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import uuid
from typing import Any

from celery import Celery
from celery.exceptions import WorkerShutdown

ENDED = {"generation.completed", "generation.failed", "generation.refused",
         "generation.cancelled", "generation.expired"}  # fmt: skip
REPLY = {"task": "myapp.video_ready", "queue": "myapp", "events": sorted(ENDED)}

app = Celery("myapp", broker=os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_serializer="json", accept_content=["json"], worker_hijack_root_logger=False,
    task_acks_late=True, worker_prefetch_multiplier=1,
    # Our own prints are this script's output, not log lines.
    worker_redirect_stdouts=False,
)  # fmt: skip

waiting: set[str] = set()
seen: set[str] = set()


@app.task(name="myapp.video_ready", bind=True)
def video_ready(self: Any, type: str, timestamp: str, data: dict[str, Any]) -> None:
    """One event of a request: its id is the event's (deduplicate on it: delivery is at
    least once)."""
    if self.request.id in seen:
        return
    seen.add(self.request.id)
    request_id = data.get("request_id")
    line = {"webhook_id": self.request.id, "type": type, "request_id": request_id,
            "status": data.get("status"), "video": data.get("video")}  # fmt: skip
    print(json.dumps(line), flush=True)
    waiting.discard(request_id)
    if not waiting:
        raise WorkerShutdown("every request has ended")


def send(api_key: str, image_url: str, count: int, run: str) -> None:
    for n in range(count):
        request_id = f"{run}-{n}"
        waiting.add(request_id)
        app.send_task("generation.request", queue="requests", kwargs={
            "api_key": api_key, "request_id": request_id, "image_url": image_url,
            "prompt": "slow push-in, hair moving in the wind", "duration": 5,
            "metadata": {"example": run}, "reply": REPLY,
        })  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-url", required=True)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=600)
    options = parser.parse_args()
    send(os.environ["KLING_API_KEY"], options.image_url, options.count, uuid.uuid4().hex[:8])
    # Ends the process if some reply never came (the worker below would wait for ever).
    watchdog = threading.Timer(options.timeout, lambda: os._exit(3))
    watchdog.daemon = True
    watchdog.start()
    app.worker_main(["worker", "-Q", "myapp", "-P", "solo", "--loglevel", "WARNING",
                     "--without-heartbeat", "--without-mingle", "--without-gossip"])  # fmt: skip
    return 0 if not waiting else 1


if __name__ == "__main__":
    sys.exit(main())
