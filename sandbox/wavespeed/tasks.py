"""A prediction's life after it is accepted: fetch the image, queue for a slot, "infer",
render, finish, then notify and (for failures) refund.

    created ──fetch/check image──> (wait for a concurrency slot) ──> processing ──> completed
       └──────────── 1402 / 1401 ─────────────┘                          └──────> failed

Deleting one (`TaskRunner.delete`) ends it as `deleted` with its outputs gone, and refunds
the share of its charge that the refund rule gives for where it stood: by default all of it
before it started and none once processing. A processing task may not stop at once: it runs
on for `delete_stop_seconds`, and if it completes meanwhile it is charged as completed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import Executor
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog

from sandbox.wavespeed.config import SimulatorConfig
from sandbox.wavespeed.faults import TASK_FAILURE_MESSAGES, FaultInjector
from sandbox.wavespeed.fetch import FetchFailed, fetch_image
from sandbox.wavespeed.limits import SlotGate
from sandbox.wavespeed.payloads import webhook_body
from sandbox.wavespeed.render import Video, full_size_video, placeholder_video, render_video
from sandbox.wavespeed.store import Prediction, Store, media_id_of
from sandbox.wavespeed.validation import ImageRejected, inspect_image
from sandbox.wavespeed.webhooks import WebhookSender

log = structlog.get_logger("sandbox.wavespeed.tasks")

MEDIA_UNREACHABLE = 1402
INVALID_PARAMETER = 1401
INTERNAL_ERROR = 5000

Spawn = Callable[[Coroutine[Any, Any, None]], None]


class TaskFailure(Exception):
    """Ends a task as `failed` with a WaveSpeed error code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TaskRunner:
    """Drives accepted predictions to a terminal status, one coroutine each."""

    def __init__(
        self,
        *,
        config: SimulatorConfig,
        store: Store,
        faults: FaultInjector,
        gate: SlotGate,
        http: httpx.AsyncClient,
        render_pool: Executor,
        webhooks: WebhookSender,
        spawn: Spawn,
    ) -> None:
        self._config = config
        self._store = store
        self._faults = faults
        self._gate = gate
        self._http = http
        self._pool = render_pool
        self._webhooks = webhooks
        self._spawn = spawn

    def start(self, prediction: Prediction) -> None:
        """Run the task in the background; the caller answers the submit meanwhile."""
        self._spawn(self._run(prediction))

    def delete(self, ids: Iterable[str]) -> int:
        """Delete the named predictions; answers how many existed and were not yet deleted
        (nor already stopping)."""
        deleted = 0
        for prediction_id in dict.fromkeys(ids):
            prediction = self._store.get(prediction_id)
            if prediction is None or prediction.status == "deleted" or prediction.stopping:
                continue
            deleted += 1
            if prediction.status == "processing" and self._config.delete_stop_seconds > 0:
                prediction.stopping = True
                self._spawn(self._delete_later(prediction))
            else:
                self._delete_now(prediction)
        return deleted

    async def _delete_later(self, prediction: Prediction) -> None:
        await asyncio.sleep(self._config.delete_stop_seconds)
        self._delete_now(prediction)

    def _delete_now(self, prediction: Prediction) -> None:
        config = self._config
        # Completed work stays charged; a failed task gets its refund on the failure path.
        share = {
            "created": config.delete_refund_unstarted,
            "processing": config.delete_refund_processing,
        }.get(prediction.status, 0.0)
        prediction.mark_deleted()
        self._store.refund(prediction, share)
        log.info("sim.prediction.deleted", prediction_id=prediction.id, refunded_share=share)

    async def _run(self, prediction: Prediction) -> None:
        try:
            await self._work(prediction)
        except TaskFailure as failure:
            if prediction.status != "deleted":
                prediction.fail(failure.code, failure.message)
        except Exception:
            log.exception("sim.task.crashed", prediction_id=prediction.id)
            if prediction.status != "deleted":
                prediction.fail(INTERNAL_ERROR, TASK_FAILURE_MESSAGES[INTERNAL_ERROR])
        if prediction.status in ("completed", "failed"):
            await self._finish(prediction)

    async def _work(self, prediction: Prediction) -> None:
        image = await self._fetch(prediction)
        async with self._gate.slot():
            if prediction.status == "deleted":
                return
            prediction.start()
            await asyncio.sleep(self._inference_seconds())
            code = self._faults.task_failure()
            if code is not None:
                raise TaskFailure(code, TASK_FAILURE_MESSAGES[code])
            video = await self._render(image, prediction)
            if prediction.status != "deleted":
                prediction.nsfw = self._faults.hit("nsfw")
                prediction.complete(video)

    async def _fetch(self, prediction: Prediction) -> bytes:
        config = self._config
        url = prediction.input["image"]
        try:
            data = self._own_upload(prediction.base_url, url) or await fetch_image(
                self._http,
                url,
                max_bytes=config.max_image_bytes,
                timeout_seconds=config.image_fetch_timeout_seconds,
            )
            await asyncio.to_thread(inspect_image, data, config.max_image_bytes)
        except FetchFailed as exc:
            raise TaskFailure(MEDIA_UNREACHABLE, str(exc)) from exc
        except ImageRejected as exc:
            raise TaskFailure(INVALID_PARAMETER, f"Invalid image: {exc}") from exc
        return data

    def _own_upload(self, base_url: str, url: str) -> bytes | None:
        """Media uploaded to this simulator, read from its store as WaveSpeed reads its own
        storage; anything else (or a missing upload) goes through a real HTTP fetch."""
        if not url.startswith(f"{base_url}/_sim/media/"):
            return None
        path = urlsplit(url).path  # a fetch would not send the query or fragment either
        media = self._store.media.get(media_id_of(path))
        return media.data if media is not None and media.path == path else None

    def _inference_seconds(self) -> float:
        bounds = self._faults.profile.inference_seconds
        return self._faults.uniform(bounds) if bounds else self._config.inference_seconds

    async def _render(self, image: bytes, prediction: Prediction) -> Video:
        # Encoding is CPU work; a bounded pool keeps the event loop answering meanwhile.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._video, image, prediction)

    def _video(self, image: bytes, prediction: Prediction) -> Video:
        config, model_input = self._config, prediction.input
        duration = int(model_input["duration"])
        if config.render_mode == "placeholder":
            return Video.of(placeholder_video(duration, fps=config.fps))
        if config.render_mode == "full_size":
            return full_size_video(duration, prediction.id, fps=config.fps)
        width, height = config.resolution
        video = render_video(
            image, model_input["prompt"], float(model_input["guidance_scale"]), duration,
            width=width, height=height, fps=config.fps,
        )  # fmt: skip
        return Video.of(video)

    async def _finish(self, prediction: Prediction) -> None:
        log.info(
            "sim.prediction.finished",
            prediction_id=prediction.id,
            status=prediction.status,
            code=prediction.code,
        )
        if prediction.status == "failed":
            self._spawn(self._refund_later(prediction))
        await self._webhooks.deliver(prediction, webhook_body(prediction))

    async def _refund_later(self, prediction: Prediction) -> None:
        await asyncio.sleep(self._config.refund_delay_seconds)
        self._store.refund(prediction)
