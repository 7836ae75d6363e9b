"""The generation pipeline: submit -> poll -> store, one method per task.

Every step reloads the job, acts only if the row is in the state it expects (a conditional
UPDATE in `workers.jobs`), and asks for follow-up tasks only after its change committed.
Duplicate, late or replayed messages therefore change nothing.
"""

from __future__ import annotations

import random
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import structlog
from sqlalchemy import ColumnElement
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from workers import admission, callbacks, dispatch, jobs, metrics
from workers.db import unit_of_work
from workers.errors import ErrorCode, task_failure
from workers.media import InvalidMedia, probe_video
from workers.models import Job
from workers.sealing import Sealer
from workers.states import JobState
from workers.storage import Storage, StorageError
from workers.urlguard import UrlGuard
from workers.wavespeed import Prediction, WaveSpeedClient, WaveSpeedError

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def backoff(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Exponential backoff with jitter; never sooner than the server's `Retry-After`."""
    delay = min(cap, base * 2 ** max(0, attempt - 1)) * random.uniform(0.5, 1.0)
    return max(delay, retry_after or 0.0)


def video_key(job_id: uuid.UUID) -> str:
    # One deterministic key per job: a repeated store overwrites, never duplicates.
    return f"videos/{job_id}.mp4"


class OutputGone(Exception):
    """WaveSpeed no longer serves the output (it keeps them 7 days)."""


class OutputIncomplete(Exception):
    """The download ended short of its declared length, or broke: worth another try."""


@dataclass
class Pipeline:
    """The services behind the generation tasks; collaborators are passed in, never built."""

    sessions: sessionmaker[Session]
    wavespeed: WaveSpeedClient
    storage: Storage
    http: httpx.Client
    settings: Settings
    dispatch: dispatch.Dispatcher
    guard: UrlGuard
    sealer: Sealer
    clock: Clock = utcnow

    # -- submit ---------------------------------------------------------------------------

    def submit(self, job_id: uuid.UUID) -> None:
        """Claim a queued job, POST it to WaveSpeed once, record the prediction.

        The claim (with the attempt count) commits *before* the POST: a crash after sending
        leaves the job `submitting`, which the reconciler resolves through WaveSpeed's
        history instead of paying for a second prediction.
        """
        job, inputs = self._claim(job_id)
        if inputs is None and job.status == JobState.QUEUED and job.admitted_at is None:
            # Not admitted yet: park the job and let the gate pick the fairest jobs. Claim
            # again whatever it picked: if this gate pass, or another one since the claim
            # above, admitted this job, no other message is coming for it.
            self.admit(park=job.id)
            job, inputs = self._claim(job_id)
        if inputs is None:
            return
        try:
            prediction = self.wavespeed.submit(
                self.settings.wavespeed_model, inputs, webhook=self.settings.webhook_url
            )
        except WaveSpeedError as exc:
            self._submit_failed(job_id, job.submit_attempts + 1, exc)
            return
        self._adopt(job_id, job.duration, prediction, reason="submitted")

    def _claim(self, job_id: uuid.UUID) -> tuple[Job, dict[str, Any] | None]:
        """`queued -> submitting` if the gate admitted the job; answers the job as it was and,
        when claimed, the inputs to POST."""
        with unit_of_work(self.sessions) as session:
            job = _bind(jobs.get(session, job_id))
            claimed = jobs.transition(
                session,
                job_id,
                JobState.QUEUED,
                JobState.SUBMITTING,
                reason=f"attempt {job.submit_attempts + 1}",
                when=Job.admitted_at.is_not(None),
                submit_attempts=Job.submit_attempts + 1,
                last_submit_at=self.clock(),
            )
            return job, self._inputs(job) if claimed else None

    def admit(self, park: uuid.UUID | None = None) -> int:
        """Admit as many queued jobs as the gate allows and send the submit tasks they need;
        answers how many it admitted. `park` is a job whose own message found it unadmitted
        (`admission.admit`): it gets no message from here, its caller claims it itself."""
        now = self.clock()
        with unit_of_work(self.sessions) as session:
            admitted = admission.admit(
                session, self.gate, now, now - timedelta(minutes=1), park=park
            )
        for entry in admitted:
            if entry.needs_message and entry.job_id != park:
                self.dispatch(dispatch.SUBMIT, entry.job_id)
        return len(admitted)

    @property
    def gate(self) -> admission.Gate:
        settings = self.settings
        return admission.Gate(
            max_in_flight=settings.max_in_flight,
            per_minute=settings.submits_per_minute,
            tenant_max_in_flight=settings.tenant_max_in_flight or settings.max_in_flight,
        )

    def recover(self, job_id: uuid.UUID) -> None:
        """Resolve a `submitting` job whose POST got no answer: adopt the prediction if
        WaveSpeed's history has it, resubmit only once the history proves it never arrived."""
        with unit_of_work(self.sessions) as session:
            job = _bind(jobs.get(session, job_id))
        if job.status != JobState.SUBMITTING or job.last_submit_at is None:
            return
        try:
            found = self._find_in_history(job)
        except WaveSpeedError as exc:
            log.warning("recover.history_failed", job_id=str(job_id), error=str(exc))
            self.dispatch(dispatch.RECOVER, job_id, countdown=self.settings.retry_base_seconds)
            return
        if found is not None:
            self._adopt(job_id, job.duration, found, reason="adopted from history")
            return
        with unit_of_work(self.sessions) as session:
            # Parked: no submit message is on its way; the gate sends one when it admits it.
            requeued = jobs.transition(
                session, job_id, JobState.SUBMITTING, JobState.QUEUED, reason="not in history",
                admitted_at=None, parked_at=self.clock(),
            )  # fmt: skip
        if requeued:
            self.admit()

    def _inputs(self, job: Job) -> dict[str, Any]:
        # The presigned URL names `inputs/<job id>/...`, so the job can be found in history.
        inputs: dict[str, Any] = {
            "image": self.storage.presign_get(job.input_key, self.settings.input_url_ttl_seconds),
            "prompt": job.prompt,
            "guidance_scale": job.guidance_scale,
            "duration": job.duration,
        }
        if job.negative_prompt:
            inputs["negative_prompt"] = job.negative_prompt
        return inputs

    def _find_in_history(self, job: Job) -> Prediction | None:
        assert job.last_submit_at is not None
        since = job.last_submit_at - timedelta(minutes=5)
        marker = f"inputs/{job.id}/"
        for page in range(1, 51):
            batch = self.wavespeed.history(
                model=self.settings.wavespeed_model, created_after=since, page=page
            )
            for prediction in batch:
                if marker in str(prediction.input.get("image", "")):
                    return prediction
            if len(batch) < 100:
                return None
        return None

    def _adopt(
        self, job_id: uuid.UUID, duration: int, prediction: Prediction, *, reason: str
    ) -> None:
        now = self.clock()
        first = self.settings.poll_first_delay_seconds.get(duration, 60.0)
        with unit_of_work(self.sessions) as session:
            moved = jobs.transition(
                session,
                job_id,
                JobState.SUBMITTING,
                JobState.PROCESSING,
                reason=f"{reason}: prediction {prediction.id}",
                prediction_id=prediction.id,
                submitted_at=now,
                next_poll_at=now + timedelta(seconds=first),
                cost_usd=self.settings.price_usd.get(duration),
            )
            if not moved:
                # Cancelled while the POST was in flight: keep the id of what may be charged.
                jobs.update_fields(session, job_id, JobState.CANCELLED, prediction_id=prediction.id)
            delivery = self._event(session, job_id, callbacks.PROCESSING) if moved else None
            job = jobs.get(session, job_id)
        self._notify(delivery)
        if moved:
            metrics.adopted(job.created_at, now, job.cost_usd)
            log.info("submit.done", job_id=str(job_id), prediction_id=prediction.id)
            self.dispatch(dispatch.POLL, job_id, countdown=first, seq=job.poll_seq)

    def _submit_failed(self, job_id: uuid.UUID, attempt: int, exc: WaveSpeedError) -> None:
        log.warning(
            "submit.failed",
            job_id=str(job_id),
            attempt=attempt,
            error=str(exc),
            retryable=exc.retryable,
            ambiguous=exc.ambiguous,
        )
        if exc.ambiguous:
            # Stay `submitting`: only WaveSpeed's history can say whether we already paid.
            self.dispatch(dispatch.RECOVER, job_id, countdown=self.settings.retry_base_seconds)
            return
        if exc.retryable and attempt < self.settings.submit_max_attempts:
            self._requeue(job_id, JobState.SUBMITTING, attempt, exc.retry_after, str(exc))
            return
        code = ErrorCode.UPSTREAM_UNAVAILABLE if exc.retryable else _rejection_code(exc)
        self.fail(job_id, JobState.SUBMITTING, code, exc.message)

    def _requeue(
        self,
        job_id: uuid.UUID,
        src: JobState,
        attempt: int,
        retry_after: float | None,
        why: str,
        when: ColumnElement[bool] | None = None,
    ) -> None:
        delay = backoff(
            attempt, self.settings.retry_base_seconds, self.settings.retry_max_seconds, retry_after
        )
        with unit_of_work(self.sessions) as session:
            moved = jobs.transition(
                session,
                job_id,
                src,
                JobState.QUEUED,
                reason=f"retry in {delay:.1f}s: {why}",
                when=when,
                prediction_id=None,
                admitted_at=None,
                not_before=self.clock() + timedelta(seconds=delay),
                parked_at=None,  # the countdown message below is on its way
            )
        if moved:
            # The message first: nothing else would send it, and admitting can fail.
            # The gate is asked again when the wait is over (beat asks too, if this is lost).
            self.dispatch(dispatch.SUBMIT, job_id, countdown=delay)
            self.admit()  # its slot is free for another job meanwhile

    # -- poll -----------------------------------------------------------------------------

    def poll(
        self, job_id: uuid.UUID, seq: int | None = None, reported: dict[str, Any] | None = None
    ) -> None:
        """Check the prediction once; reschedule itself with a countdown if it is not done.

        Never sleeps. `seq` ties a message to one poll chain: a webhook or the reconciler
        (seq None) takes the chain over and the older message finds itself stale. `reported`
        is the prediction a verified WaveSpeed webhook carried (`take_webhook`): a finished
        one is taken as the result without asking WaveSpeed again.
        """
        with unit_of_work(self.sessions) as session:
            job = jobs.claim_poll(session, job_id, seq)
        if job is None or job.prediction_id is None:
            return
        _bind(job)
        prediction = _finished_report(reported, job.prediction_id)
        if prediction is None:
            try:
                prediction = self.wavespeed.result(job.prediction_id)
            except WaveSpeedError as exc:
                if not exc.retryable and exc.status_code in (401, 403):
                    self.fail(
                        job_id, JobState.PROCESSING, ErrorCode.UPSTREAM_AUTH, exc.message,
                        when=_tracks(job),
                    )  # fmt: skip
                    return
                log.warning("poll.failed", job_id=str(job_id), error=str(exc))
                self._reschedule(job, exc.retry_after)
                return
        self._on_prediction(job, prediction)

    def take_webhook(self, prediction_id: str, reported: dict[str, Any] | None) -> bool:
        """WaveSpeed's verified webhook says a prediction finished. Settle its job here and
        now from the prediction it carried, so a busy `poll` queue does not delay it; if the
        body does not settle it, ask for a poll at once. The poll takes the job's chain over,
        so the scheduled poll arriving later is harmless; WaveSpeed's retries of a webhook
        already taken change nothing. False when there was nothing to do."""
        with unit_of_work(self.sessions) as session:
            if not jobs.first_delivery(session, prediction_id):
                log.info("wavespeed.webhook.duplicate", prediction_id=prediction_id)
                return False
        try:
            return self._settle_reported(prediction_id, reported)
        except BaseException:
            # Not taken after all (the broker or Postgres failed): let WaveSpeed's retry in.
            with unit_of_work(self.sessions) as session:
                jobs.forget_delivery(session, prediction_id)
            raise

    def _settle_reported(self, prediction_id: str, reported: dict[str, Any] | None) -> bool:
        with unit_of_work(self.sessions) as session:
            job = jobs.by_prediction(session, prediction_id)
        if job is None or job.status != JobState.PROCESSING:
            return False
        if _finished_report(reported, prediction_id) is None:
            self.dispatch(dispatch.POLL, job.id)
        else:
            self.poll(job.id, reported=reported)
        return True

    def _on_prediction(self, job: Job, prediction: Prediction) -> None:
        if prediction.status == "completed":
            self._completed_upstream(job, prediction)
        elif prediction.status == "failed":
            self._failed_upstream(job, prediction)
        elif prediction.terminal:
            self.fail(
                job.id,
                JobState.PROCESSING,
                ErrorCode.UPSTREAM_CANCELLED,
                f"WaveSpeed reports the prediction {prediction.status}",
                when=_tracks(job),
            )
        elif self._timed_out(job):
            self.fail(
                job.id,
                JobState.PROCESSING,
                ErrorCode.PROCESSING_TIMEOUT,
                f"still {prediction.status} after {self.settings.processing_timeout_seconds:.0f}s",
                when=_tracks(job),
            )
        else:
            self._reschedule(job, None)

    def _completed_upstream(self, job: Job, prediction: Prediction) -> None:
        if not prediction.outputs:
            self.fail(
                job.id, JobState.PROCESSING, ErrorCode.OUTPUT_INVALID, "completed, no output",
                when=_tracks(job),
            )  # fmt: skip
            return
        with unit_of_work(self.sessions) as session:
            moved = jobs.transition(
                session,
                job.id,
                JobState.PROCESSING,
                JobState.STORING,
                reason="completed upstream",
                when=_tracks(job),
                output_url=prediction.outputs[0],
                inference_ms=prediction.inference_ms,
                next_poll_at=None,
            )
        if moved:
            self.dispatch(dispatch.STORE, job.id)
            self.admit()

    def _failed_upstream(self, job: Job, prediction: Prediction) -> None:
        code, retryable = task_failure(prediction.code)
        message = f"WaveSpeed task failed ({prediction.code}): {prediction.error}"
        if retryable and job.submit_attempts < self.settings.submit_max_attempts:
            self._requeue(
                job.id, JobState.PROCESSING, job.submit_attempts, None, message, when=_tracks(job)
            )
        else:
            self.fail(job.id, JobState.PROCESSING, code, message, when=_tracks(job))

    def _timed_out(self, job: Job) -> bool:
        started = job.submitted_at or job.created_at
        elapsed = (self.clock() - started).total_seconds()
        return elapsed > self.settings.processing_timeout_seconds

    def poll_delay(self, polls: int) -> float:
        """Seconds to the next check after `polls` checks: tight just after the expected
        finish, relaxing geometrically so a late clip does not cost a request a second."""
        settings = self.settings
        grown = settings.poll_min_interval_seconds * settings.poll_backoff_factor ** max(
            0, polls - 1
        )
        return min(settings.poll_max_interval_seconds, grown)

    def _reschedule(self, job: Job, retry_after: float | None) -> None:
        delay = max(self.poll_delay(job.poll_seq), retry_after or 0.0)
        with unit_of_work(self.sessions) as session:
            still_ours = jobs.set_next_poll(
                session, job.id, job.poll_seq, self.clock() + timedelta(seconds=delay)
            )
        if still_ours:
            self.dispatch(dispatch.POLL, job.id, countdown=delay, seq=job.poll_seq)

    # -- store ----------------------------------------------------------------------------

    def store(self, job_id: uuid.UUID) -> None:
        """Stream the output into S3 in constant memory, verify it, probe it, complete."""
        with unit_of_work(self.sessions) as session:
            job = _bind(jobs.get(session, job_id))
        if job.status != JobState.STORING or not job.output_url:
            return
        key = video_key(job_id)
        with tempfile.TemporaryDirectory(prefix="kling-store-") as workdir:
            copy = Path(workdir) / "output.mp4"
            try:
                stored = self._copy_output(job.output_url, key, copy)
                video = probe_video(copy)
            except OutputGone as exc:
                self.fail(job_id, JobState.STORING, ErrorCode.OUTPUT_EXPIRED, str(exc))
                return
            except InvalidMedia as exc:
                self.fail(job_id, JobState.STORING, ErrorCode.OUTPUT_INVALID, exc.message)
                return
        with unit_of_work(self.sessions) as session:
            moved = jobs.transition(
                session,
                job_id,
                JobState.STORING,
                JobState.COMPLETED,
                reason="stored",
                s3_bucket=stored.bucket,
                s3_key=stored.key,
                bytes=stored.bytes,
                sha256=stored.sha256,
                video_duration=video.duration,
                video_width=video.width,
                video_height=video.height,
                video_codec=video.codec,
                completed_at=self.clock(),
            )
            delivery = self._event(session, job_id, callbacks.COMPLETED) if moved else None
        self._notify(delivery)
        if moved:
            metrics.completed(job.created_at, self.clock())
            log.info("store.done", job_id=str(job_id), key=key, bytes=stored.bytes)

    def _copy_output(self, url: str, key: str, copy: Path) -> Any:
        timeout = httpx.Timeout(self.settings.download_timeout_seconds, connect=5.0)
        try:
            with self.http.stream("GET", url, timeout=timeout) as response:
                if response.status_code in (403, 404, 410):
                    raise OutputGone(f"output answered HTTP {response.status_code}: {url}")
                response.raise_for_status()
                declared = response.headers.get("content-length")
                with copy.open("wb") as tee, metrics.STORE_SECONDS.time():
                    stored = self.storage.put_stream(key, response.iter_raw(), "video/mp4", tee=tee)
        except (httpx.TransportError, httpx.HTTPStatusError, StorageError) as exc:
            raise OutputIncomplete(f"download of the output broke: {exc!r}") from exc
        if declared is not None and int(declared) != stored.bytes:
            raise OutputIncomplete(f"output is {stored.bytes} bytes; {declared} declared")
        metrics.STORE_BYTES.inc(stored.bytes)
        return stored

    # -- shared ---------------------------------------------------------------------------

    def _event(self, session: Session, job_id: uuid.UUID, event: str) -> uuid.UUID | None:
        return callbacks.record(session, job_id, event, self.clock())

    def _notify(self, delivery: uuid.UUID | None) -> None:
        if delivery is not None:
            self.dispatch(dispatch.NOTIFY, delivery)

    def notify(self, delivery_id: uuid.UUID) -> None:
        """Make a callback attempt that is due; a short wait for the next one is a countdown,
        a long one is left in `next_attempt_at` for the reconciler."""
        settings = self.settings
        with unit_of_work(self.sessions) as session:
            outcome = callbacks.deliver(
                session,
                delivery_id,
                self._post,
                self.clock(),
                settings.callback_schedule_seconds,
                self.sealer,
            )
        retry_in = outcome.retry_in if outcome else None
        if retry_in is not None and retry_in <= settings.max_countdown_seconds:
            self.dispatch(dispatch.NOTIFY, delivery_id, countdown=retry_in)

    def _post(self, url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return self.guard.post(
            url, content=body, headers=headers, timeout=self.settings.callback_timeout_seconds
        )

    def fail(
        self,
        job_id: uuid.UUID,
        src: JobState,
        code: ErrorCode,
        message: str,
        when: ColumnElement[bool] | None = None,
    ) -> bool:
        """Fail a job still in `src` (and matching `when`) with a stable code and a human
        message."""
        with unit_of_work(self.sessions) as session:
            moved = jobs.transition(
                session,
                job_id,
                src,
                JobState.FAILED,
                reason=f"{code}: {message}",
                when=when,
                error_code=code,
                error_message=message[:2000],
                next_poll_at=None,
                completed_at=self.clock(),
            )
            delivery = self._event(session, job_id, callbacks.FAILED) if moved else None
        self._notify(delivery)
        if moved:
            log.warning("job.failed", job_id=str(job_id), code=code, message=message)
            self.admit()
        return moved

    def cancel(self, job_id: uuid.UUID) -> Job:
        """Stop a job. A queued job is never submitted; one already at WaveSpeed stops being
        tracked (WaveSpeed has no cancel), and the record says it may still be charged."""
        with unit_of_work(self.sessions) as session:
            job = jobs.get(session, job_id)
            note = "cancelled by the caller"
            if job.prediction_id or job.status == JobState.SUBMITTING:
                prediction = job.prediction_id or "(unconfirmed)"
                note += f"; WaveSpeed prediction {prediction} may still be charged"
            moved = jobs.transition(
                session, job_id, [s for s in JobState if not s.terminal], JobState.CANCELLED,
                reason=note, error_code=ErrorCode.CANCELLED, error_message=note, next_poll_at=None,
                completed_at=self.clock(),
            )  # fmt: skip
            delivery = self._event(session, job_id, callbacks.CANCELLED) if moved else None
        self._notify(delivery)
        if moved:
            self.admit()
        with self.sessions() as session:
            return jobs.get(session, job_id)


def _bind(job: Job) -> Job:
    """Put the job's tenant and prediction on every log line of the task that loaded it."""
    structlog.contextvars.bind_contextvars(tenant_id=job.tenant_id, prediction_id=job.prediction_id)
    return job


def _rejection_code(exc: WaveSpeedError) -> ErrorCode:
    if exc.status_code in (401, 403):
        return ErrorCode.UPSTREAM_AUTH
    return ErrorCode.INVALID_INPUT


def _tracks(job: Job) -> ColumnElement[bool]:
    """The job still waits on the prediction this worker checked. A poll that stalled while
    the job was retried and resubmitted must not settle, requeue (and pay for) the new one."""
    return Job.prediction_id == job.prediction_id


def _finished_report(reported: dict[str, Any] | None, prediction_id: str) -> Prediction | None:
    """The reported prediction if it settles the job; None means ask WaveSpeed."""
    if not reported or reported.get("id") != prediction_id:
        return None
    try:
        prediction = Prediction.from_data(reported)
    except (AttributeError, TypeError, ValueError):
        return None  # signed, but not shaped like a prediction: a cue to poll, no more
    # A "completed" without outputs would fail the job, and a "failed" without a code could not
    # tell a retryable failure from a permanent one: let `/result` have the last word.
    if not prediction.terminal:
        return None
    if prediction.status == "completed" and not prediction.outputs:
        return None
    if prediction.status == "failed" and prediction.code is None:
        return None
    return prediction
