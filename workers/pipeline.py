"""The generation pipeline: submit -> poll -> store, one method per task.

Every step reloads the job, acts only if the row is in the state it expects (a conditional
UPDATE in `workers.jobs`), and asks for its follow-up tasks in the same unit of work
(`workers.work`), which sends them once the change has committed. Duplicate, late or replayed
messages therefore change nothing.
"""

from __future__ import annotations

import ipaddress
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import structlog
from sqlalchemy import ColumnElement, Interval, bindparam, case, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session, sessionmaker

from config import Settings, tracing
from workers import admission, announce, callbacks, charges, dispatch, jobs, metrics, webhook_in
from workers.db import unit_of_work
from workers.errors import ErrorCode, classify
from workers.jobs import Chain
from workers.media import InvalidMedia, probe_video
from workers.models import Job, Tenant
from workers.outbox import settle as settle_outbox
from workers.retry import backoff
from workers.sealing import Sealer
from workers.states import LIVE, JobState
from workers.storage import Storage, StorageError
from workers.urlguard import UrlGuard
from workers.wavespeed import Prediction, WaveSpeedClient, WaveSpeedError
from workers.work import Units, Work

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]

HISTORY_PAGE_SIZE = 100


def utcnow() -> datetime:
    return datetime.now(UTC)


def video_key(job_id: uuid.UUID) -> str:
    # One deterministic key per job: a repeated store overwrites, never duplicates.
    return f"videos/{job_id}.mp4"


def attempt_key(job: Job, attempt: int) -> str:
    """The input image WaveSpeed is given for submit `attempt`. Its URL names the job and the
    attempt, so a history lookup finds this attempt's prediction and never an earlier one's:
    the first attempt uses the copy made at accept, later ones a copy of it of their own."""
    if attempt == 1:
        return job.input_key
    extension = job.input_key.rpartition(".")[2]
    return f"inputs/{job.id}/attempt-{attempt}.{extension}"


def hosted_name(job: Job, attempt: int) -> str:
    """The file name submit `attempt`'s input image is uploaded to WaveSpeed under
    (`INPUT_HOSTING=wavespeed`): the job and the attempt, as `attempt_key` names them in S3."""
    extension = job.input_key.rpartition(".")[2]
    return f"{job.id}-{attempt}.{extension}"


def named_url(url: str, name: str) -> str:
    """`url`, with `name` readable in it by a history lookup. WaveSpeed's download URLs name
    the stored file after the upload's time, not after `name`, so it goes in a fragment
    (`#/<name>`): clients never send a fragment when they fetch (RFC 3986), and WaveSpeed
    keeps the image URL of a prediction's input as it was given."""
    parts = urlsplit(url)
    if parts.path.rpartition("/")[2] == name:
        return url
    return urlunsplit(parts._replace(fragment="/" + name))


def history_markers(job: Job, attempt: int) -> tuple[str, ...]:
    """What the image URL of `attempt`'s prediction contains, and no other attempt's does:
    its S3 key, or the name it was uploaded to WaveSpeed under, or (for the job's current
    attempt) the download URL WaveSpeed gave that upload, which holds even if WaveSpeed
    keeps the URL without the fragment that carries the name. All are looked for, so a
    lookup still finds a submit sent before `INPUT_HOSTING` changed."""
    stem = hosted_name(job, attempt).rpartition(".")[0]
    markers = (attempt_key(job, attempt).rpartition(".")[0] + ".", f"/{stem}.")
    if job.hosted_input_url and job.submit_attempts == attempt:
        return (*markers, job.hosted_input_url)
    return markers


def webhook_for(settings: Settings) -> str | None:
    """Where a submit asks WaveSpeed to push its completion; none when our address is on
    loopback and WaveSpeed is not (a laptop against the real service): it could never
    deliver there, and polling alone settles every job."""
    if _on_loopback(settings.public_base_url) and not _on_loopback(settings.wavespeed_base_url):
        return None
    return settings.wavespeed_webhook_url


def _on_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, not an address
        return False


class OutputGone(Exception):
    """The CDN answered 403/404/410 for the output: expired, or a hiccup just after completion."""


class OutputIncomplete(Exception):
    """The download ended short of its declared length, or broke: worth another try."""


class HistoryInconclusive(Exception):
    """The history window held more predictions than one lookup reads: it proves nothing."""


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
    work: Units = field(init=False)

    def __post_init__(self) -> None:
        self.work = Units(
            self.sessions, self.dispatch, self.settings.max_countdown_seconds, self.clock,
            admit=self.admit,
        )  # fmt: skip

    # -- submit ---------------------------------------------------------------------------

    def submit(self, job_id: uuid.UUID, outbox: int | None = None) -> None:
        """Claim a queued job, POST it to WaveSpeed once, record the prediction. `outbox` is
        the outbox row that announced this message, settled now that it arrived.

        The claim (with the attempt count) commits *before* the POST: a crash after sending
        leaves the job `submitting`, which `recover` resolves through WaveSpeed's history
        instead of paying for a second prediction.
        """
        # Before the unit: its wait for the gate's lock and its publishes after the commit
        # count against the POST's time budget too.
        claimed_at = time.monotonic()
        with self.work() as work:
            settle_outbox(work.session, outbox)
            job, claimed = self._claim(work.session, job_id)
            # Only a job with a deadline can end here: the others pay no statement for it.
            if not claimed and job.start_deadline_at is not None and self._expire(work, job_id):
                return
            if not claimed and job.deadline_at is not None and self._overrun(work, job_id):
                return
            if not claimed and job.status == JobState.QUEUED:
                # Not admitted yet: park the job and let the gate pick the fairest jobs, in
                # this same transaction (the failed claim locked no row, so the gate's lock
                # still comes first). Claim again whatever it picked: if this gate pass, or
                # another one since, admitted this job, no other message is coming for it.
                # That includes a pass that committed between the claim and the read after
                # it (each statement sees what had committed when it began): then the job
                # reads as admitted, and is only claimed again.
                if job.admitted_at is None:
                    self._admit(work, park=job.id)
                job, claimed = self._claim(work.session, job_id)
        if not claimed:
            return
        attempt = job.submit_attempts
        try:
            inputs = self._inputs(job, attempt)
            if inputs is None:
                return
        except StorageError as exc:
            # Nothing was sent, so nothing can be charged: a plain retry.
            self._retry_submit(job_id, attempt, None, f"input copy failed: {exc}")
            return
        except WaveSpeedError as exc:
            # The input's upload failed: no prediction can exist, so this is never ambiguous;
            # retried (or refused) as a submit WaveSpeed turned away, within the same caps.
            self._submit_failed(job_id, attempt, exc)
            return
        # `recover` takes a miss as proof once the submit's time limit has passed since the
        # claim. Celery's timer cannot be relied on for that (it stops while the worker has
        # lost the broker), so the POST itself is not sent unless it can end within it.
        late = time.monotonic() - claimed_at
        if late > self.settings.submit_time_limit_seconds - self.settings.submit_post_seconds - 5:
            self._retry_submit(job_id, attempt, None, f"not sent: {late:.0f}s after its claim")
            return
        try:
            prediction = self.wavespeed.submit(
                self.settings.wavespeed_model, inputs, webhook=webhook_for(self.settings)
            )
        except WaveSpeedError as exc:
            self._submit_failed(job_id, attempt, exc)
            return
        self._adopt(job_id, attempt, job.duration, prediction, reason="submitted")

    @property
    def _in_flight(self) -> timedelta:
        """How long after its claim a submit's POST may still reach WaveSpeed: until the
        submit task's hard time limit has killed whatever process was sending it."""
        return timedelta(seconds=self.settings.submit_time_limit_seconds)

    def _claim(self, session: Session, job_id: uuid.UUID) -> tuple[Job, bool]:
        """`queued -> submitting` if the gate admitted the job (`_CLAIM`); answers the job as
        the claim left it (its attempt counted), or as it is if it was not claimed, and
        whether it was. Past the claim's due time (plus the sweep's grace) the reconciler
        sends `recover`."""
        job = _CLAIM.moved(session, job_id, in_flight=self._in_flight)
        if job is not None:
            return _bind(job), True
        return _bind(jobs.get(session, job_id)), False

    def expire_due(self, limit: int = 500) -> int:
        """End as `expired` the queued jobs whose start deadline passed before they were ever
        submitted (parked ones get no message of their own), and fail `deadline_exceeded`
        the live jobs past their deadline; answers how many."""
        with self.work() as work:
            due = jobs.matching(work.session, [JobState.QUEUED], _past_start_deadline(), limit)
            expired = sum(self._expire(work, job_id) for job_id in due)
        with self.work() as work:
            due = jobs.matching(work.session, LIVE, _past_deadline(), limit)
            return expired + sum(self._overrun(work, job_id) for job_id in due)

    def _expire(self, work: Work, job_id: uuid.UUID) -> bool:
        """`queued -> expired` if the job's start deadline passed and it was never submitted:
        nothing was sent to WaveSpeed, so nothing is charged."""
        message = "its start deadline passed before it could be submitted; nothing was charged"
        moved = jobs.transition(
            work.session, job_id, JobState.QUEUED, JobState.EXPIRED, reason=message,
            when=_past_start_deadline(), error_code=ErrorCode.EXPIRED, error_message=message,
            due_at=None, completed_at=self.clock(), charged=False,
        )  # fmt: skip
        if moved:
            self._event(work, job_id, callbacks.EXPIRED)
            work.free_slot()  # an admitted job held a place at the gate
        return moved

    def _overrun(self, work: Work, job_id: uuid.UUID) -> bool:
        """Fail a live job past its deadline, and delete its prediction at WaveSpeed."""
        return self.fail(
            job_id, LIVE, ErrorCode.DEADLINE_EXCEEDED, "its deadline passed before it completed",
            when=_past_deadline(), work=work,
        )  # fmt: skip

    def admit(self) -> int:
        """Admit as many queued jobs as the gate allows and send the submit tasks they need;
        answers how many it admitted."""
        with self.work() as work:
            return self._admit(work)

    def _admit(self, work: Work, park: uuid.UUID | None = None) -> int:
        """The gate's pass inside `work`. `park` is a job whose own message found it
        unadmitted (`admission.admit`): it gets no message from here, its caller claims it."""
        now = self.clock()
        admitted = admission.admit(
            work.session, self.gate, now, now - timedelta(minutes=1), park=park
        )
        for entry in admitted:
            if entry.needs_message and entry.job_id != park:
                work.send(dispatch.SUBMIT, entry.job_id)
        return len(admitted)

    @property
    def gate(self) -> admission.Gate:
        settings = self.settings
        return admission.Gate(
            max_in_flight=settings.max_in_flight,
            per_minute=settings.submits_per_minute,
            tenant_max_in_flight=settings.tenant_max_in_flight or settings.max_in_flight,
            recovery_after=self._in_flight,
        )

    def recover(self, job_id: uuid.UUID, attempt: int | None = None) -> None:
        """Resolve a `submitting` job whose POST got no answer: adopt the prediction if
        WaveSpeed's history has it; resubmit only once two lookups missed it, both begun
        after the submit's POST can no longer arrive and the second one a POST's timeout
        after the first. `attempt` ties the message to one submit attempt: a message of an
        earlier attempt changes nothing (that attempt was settled)."""
        with unit_of_work(self.sessions) as session:
            job = _bind(jobs.get(session, job_id))
            looked_at = jobs.db_now(session)  # before the lookup: what it can prove dates from
        if job.status != JobState.SUBMITTING or job.last_submit_at is None:
            return
        if attempt is not None and attempt != job.submit_attempts:
            return
        attempt = job.submit_attempts
        try:
            found = self._find_in_history(job, attempt)
        except (WaveSpeedError, HistoryInconclusive) as exc:
            self._recover_failed(job, attempt, str(exc))
            return
        if found is not None:
            self._adopt(job_id, attempt, job.duration, found, reason="adopted from history")
        else:
            self._missed(job, attempt, looked_at)

    def _missed(self, job: Job, attempt: int, looked_at: datetime) -> None:
        assert job.last_submit_at is not None
        spacing = timedelta(seconds=self.settings.submit_post_seconds)
        with self.work() as work:
            misses = jobs.record_miss(
                work.session, job.id, attempt, looked_at,
                posted_before=looked_at - self._in_flight, missed_before=looked_at - spacing,
            )  # fmt: skip
            proven = misses is not None and misses >= 2
            if proven and attempt < self.settings.submit_max_attempts:
                # Parked: no submit message is on its way; the gate sends one when it admits it.
                if jobs.transition(
                    work.session, job.id, JobState.SUBMITTING, JobState.QUEUED,
                    reason=f"attempt {attempt} not in WaveSpeed's history, twice",
                    when=Job.submit_attempts == attempt,
                    admitted_at=None, parked_at=func.now(), due_at=None,
                ):  # fmt: skip
                    work.free_slot()
            elif proven:
                # Nothing was created, and no attempts are left: nothing is charged either.
                message = f"attempt {attempt} not in WaveSpeed's history, twice; no attempts left"
                self.fail(job.id, JobState.SUBMITTING, ErrorCode.UPSTREAM_UNAVAILABLE,
                           message, when=Job.submit_attempts == attempt, work=work)  # fmt: skip
        if proven:
            return
        # A first miss, or a lookup too early to count: look again once it can count (the
        # margin keeps a countdown that fires a little early from missing the mark).
        can_count = job.last_submit_at + self._in_flight - looked_at
        delay = max(spacing, can_count).total_seconds() + 1.0
        note = f"attempt {attempt} not in WaveSpeed's history yet" if misses else None
        self._recover_in(job.id, attempt, delay, note=note)

    def _recover_failed(self, job: Job, attempt: int, why: str) -> None:
        """A history lookup failed: back off and look again, until the deadline."""
        settings = self.settings
        deadline = func.now() - timedelta(seconds=settings.recover_deadline_seconds)
        message = (
            f"WaveSpeed's history could not say whether attempt {attempt} arrived within "
            f"{settings.recover_deadline_seconds:.0f}s; it may be charged ({why})"
        )
        attempt_matches = Job.submit_attempts == attempt
        if self.fail(
            job.id, JobState.SUBMITTING, ErrorCode.SUBMIT_UNCONFIRMED, message,
            when=attempt_matches & (Job.last_submit_at < deadline),
        ):  # fmt: skip
            return
        failures = job.step_failures + 1
        cap = settings.recover_max_interval_seconds
        delay = backoff(failures, settings.retry_base_seconds, cap)
        log.warning("recover.history_failed", job_id=str(job.id), failures=failures, error=why)
        note = f"history lookup {failures} failed, again in {delay:.0f}s: {why}"[:500]
        self._recover_in(job.id, attempt, delay, failures=failures, note=note)

    def _recover_in(
        self,
        job_id: uuid.UUID,
        attempt: int,
        delay: float,
        *,
        failures: int | None = None,
        note: str | None = None,
    ) -> None:
        """Schedule the next history lookup of `attempt`, and only that one."""
        values: dict[str, Any] = {"due_at": jobs.db_in(delay)}
        if failures is not None:
            values["step_failures"] = failures
        with self.work() as work:
            if jobs.update_fields(
                work.session, job_id, JobState.SUBMITTING, when=Job.submit_attempts == attempt,
                note=note, **values,
            ):  # fmt: skip
                work.send(dispatch.RECOVER, job_id, delay, attempt=attempt)

    def _inputs(self, job: Job, attempt: int) -> dict[str, Any] | None:
        """The body of submit `attempt` (hosting its input image where WaveSpeed reads it);
        None when the job moved on while its image was uploaded: nothing is to be sent."""
        image = self._image_url(job, attempt)
        if image is None:
            return None
        inputs: dict[str, Any] = {
            "image": image,
            "prompt": job.prompt,
            "guidance_scale": job.guidance_scale,
            "duration": job.duration,
        }
        if job.negative_prompt:
            inputs["negative_prompt"] = job.negative_prompt
        return inputs

    def _image_url(self, job: Job, attempt: int) -> str | None:
        """The URL WaveSpeed reads submit `attempt`'s image at; it names the job and the
        attempt (`history_markers`). In S3, a later attempt gets a copy of its own; uploaded
        to WaveSpeed, each attempt is an upload of its own name, and the URL WaveSpeed gave
        it is recorded before the POST (None if the job moved on meanwhile)."""
        if self.settings.input_hosting == "wavespeed":
            name = hosted_name(job, attempt)
            content = self.storage.get_bytes(job.input_key)
            url = self.wavespeed.upload(name, content, job.input_content_type)
            log.info("submit.input_uploaded", job_id=str(job.id), attempt=attempt, name=name)
            return named_url(url, name) if self._hosted_at(job.id, attempt, url) else None
        key = attempt_key(job, attempt)
        if key != job.input_key:
            self.storage.copy(job.input_key, key)
        return self.storage.presign_get(key, self.settings.input_url_ttl_seconds)

    def _hosted_at(self, job_id: uuid.UUID, attempt: int, url: str) -> bool:
        """Record, before its POST, the URL WaveSpeed stored submit `attempt`'s image under:
        a history lookup then knows the prediction by it. False if the job moved on since
        its claim (stopped from outside, or its attempt settled by `recover`): nothing is
        sent, so a stopped job is settled as having made nothing."""
        with unit_of_work(self.sessions) as session:
            if jobs.update_fields(
                session, job_id, JobState.SUBMITTING, when=Job.submit_attempts == attempt,
                hosted_input_url=url,
            ):  # fmt: skip
                return True
            _nothing_created(session, job_id, attempt)
        log.info("submit.not_sent", job_id=str(job_id), attempt=attempt, why="moved on")
        return False

    def _find_in_history(self, job: Job, attempt: int) -> Prediction | None:
        """The prediction of submit `attempt`, from a bounded window of WaveSpeed's history
        around the POST (WaveSpeed's clock may disagree with ours by the skew setting)."""
        assert job.last_submit_at is not None
        settings = self.settings
        skew = timedelta(seconds=settings.history_clock_skew_seconds)
        since = job.last_submit_at - skew
        until = job.last_submit_at + self._in_flight + skew
        markers = history_markers(job, attempt)
        blind = 0  # predictions of the window that do not show their input
        for page in range(1, settings.history_max_pages + 1):
            batch = self.wavespeed.history(
                model=settings.wavespeed_model, created_after=since, created_before=until,
                page=page, page_size=HISTORY_PAGE_SIZE,
            )  # fmt: skip
            for prediction in batch:
                image = str(prediction.input.get("image", ""))
                if any(marker in image for marker in markers):
                    return prediction
                blind += not prediction.input
            if len(batch) < HISTORY_PAGE_SIZE:
                break
        else:
            raise HistoryInconclusive(
                f"more than {settings.history_max_pages * HISTORY_PAGE_SIZE} predictions "
                f"between {since.isoformat()} and {until.isoformat()}"
            )
        if blind:
            # Any of them may be ours: absence is not proven (WaveSpeed documents history
            # items without `input`; then an unanswered submit ends as `submit_unconfirmed`).
            raise HistoryInconclusive(f"{blind} predictions in the window show no input")
        return None

    def _adopt(
        self, job_id: uuid.UUID, attempt: int, duration: int, prediction: Prediction, *,
        reason: str,
    ) -> None:  # fmt: skip
        now = self.clock()
        first = self.settings.poll_first_delay_seconds.get(duration, 60.0)
        with self.work() as work:
            session = work.session
            adopted = _ADOPT.moved(
                session, job_id, reason=f"{reason}: prediction {prediction.id}", attempt=attempt,
                prediction=prediction.id, at=now, first_check=timedelta(seconds=first),
                cost=self.settings.price_usd.get(duration),
            )  # fmt: skip
            # Stopped while the POST was in flight: keep the id of what may be charged, and
            # delete it at WaveSpeed.
            kept = adopted is not None or _settle_stopped(
                session, job_id, attempt, prediction_id=prediction.id, due_at=func.now()
            )
            if adopted is not None:
                self._event(work, job_id, callbacks.PROCESSING, adopted)
                work.send(dispatch.POLL, job_id, first, seq=adopted.poll_seq)
            elif kept:
                work.send(dispatch.WITHDRAW, job_id)
            else:
                log.error(
                    "submit.orphaned", job_id=str(job_id), attempt=attempt,
                    prediction_id=prediction.id, status=jobs.get(session, job_id).status,
                )  # fmt: skip
        if adopted is not None:
            metrics.adopted(adopted.created_at, now, adopted.cost_usd)
            log.info("submit.done", job_id=str(job_id), prediction_id=prediction.id)

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
            self._recover_in(job_id, attempt, self.settings.retry_base_seconds)
        elif exc.retryable:
            self._retry_submit(job_id, attempt, exc.retry_after, str(exc))
        else:
            with self.work() as work:
                if not self.fail(
                    job_id, JobState.SUBMITTING, classify(status_code=exc.status_code).code,
                    exc.message, when=Job.submit_attempts == attempt, work=work,
                ):  # fmt: skip
                    _nothing_created(work.session, job_id, attempt)

    def _retry_submit(
        self, job_id: uuid.UUID, attempt: int, retry_after: float | None, why: str
    ) -> None:
        """Submit `attempt` surely created nothing: queue the job again, or fail it once its
        attempts are used up."""
        attempt_matches = Job.submit_attempts == attempt
        with self.work() as work:
            if attempt < self.settings.submit_max_attempts:
                moved = self._requeue(
                    work, job_id, JobState.SUBMITTING, attempt, retry_after, why, attempt_matches
                )
            else:
                moved = self.fail(
                    job_id, JobState.SUBMITTING, ErrorCode.UPSTREAM_UNAVAILABLE, why,
                    when=attempt_matches, work=work,
                )  # fmt: skip
            if not moved:
                _nothing_created(work.session, job_id, attempt)

    def _requeue(
        self,
        work: Work,
        job_id: uuid.UUID,
        src: JobState,
        attempt: int,
        retry_after: float | None,
        why: str,
        when: ColumnElement[bool] | None = None,
    ) -> bool:
        settings = self.settings
        delay = backoff(
            attempt, settings.retry_base_seconds, settings.retry_max_seconds, retry_after,
            settings.retry_after_max_seconds,
        )  # fmt: skip
        moved = jobs.transition(
            work.session,
            job_id,
            src,
            JobState.QUEUED,
            reason=f"retry in {delay:.1f}s: {why}"[:2000],
            when=when,
            prediction_id=None,
            admitted_at=None,
            due_at=None,
            not_before=self.clock() + timedelta(seconds=delay),
            # Unparked when the countdown message below is on its way; a wait too long for
            # a countdown parks the job, and the gate sends it a message once admitted.
            parked_at=None if work.holds(delay) else func.now(),
        )
        if moved:
            # The gate is asked again when the wait is over (beat asks too, if this is lost).
            work.send(dispatch.SUBMIT, job_id, delay)
            work.free_slot()  # its slot is free for another job meanwhile
        return moved

    # -- poll -----------------------------------------------------------------------------

    def poll(self, job_id: uuid.UUID, seq: int | None = None) -> None:
        """Check the prediction once; reschedule itself with a countdown if it is not done.

        Never sleeps. `seq` ties a message to one poll chain: a webhook or the reconciler
        (seq None) takes the chain over and the older message finds itself stale. The claim
        books the chain's usual next check, so a prediction still running costs no second
        write (`_reschedule`).
        """
        with unit_of_work(self.sessions) as session:
            if seq is None:
                claimed = jobs.take_poll_chain(session, job_id)
            else:
                # This is the chain's check number `seq + 1`; the claim books the next one.
                next_check = poll_delay(self.settings, seq + 1)
                claimed = jobs.continue_poll_chain(session, job_id, seq, next_check)
        if claimed is None or claimed[0].prediction_id is None:
            return
        job, claimed_at = claimed
        asked = time.monotonic()
        prediction_id = job.prediction_id
        assert prediction_id is not None
        _bind(job)
        answer: Prediction | WaveSpeedError
        try:
            answer = self.wavespeed.result(prediction_id)
        except WaveSpeedError as exc:
            answer = exc
        # The database's time when the answer came: the claim's, and what the check took.
        now = claimed_at + timedelta(seconds=time.monotonic() - asked)
        with self.work() as work:
            if isinstance(answer, WaveSpeedError):
                self._poll_failed(work, job, now, answer)
            else:
                self._on_prediction(work, job, now, answer)

    def _poll_failed(self, work: Work, job: Chain, now: datetime, exc: WaveSpeedError) -> None:
        """`/result` answered an error: the timeout still counts, and a prediction WaveSpeed
        keeps refusing (404, 400) ends the job after a few tries rather than never."""
        log.warning("poll.failed", job_id=str(job.id), error=str(exc))
        refusals = job.step_failures
        if classify(status_code=exc.status_code).code == ErrorCode.UPSTREAM_AUTH:
            self.fail(job.id, JobState.PROCESSING, ErrorCode.UPSTREAM_AUTH, exc.message,
                       when=_tracks(job), work=work)  # fmt: skip
        elif self._timed_out(job, now):
            self._fail_timed_out(work, job, f"{exc.message}")
        elif not exc.retryable and refusals + 1 >= self.settings.poll_max_rejections:
            message = f"WaveSpeed refused {refusals + 1} polls in a row: {exc.message}"
            self.fail(job.id, JobState.PROCESSING, ErrorCode.PREDICTION_LOST, message,
                       when=_tracks(job), work=work)  # fmt: skip
        elif exc.retryable:
            self._reschedule(work, job, now, exc.retry_after, refusals)  # the refusals in a row
        else:
            base = self.settings.poll_refusal_base_seconds
            wait = backoff(refusals + 1, base, 8 * base, exc.retry_after)
            self._reschedule(work, job, now, wait, refusals + 1)

    def take_webhook(self, prediction_id: str, reported: dict[str, Any] | None) -> bool:
        """WaveSpeed's verified webhook says a prediction finished. Settle its job here and
        now from the prediction it carried, so a busy `poll` queue does not delay it; if the
        body does not settle it, ask for a poll at once. The poll takes the job's chain over,
        so the scheduled poll arriving later is harmless; WaveSpeed's retries of a webhook
        already taken change nothing. False when there was nothing to do: no job of ours
        waits on the prediction (nothing is recorded then), or it was taken already.

        Its id, the poll chain's takeover and the job's settling commit together: a failure
        before the commit leaves the webhook untaken, for WaveSpeed's retry, and so does a
        message that could not go after it (its id is forgotten)."""
        with self.work() as work:
            job = jobs.by_prediction(work.session, prediction_id)
            if job is None or job.status != JobState.PROCESSING:
                return False
            work.trace = job.traceparent  # what the webhook sets off is the job's work
            if not webhook_in.first_seen(work.session, prediction_id):
                log.info("wavespeed.webhook.duplicate", prediction_id=prediction_id)
                return False
            finished = _finished_report(reported, prediction_id)
            claimed = None if finished is None else jobs.take_poll_chain(work.session, job.id)
            if finished is None:
                work.send(dispatch.POLL, job.id)
            elif claimed is not None and claimed[0].prediction_id == prediction_id:
                self._on_prediction(work, *claimed, finished)
        if work.unsent is not None:
            # WaveSpeed's retry brings the webhook again: it finds the job settled, or cues
            # the poll that did not go this time.
            with unit_of_work(self.sessions) as session:
                webhook_in.forget(session, prediction_id)
            raise work.unsent
        return True

    def _on_prediction(self, work: Work, job: Chain, now: datetime, prediction: Prediction) -> None:
        if prediction.status == "completed":
            self._completed_upstream(work, job, prediction)
        elif prediction.status == "failed":
            self._failed_upstream(work, job, prediction)
        elif prediction.terminal:
            self.fail(
                job.id,
                JobState.PROCESSING,
                ErrorCode.UPSTREAM_CANCELLED,
                f"WaveSpeed reports the prediction {prediction.status}",
                when=_tracks(job),
                work=work,
            )
        elif self._timed_out(job, now):
            self._fail_timed_out(work, job, f"still {prediction.status}")
        else:
            self._reschedule(work, job, now, None)

    def _completed_upstream(self, work: Work, job: Chain, prediction: Prediction) -> None:
        if not prediction.outputs:
            self.fail(
                job.id, JobState.PROCESSING, ErrorCode.OUTPUT_INVALID,
                "completed, no output", when=_tracks(job), work=work,
            )  # fmt: skip
            return
        flagged = [n for n, flag in enumerate(prediction.nsfw) if flag]
        if flagged and work.session.get_one(Tenant, job.tenant_id).reject_nsfw:
            outputs = ", ".join(str(n) for n in flagged)
            self.fail(
                job.id, JobState.PROCESSING, ErrorCode.CONTENT_MODERATED,
                f"WaveSpeed flagged output {outputs} as NSFW; this tenant takes no flagged "
                "outputs", when=_tracks(job), work=work,
                charged=True, nsfw=prediction.nsfw,  # made, and billed, all the same
            )  # fmt: skip
            return
        # Only a processing job with a prediction is polled (`= NULL` would never match).
        assert job.prediction_id is not None
        if _OUTPUT_READY(
            work.session, job.id, reason="completed upstream", prediction=job.prediction_id,
            output=prediction.outputs[0], flags=prediction.nsfw or None,
            inference=prediction.inference_ms,
            store_within=timedelta(seconds=self.settings.store_deadline_seconds),
        ):  # fmt: skip
            work.send(dispatch.STORE, job.id)
            work.free_slot()

    def _failed_upstream(self, work: Work, job: Chain, prediction: Prediction) -> None:
        failure = classify(task_code=prediction.code)
        message = f"WaveSpeed task failed ({prediction.code}): {prediction.error}"
        if failure.retryable and job.submit_attempts < self.settings.submit_max_attempts:
            self._requeue(
                work, job.id, JobState.PROCESSING, job.submit_attempts, None, message,
                when=_tracks(job),
            )  # fmt: skip
        else:
            self.fail(
                job.id, JobState.PROCESSING, failure.code, message, when=_tracks(job), work=work
            )

    def _timed_out(self, job: Chain, now: datetime) -> bool:
        """Whether the prediction has run past the processing timeout, by the database's
        clock (`now` came back with the poll's claim)."""
        started = job.submitted_at or job.created_at
        return (now - started).total_seconds() > self.settings.processing_timeout_seconds

    def _fail_timed_out(self, work: Work, job: Chain, why: str) -> None:
        timeout = self.settings.processing_timeout_seconds
        self.fail(job.id, JobState.PROCESSING, ErrorCode.PROCESSING_TIMEOUT,
                   f"{why} after {timeout:.0f}s", when=_tracks(job), work=work)  # fmt: skip

    def _reschedule(
        self, work: Work, job: Chain, now: datetime, retry_after: float | None, failures: int = 0
    ) -> None:
        """Send the chain's next check, `now` being the database's time, recording when it is
        due and the refusals in a row (`failures`), unless the claim left that on the row
        already: then there is nothing to write, and the reconciler still resends the check
        if its message is lost. A booking counts if it is within a tenth of the reconciler's
        grace of the real due time: a slow answer (WaveSpeed taking seconds) books again, so
        the grace the reconciler gives a late message shrinks by a tenth at most."""
        settings = self.settings
        retry_after = min(retry_after or 0.0, settings.retry_after_max_seconds)
        delay = max(poll_delay(settings, job.poll_seq), retry_after)
        off = abs(job.due_at - now - timedelta(seconds=delay)) if job.due_at else None
        booked = off is not None and off.total_seconds() <= settings.poll_overdue_grace_seconds / 10
        written = booked and job.step_failures == failures and job.resends == 0
        if written or jobs.set_next_poll(work.session, job.id, job.poll_seq, delay, failures):
            work.send(dispatch.POLL, job.id, delay, seq=job.poll_seq)

    # -- store ----------------------------------------------------------------------------

    def store(self, job_id: uuid.UUID) -> None:
        """Stream the output into S3 in constant memory, verify it, probe it, complete.

        A try that fails is retried, backing off, by the reconciler (`due_at`) until the
        store deadline: the prediction is paid for and WaveSpeed keeps it for days. A 403 or
        404 from the CDN is retried too while the output is younger than its retention."""
        with unit_of_work(self.sessions) as session:
            claimed = jobs.claim_store(session, job_id, self.settings.store_stall_seconds)
        if claimed is None or not claimed[0].output_url:
            return
        job, now = claimed
        _bind(job)
        key = video_key(job_id)
        with tempfile.TemporaryDirectory(prefix="kling-store-") as workdir:
            copy = Path(workdir) / "output.mp4"
            try:
                with tracing.span("s3.copy_output", **{"s3.key": key}):
                    stored = self._copy_output(str(job.output_url), key, copy)
                video = probe_video(copy)
            except InvalidMedia as exc:
                # Failed for good (no restore takes it back), so its copy is nobody's.
                if self.fail(job_id, JobState.STORING, ErrorCode.OUTPUT_INVALID, exc.message):
                    self._discard(key)
                return
            except Exception as exc:  # any other failure, time limits included: try again
                self._store_failed(job, now, exc)
                return
        with self.work() as work:
            completed = jobs.Transition(
                JobState.STORING,
                JobState.COMPLETED,
                s3_bucket=stored.bucket,
                s3_key=stored.key,
                bytes=stored.bytes,
                sha256=stored.sha256,
                video_duration=video.duration,
                video_width=video.width,
                video_height=video.height,
                video_codec=video.codec,
                due_at=None,
                completed_at=self.clock(),
                charged=True,
            ).moved(work.session, job_id, reason="stored")
            if completed is not None:
                self._event(work, job_id, callbacks.COMPLETED, completed)
            else:
                stopped = _stopped(jobs.get(work.session, job_id))
        if completed is not None:
            metrics.completed(job.created_at, self.clock())
            log.info("store.done", job_id=str(job_id), key=key, bytes=stored.bytes)
        elif stopped:
            # Cancelled, or past its deadline, while this copy ran: nobody will read it.
            self._discard(key)

    def _discard(self, key: str) -> None:
        try:
            self.storage.delete(key)
        except StorageError as exc:  # the bucket's lifecycle rule is the backstop
            log.warning("store.discard_failed", key=key, error=str(exc))

    def _store_failed(self, job: Job, now: datetime, exc: Exception) -> None:
        settings = self.settings
        gone = isinstance(exc, OutputGone)
        age = (now - (job.output_at or now)).total_seconds()
        tries = job.step_failures + 1
        log.warning("store.failed", job_id=str(job.id), tries=tries, error=repr(exc))
        if gone and age >= settings.output_retention_seconds:
            self.fail(job.id, JobState.STORING, ErrorCode.OUTPUT_EXPIRED, str(exc))
        elif job.store_deadline_at is not None and now >= job.store_deadline_at:
            code = ErrorCode.OUTPUT_EXPIRED if gone else ErrorCode.STORAGE_FAILED
            self.fail(job.id, JobState.STORING, code, f"gave up after {tries} tries: {exc}")
        else:
            delay = backoff(tries, settings.retry_base_seconds, settings.store_retry_max_seconds)
            with unit_of_work(self.sessions) as session:
                jobs.update_fields(
                    session, job.id, JobState.STORING, due_at=jobs.db_in(delay),
                    step_failures=tries,
                    note=f"store try {tries} failed, again in {delay:.0f}s: {exc!r}"[:500],
                )  # fmt: skip

    def restore(self, job_id: uuid.UUID) -> bool:
        """Store again a paid-for output whose store failed (`storage_failed`, or
        `output_expired` if WaveSpeed may still have it), with a fresh deadline; False when
        the job is not such a job."""
        with self.work() as work:
            moved = jobs.transition(
                work.session, job_id, JobState.FAILED, JobState.STORING, reason="restored",
                when=Job.error_code.in_([ErrorCode.STORAGE_FAILED, ErrorCode.OUTPUT_EXPIRED])
                & Job.output_url.is_not(None) & Job.deleted_at.is_(None),
                # Asked for after the job's deadline: the caller wants the video now.
                deadline_at=None,
                error_code=None, error_message=None, completed_at=None, due_at=func.now(),
                store_deadline_at=jobs.db_in(self.settings.store_deadline_seconds),
            )  # fmt: skip
            if moved:  # a `failed` callback still retrying would arrive after `completed`
                callbacks.supersede(work.session, job_id)
                work.send(dispatch.STORE, job_id)
        return moved

    def _copy_output(self, url: str, key: str, copy: Path) -> Any:
        timeout = httpx.Timeout(self.settings.download_timeout_seconds, connect=5.0)
        try:
            # The bytes as the CDN keeps them: `iter_raw` does not decompress, so a CDN that
            # compressed its answer would hand S3 a gzip file instead of the MP4.
            identity = {"Accept-Encoding": "identity"}
            with self.http.stream("GET", url, timeout=timeout, headers=identity) as response:
                if response.status_code in (403, 404, 410):
                    raise OutputGone(f"output answered HTTP {response.status_code}")
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

    def _event(self, work: Work, job_id: uuid.UUID, event: str, job: Job | None = None) -> None:
        """Add `event` to the tenant's feed, with the job's callback and reply of it if it
        asked for them, sent after the commit (`workers.announce`). `job`: the row as it is
        now, when the caller has just read it."""
        announce.job_event(work, job or jobs.get(work.session, job_id), event, self.clock())

    def fail(
        self,
        job_id: uuid.UUID,
        src: JobState | Sequence[JobState],
        code: ErrorCode,
        message: str,
        when: ColumnElement[bool] | None = None,
        *,
        work: Work | None = None,
        **values: Any,
    ) -> bool:
        """Fail a job still in `src` (and matching `when`) with a stable code and a human
        message, inside `work` or a unit of its own; `values` are more fields to set, or a
        `charged` known better than the code's rule. A job given up on while its prediction
        may still run (`WITHDRAWN`) has that prediction deleted at WaveSpeed."""
        if work is None:
            with self.work() as work:
                return self.fail(job_id, src, code, message, when, work=work, **values)
        moved = jobs.transition(
            work.session,
            job_id,
            src,
            JobState.FAILED,
            reason=f"{code}: {message}",
            when=when,
            error_code=code,
            error_message=message[:2000],
            due_at=_withdraw_due() if code in WITHDRAWN else None,
            completed_at=self.clock(),
            **{"charged": charges.settled(code), **values},
        )
        if moved:
            log.warning("job.failed", job_id=str(job_id), code=code, message=message)
            self._event(work, job_id, callbacks.FAILED)
            work.free_slot()
            if code in WITHDRAWN and jobs.get(work.session, job_id).due_at is not None:
                work.send(dispatch.WITHDRAW, job_id)
        return moved

    def cancel(self, job_id: uuid.UUID) -> Job:
        """Stop a job. A queued job is never submitted; one already at WaveSpeed has its
        prediction deleted there (`withdraw`), and `charged` says what it cost."""
        with self.work() as work:
            session = work.session
            job = jobs.get(session, job_id)
            note = "cancelled by the caller"
            if job.prediction_id:
                note += f"; WaveSpeed prediction {job.prediction_id} is deleted"
            elif job.status == JobState.SUBMITTING:
                note += "; a submit without an answer yet is deleted once it is known"
            moved = jobs.transition(
                session, job_id, LIVE, JobState.CANCELLED, reason=note,
                error_code=ErrorCode.CANCELLED, error_message=note, due_at=_withdraw_due(),
                completed_at=self.clock(), charged=charges.settled(ErrorCode.CANCELLED),
            )  # fmt: skip
            ended = jobs.get(session, job_id)
            if moved:
                self._event(work, job_id, callbacks.CANCELLED)
                work.free_slot()
                if ended.due_at is not None:
                    work.send(dispatch.WITHDRAW, job_id)
            return ended

    # -- withdraw -------------------------------------------------------------------------

    def withdraw(self, job_id: uuid.UUID) -> None:
        """Delete the prediction of a job that stopped before it finished (cancel, deadline,
        timeout) at WaveSpeed, so that it stops and its output goes, and settle `charged`
        from WaveSpeed's last report of it; and our copy of the output, if a store made one.
        A try that fails is retried, backing off, by the reconciler (`due_at` of the ended
        job), up to `withdraw_max_attempts`."""
        with unit_of_work(self.sessions) as session:
            job = _bind(jobs.get(session, job_id))
            looked_at = jobs.db_now(session)  # before any lookup: what it can prove dates from
        state = JobState(job.status)
        if not state.terminal or job.due_at is None:
            return
        left = ""  # what the history says of a copy the last try could not delete
        if job.output_url is not None:
            # A store that finds its job stopped deletes its copy itself; one killed between
            # its upload and its commit leaves the copy to this. The job is over, so no store
            # can complete it after the delete. First: a failure here is retried before
            # WaveSpeed forgets the report that settles `charged` (its prediction has
            # finished, so waiting costs nothing).
            try:
                self.storage.delete(video_key(job_id))
            except StorageError as exc:
                if not self._last_withdraw_try(job):
                    self._withdraw_failed(job, str(exc), what="our copy of its output")
                    return
                # The last try still deletes the prediction and settles what it cost; the
                # copy is left to the bucket's lifecycle rule.
                log.error("withdraw.copy_left", job_id=str(job_id), error=str(exc))
                left = f"; gave up deleting our copy of its output: {exc}"
        try:
            if job.prediction_id is None and not self._found_unanswered(job, looked_at):
                return
            assert job.prediction_id is not None
            report = self._last_report(job.prediction_id)
            deleted = self.wavespeed.delete([job.prediction_id])
        except (WaveSpeedError, HistoryInconclusive) as exc:
            self._withdraw_failed(job, str(exc), getattr(exc, "retry_after", None))
            return
        learned = charges.of_report(report)
        values: dict[str, Any] = {"due_at": None, "step_failures": 0}
        if learned is not None:
            values["charged"] = func.coalesce(Job.charged, learned)
        note = (
            f"WaveSpeed prediction {job.prediction_id} deleted ({deleted} deleted; it was "
            f"{report or 'not found'}){left}"
        )
        with unit_of_work(self.sessions) as session:
            jobs.update_fields(
                session, job_id, state, when=_tracks(job) & Job.due_at.is_not(None),
                note=note, **values,
            )  # fmt: skip
        log.info("withdraw.done", job_id=str(job_id), status=report, deleted=deleted)

    def _found_unanswered(self, job: Job, looked_at: datetime) -> bool:
        """The prediction of a job stopped while its submit had no answer, looked up in
        WaveSpeed's history and recorded on the job (which `job` then carries). Absence is
        proven as `recover` proves it: two misses, both begun after the POST could no longer
        arrive, a POST's timeout apart; then nothing was made, nor charged. A miss that
        proves nothing yet is recorded as a failed try."""
        attempt = job.submit_attempts
        found = self._find_in_history(job, attempt)
        if found is None:
            spacing = timedelta(seconds=self.settings.submit_post_seconds)
            with unit_of_work(self.sessions) as session:
                misses = jobs.record_miss(
                    session, job.id, attempt, looked_at, state=JobState(job.status),
                    posted_before=looked_at - self._in_flight, missed_before=looked_at - spacing,
                )  # fmt: skip
                if misses is not None and misses >= 2:
                    _nothing_created(session, job.id, attempt)
                    jobs.note(
                        session,
                        job.id,
                        f"attempt {attempt} not in WaveSpeed's history, "
                        "twice: it made nothing to delete, and nothing was charged",
                    )
                    return False
            self._withdraw_failed(job, "its submit is not in WaveSpeed's history (yet)")
            return False
        with unit_of_work(self.sessions) as session:
            _settle_stopped(session, job.id, job.submit_attempts, prediction_id=found.id)
        job.prediction_id = found.id
        return True

    def _last_report(self, prediction_id: str) -> str | None:
        """The prediction's status before it is deleted; None if WaveSpeed does not know it
        or could not say (the delete is tried all the same)."""
        try:
            return self.wavespeed.result(prediction_id).status
        except WaveSpeedError as exc:
            log.info("withdraw.no_report", prediction_id=prediction_id, error=str(exc))
            return None

    def _last_withdraw_try(self, job: Job) -> bool:
        """Whether this try at withdrawing `job` is its last (`withdraw_max_attempts`)."""
        return job.step_failures + 1 >= self.settings.withdraw_max_attempts

    def _withdraw_failed(
        self, job: Job, why: str, retry_after: float | None = None, what: str | None = None
    ) -> None:
        """Record a withdraw's try that failed to delete `what` (by default the job's
        prediction, or its unanswered submit), and when it is tried again, if ever."""
        settings = self.settings
        tries = job.step_failures + 1
        if what is None and job.prediction_id:
            what = f"prediction {job.prediction_id}"
        what = what or "the unanswered submit"
        log.warning("withdraw.failed", job_id=str(job.id), tries=tries, error=why)
        if self._last_withdraw_try(job):
            values: dict[str, Any] = {"due_at": None}
            note = f"gave up deleting {what} after {tries} tries: {why}"
        else:
            delay = backoff(
                tries, settings.retry_base_seconds, settings.store_retry_max_seconds,
                retry_after, settings.retry_after_max_seconds,
            )  # fmt: skip
            values = {"due_at": jobs.db_in(delay)}
            note = f"deleting {what} failed ({tries}), again in {delay:.0f}s: {why}"
        with unit_of_work(self.sessions) as session:
            jobs.update_fields(
                session, job.id, JobState(job.status),
                when=_same_prediction(job) & Job.due_at.is_not(None), note=note[:500],
                step_failures=tries, **values,
            )  # fmt: skip


# A job as a step read it: the whole row, or what a poll's claim answers.
_Seen = TypeVar("_Seen", Job, Chain)


def _bind(job: _Seen) -> _Seen:
    """Put the job's tenant and prediction on every log line of the task that loaded it."""
    structlog.contextvars.bind_contextvars(tenant_id=job.tenant_id, prediction_id=job.prediction_id)
    return job


# Failures that give up on a prediction which may still be running: it is deleted.
WITHDRAWN = frozenset({ErrorCode.DEADLINE_EXCEEDED, ErrorCode.PROCESSING_TIMEOUT})
# The ends of a job stopped from outside (state, code): a submit still in flight, or a store
# still copying, may come after them.
STOPPED = frozenset(
    {(JobState.CANCELLED, ErrorCode.CANCELLED), (JobState.FAILED, ErrorCode.DEADLINE_EXCEEDED)}
)


def _stopped(job: Job) -> bool:
    return (job.status, job.error_code) in STOPPED


def _withdraw_due() -> ColumnElement[datetime | None]:
    """A stopping job's `due_at`: now if it has a prediction to delete, or a submit that may
    have made one; else none. On an ended job, a `due_at` means its prediction is still to
    be deleted (`Pipeline.withdraw`)."""
    may_have_one = Job.prediction_id.is_not(None) | (
        (Job.status == JobState.SUBMITTING) & Job.last_submit_at.is_not(None)
    )
    return case((may_have_one, func.now()), else_=None)


def _settle_stopped(session: Session, job_id: uuid.UUID, attempt: int, **values: Any) -> bool:
    """Record what became of submit `attempt` of a job stopped from outside while it was on
    its way (`STOPPED`): the prediction it made, or that it made none."""
    return any(
        jobs.update_fields(
            session, job_id, state, **values,
            when=Job.prediction_id.is_(None) & (Job.error_code == code)
            & (Job.submit_attempts == attempt),
        )
        for state, code in STOPPED
    )  # fmt: skip


def _nothing_created(session: Session, job_id: uuid.UUID, attempt: int) -> None:
    """Submit `attempt` surely made no prediction: a job stopped meanwhile has nothing to
    delete, and was not charged."""
    _settle_stopped(session, job_id, attempt, due_at=None, charged=False)


def _same_prediction(job: Job) -> ColumnElement[bool]:
    """The job still holds the prediction (or the lack of one) this worker read."""
    if job.prediction_id is None:
        return Job.prediction_id.is_(None)
    return _tracks(job)


def _past_deadline() -> ColumnElement[bool]:
    """The job's own deadline has passed (the database's clock); never NULL."""
    return Job.deadline_at.is_not(None) & (Job.deadline_at <= func.now())


def _past_start_deadline() -> ColumnElement[bool]:
    """The job was never submitted, and its start deadline has passed (the database's clock).
    A job submitted once and queued again for a retry has started: its deadline is met."""
    # Never NULL (SQL's unknown), so that its negation in the claim holds for a job with no
    # deadline at all.
    deadline = Job.start_deadline_at
    return deadline.is_not(None) & (Job.submit_attempts == 0) & (deadline <= func.now())


def _tracks(job: Job | Chain) -> ColumnElement[bool]:
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


def poll_delay(settings: Settings, polls: int) -> float:
    """Seconds to the next check after `polls` checks: tight just after the expected finish,
    relaxing geometrically so a late clip does not cost a request a second."""
    grown = settings.poll_min_interval_seconds * settings.poll_backoff_factor ** min(
        max(0, polls - 1), 64
    )
    return min(settings.poll_max_interval_seconds, grown)


# The steps every job takes, built once (`jobs.Transition`).
# `queued -> submitting` once the gate admitted the job: the claim's due time is when the
# POST must have answered (`in_flight` after it). The claim's own time, not its
# transaction's start: the gate's lock may have been waited for in between, and `recover`
# dates the POST's window from this.
_CLAIM = jobs.Transition(
    JobState.QUEUED,
    JobState.SUBMITTING,
    when=Job.admitted_at.is_not(None) & ~_past_start_deadline() & ~_past_deadline(),
    # The attempt the claim counted, read from the row it moved: no read before it.
    reason=func.concat("attempt ", Job.submit_attempts),
    submit_attempts=Job.submit_attempts + 1,
    last_submit_at=func.clock_timestamp(),
    due_at=func.clock_timestamp() + bindparam("in_flight", type_=Interval()),
    recover_misses=0,
    last_miss_at=None,
    hosted_input_url=None,  # the earlier attempt's: this one records its own
)
# `submitting -> processing`: submit `attempt` made `prediction`, first checked after
# `first_check`.
_ADOPT = jobs.Transition(
    JobState.SUBMITTING,
    JobState.PROCESSING,
    when=Job.submit_attempts == bindparam("attempt"),
    prediction_id=bindparam("prediction"),
    submitted_at=bindparam("at"),
    due_at=func.now() + bindparam("first_check", type_=Interval()),
    cost_usd=bindparam("cost"),
)
# `processing -> storing`: the prediction the job still waits on (`_tracks`) made `output`.
_OUTPUT_READY = jobs.Transition(
    JobState.PROCESSING,
    JobState.STORING,
    when=Job.prediction_id == bindparam("prediction"),
    output_url=bindparam("output"),
    nsfw=bindparam("flags", type_=JSONB(none_as_null=True)),  # no flags: SQL NULL
    inference_ms=bindparam("inference"),
    output_at=func.now(),
    store_deadline_at=func.now() + bindparam("store_within", type_=Interval()),
    due_at=func.now(),
)
