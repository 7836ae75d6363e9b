"""Task names, their queues, and the one way the pipeline asks for a task to run."""

from __future__ import annotations

import uuid
from typing import Any, Protocol

SUBMIT = "generation.submit"
RECOVER = "generation.recover"
POLL = "generation.poll"
STORE = "generation.store"
NOTIFY = "generation.notify"
RECONCILE = "maintenance.reconcile"

QUEUES = ("submit", "poll", "store", "notify", "maintenance")

ROUTES: dict[str, str] = {
    SUBMIT: "submit",
    RECOVER: "submit",
    POLL: "poll",
    STORE: "store",
    NOTIFY: "notify",
    RECONCILE: "maintenance",
}


class Dispatcher(Protocol):
    """Publishes a task for a job. Called only after the change that asked for it committed."""

    def __call__(
        self, task: str, job_id: uuid.UUID, *, countdown: float | None = None, **kwargs: Any
    ) -> None: ...


class CeleryDispatcher:
    """Sends by name, so the API can publish without importing the worker's task modules."""

    def __init__(self, celery: Any) -> None:
        self._celery = celery

    def __call__(
        self, task: str, job_id: uuid.UUID, *, countdown: float | None = None, **kwargs: Any
    ) -> None:
        self._celery.send_task(
            task, args=[str(job_id)], kwargs=kwargs, countdown=countdown, queue=ROUTES[task]
        )
