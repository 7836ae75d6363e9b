"""The synchronous client, over an `httpx.Client`."""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, cast, overload

import httpx

from kling_client import _calls
from kling_client._calls import MIN_WAIT_SECONDS, Call
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

Image = str | Path | bytes


def _image(file: Image, filename: str | None) -> tuple[str, bytes]:
    """An upload's name and bytes, read once so that a retry sends the same."""
    if isinstance(file, bytes):
        return filename or "image", file
    path = Path(file)
    return filename or path.name, path.read_bytes()


class Client:
    """The kling API for a producer: `Client(base_url, api_key)`, or with both taken from
    `KLING_API_URL` and `KLING_API_KEY`. Pass `http` to use an `httpx.Client` of your own
    (the caller then closes it); otherwise the client builds one and `close()` closes it.

    Creates without an `idempotency_key` get a generated one (unless `idempotency_keys` is
    false), so that they can be retried: a retry answers the job the first try made."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        http: httpx.Client | None = None,
        timeout: float = 60.0,
        retries: Retries | None = None,
        idempotency_keys: bool = True,
    ) -> None:
        self.base_url, key = _calls.settings(base_url, api_key)
        self._auth = {"Authorization": f"Bearer {key}"}
        self._owned = http is None
        self._http = http if http is not None else httpx.Client(timeout=timeout)
        self.retries = retries or Retries()
        self._generate_keys = idempotency_keys

    def close(self) -> None:
        if self._owned:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _key(self, given: str | None) -> str | None:
        return given or (new_idempotency_key() if self._generate_keys else None)

    # -- sending --------------------------------------------------------------------------

    def _send(self, call: Call) -> httpx.Response:
        """Send `call`, again as `retries` allows; raise the API's refusal as a KlingError."""
        timeout = httpx.Timeout(30.0, read=call.read_timeout) if call.read_timeout else None
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._http.request(
                    call.method, self.base_url + call.path, params=call.params, json=call.json,
                    files=call.files, headers={**self._auth, **call.headers},
                    timeout=timeout or httpx.USE_CLIENT_DEFAULT, follow_redirects=False,
                )  # fmt: skip
            except httpx.TransportError as exc:
                if not self.retries.after_error(exc, call.replayable, attempt):
                    raise connection_error(exc) from exc
                time.sleep(self.retries.pause(attempt))
                continue
            if response.status_code in call.passes or response.status_code < 400:
                return response
            if not self.retries.after_status(response.status_code, call.replayable, attempt):
                raise error_of(response)
            time.sleep(self.retries.pause(attempt, retry_after(response)))

    def _json(self, call: Call) -> Any:
        return self._send(call).json()

    # -- generations ----------------------------------------------------------------------

    def upload(self, file: Image, *, filename: str | None = None) -> Upload:
        """Upload a jpg/png (a path, or its bytes); create with its `upload_id`."""
        return cast(Upload, self._json(_calls.upload(*_image(file, filename))))

    def create(self, *, idempotency_key: str | None = None, **fields: Any) -> Generation:
        """Create a generation: `image_url` or `upload_id`, `prompt`, and any other field of
        `POST /v1/generations`. The same `idempotency_key` again answers the same job."""
        call = _calls.create(fields, self._key(idempotency_key))
        return cast(Generation, self._json(call))

    def dry_run(self, **fields: Any) -> DryRun:
        """Every check a create runs, nothing made: the price, budget left and place."""
        return cast(DryRun, self._json(_calls.dry_run(fields)))

    def batch(
        self, items: Iterable[Mapping[str, Any]], *, idempotency_key: str | None = None
    ) -> BatchResult:
        """Up to 500 creates in one call, each with its own outcome. With a key, item `i` is
        keyed `<key>/<i>`: the whole batch can be sent again."""
        call = _calls.batch(items, self._key(idempotency_key))
        return cast(BatchResult, self._json(call))

    @overload
    def get(self, job_id: str, *, wait: float | None = None, since: None = None) -> Generation: ...

    @overload
    def get(self, job_id: str, *, wait: float | None = None, since: str) -> Generation | None: ...

    def get(
        self, job_id: str, *, wait: float | None = None, since: str | None = None
    ) -> Generation | None:
        """The job. With `wait` (seconds, at most 60), answered once it changes state; with
        `since` (a status), None while it is still in that state."""
        response = self._send(_calls.get(job_id, wait, since))
        return None if response.status_code == 304 else cast(Generation, response.json())

    def wait(
        self,
        job_id: str,
        *,
        timeout: float = 1800,
        on_change: Callable[[Generation], None] | None = None,
    ) -> Generation:
        """The job once it has ended (completed, failed, cancelled, expired), long-polling:
        one request a minute while nothing changes. `on_change` sees every new state."""
        deadline = time.monotonic() + timeout
        job = self.get(job_id)
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
                changed = self.get(job_id, wait=left, since=job["status"])
                if changed is None and time.monotonic() - asked < MIN_WAIT_SECONDS:
                    # A proxy that drops `Prefer` answers at once: do not spin on it.
                    time.sleep(MIN_WAIT_SECONDS)
            job = changed

    def list(
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
        return cast(Page, self._json(call))

    def iterate(self, **filters: Any) -> Iterator[Generation]:
        """Every generation the filters of `list` match, page after page."""
        cursor = filters.pop("cursor", None)
        while True:
            page = self.list(cursor=cursor, **filters)
            yield from page["data"]
            cursor = page["next_cursor"]
            if not cursor:
                return

    def stream(self, job_id: str, *, last_event_id: int | None = None) -> Iterator[StateChange]:
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
                with self._http.stream("GET", url, headers=headers, timeout=timeout) as response:
                    if response.status_code >= 400:
                        response.read()
                        if not self.retries.after_status(response.status_code, True, attempt):
                            raise error_of(response)
                        time.sleep(self.retries.pause(attempt, retry_after(response)))
                        continue
                    for change in _calls.EventParser().parse(response.iter_lines()):
                        last_event_id, attempt = change["id"], 0
                        yield change
                return
            except httpx.TransportError as exc:
                if not self.retries.after_error(exc, True, attempt):
                    raise connection_error(exc) from exc
                time.sleep(self.retries.pause(attempt))

    def history(self, job_id: str) -> History:
        """The job's state history and every callback attempt."""
        return cast(History, self._json(_calls.history(job_id)))

    def cancel(self, job_id: str) -> Generation:
        return cast(Generation, self._json(_calls.cancel(job_id)))

    def retry(self, job_id: str, *, idempotency_key: str | None = None) -> Generation:
        """A new job with the inputs of a finished one, `retry_of` naming it."""
        call = _calls.retry(job_id, self._key(idempotency_key))
        return cast(Generation, self._json(call))

    def delete(self, job_id: str) -> Generation:
        """Remove an ended job's image and video; a tombstone stays."""
        return cast(Generation, self._json(_calls.delete(job_id)))

    def restore(self, job_id: str) -> Generation:
        """Store again the paid-for video of a job whose store failed."""
        return cast(Generation, self._json(_calls.restore(job_id)))

    def download(self, job_id: str, out: str | Path) -> int:
        """Write the stored MP4 to `out` (whole or not at all); answers its size."""
        target = Path(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        attempt = 0
        while True:
            attempt += 1
            # Asked again on each try: the presigned URL lives five minutes.
            location = self._send(_calls.video(job_id)).headers["location"]
            try:
                size = self._fetch(location, partial)
            except httpx.TransportError as exc:
                if not self.retries.after_error(exc, True, attempt):
                    partial.unlink(missing_ok=True)
                    raise connection_error(exc) from exc
                time.sleep(self.retries.pause(attempt))
                continue
            partial.replace(target)
            return size

    def _fetch(self, url: str, into: Path) -> int:
        # No Authorization header: the URL is presigned, and goes to the bucket, not to us.
        with self._http.stream("GET", url) as video:
            if video.status_code >= 400:
                video.read()
                into.unlink(missing_ok=True)
                raise error_of(video)
            size = 0
            with into.open("wb") as file:
                for chunk in video.iter_bytes():
                    size += file.write(chunk)
            return size

    # -- the event feed, broker requests, callbacks, bulk actions ---------------------------

    def events(
        self,
        *,
        after: str | None = None,
        types: Iterable[str] | None = None,
        limit: int | None = None,
    ) -> EventFeed:
        """Every event of your jobs after the event `after` (a `webhook-id`), oldest first."""
        return cast(EventFeed, self._json(_calls.feed(after, types, limit)))

    def iter_events(
        self, *, after: str | None = None, types: Iterable[str] | None = None
    ) -> Iterator[FeedEvent]:
        """The events after `after` until there are none yet: resume from the last `id`."""
        chosen = builtins.list(types or ())
        while True:
            page = self.events(after=after, types=chosen)
            if not page["data"]:
                return
            yield from page["data"]
            after = page["next_cursor"]

    def get_request(self, request_id: str) -> RequestOutcome:
        """What came of a `generation.request` sent over the broker (404 until taken)."""
        return cast(RequestOutcome, self._json(_calls.get_request(request_id)))

    def webhook_secret(self) -> SigningSecret:
        return cast(SigningSecret, self._json(_calls.webhook_secret()))

    def rotate_webhook_secret(self) -> SigningSecret:
        return cast(SigningSecret, self._json(_calls.rotate_webhook_secret()))

    def replay_delivery(self, delivery_id: str) -> dict[str, Any]:
        return dict(self._json(_calls.replay_delivery(delivery_id)))

    def bulk_cancel(self, **filters: Any) -> dict[str, Any]:
        """Cancel every live job the filters match (a worker does it: see `bulk_action`)."""
        return dict(self._json(_calls.bulk("cancel", filters)))

    def bulk_replay(self, **filters: Any) -> dict[str, Any]:
        return dict(self._json(_calls.bulk("replay", filters)))

    def enable_endpoint(self, url: str) -> dict[str, Any]:
        return dict(self._json(_calls.bulk("enable", {"url": url})))

    def bulk_action(self, action_id: str) -> dict[str, Any]:
        return dict(self._json(_calls.bulk_action(action_id)))
