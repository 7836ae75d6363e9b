"""The asyncio client, over an `httpx.AsyncClient`: the methods of `Client`, awaited."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, cast, overload

import httpx

from kling_client import _calls
from kling_client._calls import MIN_WAIT_SECONDS, Call
from kling_client.client import Image, _image
from kling_client.errors import connection_error, error_of, retry_after
from kling_client.retries import Retries, new_idempotency_key
from kling_client.types import (
    TERMINAL,
    BatchResult,
    DryRun,
    EventFeed,
    FeedEvent,
    Generation,
    History,
    Page,
    RequestOutcome,
    SigningSecret,
    StateChange,
    Upload,
)


class AsyncClient:
    """The kling API for an asyncio producer: `AsyncClient(base_url, api_key)`, or with both
    from `KLING_API_URL` and `KLING_API_KEY`. Pass `http` to use an `httpx.AsyncClient` of yours
    (the caller then closes it); otherwise the client builds one and `aclose()` closes it.

    Creates without an `idempotency_key` get a generated one (unless `idempotency_keys` is
    false), so that they can be retried: a retry answers the job the first try made."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        http: httpx.AsyncClient | None = None,
        timeout: float = 60.0,
        retries: Retries | None = None,
        idempotency_keys: bool = True,
    ) -> None:
        self.base_url, key = _calls.settings(base_url, api_key)
        self._auth = {"Authorization": f"Bearer {key}"}
        self._owned = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=timeout)
        self.retries = retries or Retries()
        self._generate_keys = idempotency_keys

    async def aclose(self) -> None:
        if self._owned:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _key(self, given: str | None) -> str | None:
        return given or (new_idempotency_key() if self._generate_keys else None)

    # -- sending --------------------------------------------------------------------------

    async def _send(self, call: Call) -> httpx.Response:
        """Send `call`, again as `retries` allows; raise the API's refusal as a KlingError."""
        timeout = httpx.Timeout(30.0, read=call.read_timeout) if call.read_timeout else None
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http.request(
                    call.method, self.base_url + call.path, params=call.params, json=call.json,
                    files=call.files, headers={**self._auth, **call.headers},
                    timeout=timeout or httpx.USE_CLIENT_DEFAULT, follow_redirects=False,
                )  # fmt: skip
            except httpx.TransportError as exc:
                if not self.retries.after_error(exc, call.replayable, attempt):
                    raise connection_error(exc) from exc
                await asyncio.sleep(self.retries.pause(attempt))
                continue
            if response.status_code in call.passes or response.status_code < 400:
                return response
            if not self.retries.after_status(response.status_code, call.replayable, attempt):
                raise error_of(response)
            await asyncio.sleep(self.retries.pause(attempt, retry_after(response)))

    async def _json(self, call: Call) -> Any:
        return (await self._send(call)).json()

    # -- generations ----------------------------------------------------------------------

    async def upload(self, file: Image, *, filename: str | None = None) -> Upload:
        """Upload a jpg/png (a path, or its bytes); create with its `upload_id`."""
        return cast(Upload, await self._json(_calls.upload(*_image(file, filename))))

    async def create(self, *, idempotency_key: str | None = None, **fields: Any) -> Generation:
        """Create a generation: `image_url` or `upload_id`, `prompt`, and any other field of
        `POST /v1/generations`. The same `idempotency_key` again answers the same job."""
        call = _calls.create(fields, self._key(idempotency_key))
        return cast(Generation, await self._json(call))

    async def dry_run(self, **fields: Any) -> DryRun:
        """Every check a create runs, nothing made: the price, budget left and place."""
        return cast(DryRun, await self._json(_calls.dry_run(fields)))

    async def batch(
        self, items: Iterable[Mapping[str, Any]], *, idempotency_key: str | None = None
    ) -> BatchResult:
        """Up to 500 creates in one call, each with its own outcome. With a key, item `i` is
        keyed `<key>/<i>`: the whole batch can be sent again."""
        call = _calls.batch(items, self._key(idempotency_key))
        return cast(BatchResult, await self._json(call))

    @overload
    async def get(
        self, job_id: str, *, wait: float | None = None, since: None = None
    ) -> Generation: ...

    @overload
    async def get(
        self, job_id: str, *, wait: float | None = None, since: str
    ) -> Generation | None: ...

    async def get(
        self, job_id: str, *, wait: float | None = None, since: str | None = None
    ) -> Generation | None:
        """The job. With `wait` (seconds, at most 60), answered once it changes state; with
        `since` (a status), None while it is still in that state."""
        response = await self._send(_calls.get(job_id, wait, since))
        return None if response.status_code == 304 else cast(Generation, response.json())

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float = 1800,
        on_change: Callable[[Generation], None] | None = None,
    ) -> Generation:
        """The job once it has ended (completed, failed, cancelled, expired), long-polling:
        one request a minute while nothing changes. `on_change` sees every new state."""
        deadline = time.monotonic() + timeout
        job = await self.get(job_id)
        while True:
            if on_change:
                on_change(job)
            if job["status"] in TERMINAL:
                return job
            changed = None
            while changed is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{job_id} still {job['status']} after {timeout:.0f}s")
                asked = time.monotonic()
                changed = await self.get(job_id, wait=left, since=job["status"])
                if changed is None and time.monotonic() - asked < MIN_WAIT_SECONDS:
                    # A proxy that drops `Prefer` answers at once: do not spin on it.
                    await asyncio.sleep(MIN_WAIT_SECONDS)
            job = changed

    async def list(
        self,
        *,
        status: str | None = None,
        created_after: datetime | str | None = None,
        created_before: datetime | str | None = None,
        metadata: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page:
        """One page of your generations, newest first; pass `next_cursor` as `cursor`."""
        call = _calls.listing(
            status, created_after, created_before, metadata, request_id, limit, cursor
        )
        return cast(Page, await self._json(call))

    async def iterate(self, **filters: Any) -> AsyncIterator[Generation]:
        """Every generation the filters of `list` match, page after page."""
        cursor = filters.pop("cursor", None)
        while True:
            page = await self.list(cursor=cursor, **filters)
            for item in page["data"]:
                yield item
            cursor = page["next_cursor"]
            if not cursor:
                return

    async def stream(
        self, job_id: str, *, last_event_id: int | None = None
    ) -> AsyncIterator[StateChange]:
        """The job's state changes as they happen (Server-Sent Events), from the first or from
        after `last_event_id`, until it has ended. A dropped connection is resumed where it
        stopped (`Last-Event-ID`), as `retries` allows."""
        url = f"{self.base_url}/v1/generations/{job_id}/events/stream"
        timeout = httpx.Timeout(30.0, read=_calls.STREAM_READ_SECONDS)
        attempt = 0
        while True:
            attempt += 1
            headers = {**self._auth, **_calls.stream_headers(last_event_id)}
            try:
                async with self._http.stream(
                    "GET", url, headers=headers, timeout=timeout
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        if not self.retries.after_status(response.status_code, True, attempt):
                            raise error_of(response)
                        await asyncio.sleep(self.retries.pause(attempt, retry_after(response)))
                        continue
                    parser = _calls.EventParser()
                    async for line in response.aiter_lines():
                        change = parser.feed(line)
                        if change is None:
                            continue
                        last_event_id, attempt = change["id"], 0
                        yield change
                return
            except httpx.TransportError as exc:
                if not self.retries.after_error(exc, True, attempt):
                    raise connection_error(exc) from exc
                await asyncio.sleep(self.retries.pause(attempt))

    async def history(self, job_id: str) -> History:
        """The job's state history and every callback attempt."""
        return cast(History, await self._json(_calls.history(job_id)))

    async def cancel(self, job_id: str) -> Generation:
        return cast(Generation, await self._json(_calls.cancel(job_id)))

    async def retry(self, job_id: str, *, idempotency_key: str | None = None) -> Generation:
        """A new job with the inputs of a finished one, `retry_of` naming it."""
        call = _calls.retry(job_id, self._key(idempotency_key))
        return cast(Generation, await self._json(call))

    async def delete(self, job_id: str) -> Generation:
        """Remove an ended job's image and video; a tombstone stays."""
        return cast(Generation, await self._json(_calls.delete(job_id)))

    async def restore(self, job_id: str) -> Generation:
        """Store again the paid-for video of a job whose store failed."""
        return cast(Generation, await self._json(_calls.restore(job_id)))

    async def download(self, job_id: str, out: str | Path) -> int:
        """Write the stored MP4 to `out` (whole or not at all); answers its size."""
        target = Path(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        attempt = 0
        while True:
            attempt += 1
            # Asked again on each try: the presigned URL lives five minutes.
            location = (await self._send(_calls.video(job_id))).headers["location"]
            try:
                size = await self._fetch(location, partial)
            except httpx.TransportError as exc:
                if not self.retries.after_error(exc, True, attempt):
                    partial.unlink(missing_ok=True)
                    raise connection_error(exc) from exc
                await asyncio.sleep(self.retries.pause(attempt))
                continue
            partial.replace(target)
            return size

    async def _fetch(self, url: str, into: Path) -> int:
        # No Authorization header: the URL is presigned, and goes to the bucket, not to us.
        async with self._http.stream("GET", url) as video:
            if video.status_code >= 400:
                await video.aread()
                into.unlink(missing_ok=True)
                raise error_of(video)
            size = 0
            with into.open("wb") as file:
                async for chunk in video.aiter_bytes():
                    size += file.write(chunk)
            return size

    # -- the event feed, broker requests, callbacks, bulk actions ---------------------------

    async def events(
        self,
        *,
        after: str | None = None,
        types: Iterable[str] | None = None,
        limit: int | None = None,
    ) -> EventFeed:
        """Every event of your jobs after the event `after` (a `webhook-id`), oldest first."""
        return cast(EventFeed, await self._json(_calls.feed(after, types, limit)))

    async def iter_events(
        self, *, after: str | None = None, types: Iterable[str] | None = None
    ) -> AsyncIterator[FeedEvent]:
        """The events after `after` until there are none yet: resume from the last `id`."""
        chosen = builtins.list(types or ())
        while True:
            page = await self.events(after=after, types=chosen)
            if not page["data"]:
                return
            for item in page["data"]:
                yield item
            after = page["next_cursor"]

    async def get_request(self, request_id: str) -> RequestOutcome:
        """What came of a `generation.request` sent over the broker (404 until taken)."""
        return cast(RequestOutcome, await self._json(_calls.get_request(request_id)))

    async def webhook_secret(self) -> SigningSecret:
        return cast(SigningSecret, await self._json(_calls.webhook_secret()))

    async def rotate_webhook_secret(self) -> SigningSecret:
        return cast(SigningSecret, await self._json(_calls.rotate_webhook_secret()))

    async def replay_delivery(self, delivery_id: str) -> dict[str, Any]:
        return dict(await self._json(_calls.replay_delivery(delivery_id)))

    async def bulk_cancel(self, **filters: Any) -> dict[str, Any]:
        """Cancel every live job the filters match (a worker does it: see `bulk_action`)."""
        return dict(await self._json(_calls.bulk("cancel", filters)))

    async def bulk_replay(self, **filters: Any) -> dict[str, Any]:
        return dict(await self._json(_calls.bulk("replay", filters)))

    async def enable_endpoint(self, url: str) -> dict[str, Any]:
        return dict(await self._json(_calls.bulk("enable", {"url": url})))

    async def bulk_action(self, action_id: str) -> dict[str, Any]:
        return dict(await self._json(_calls.bulk_action(action_id)))
