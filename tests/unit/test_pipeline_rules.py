"""Pure rules of the pipeline: retry backoff, Retry-After, the adaptive poll schedule, error
mapping, which input a submit attempt names."""

import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from config import Settings
from workers.errors import ErrorCode, Failure, classify
from workers.models import Job
from workers.pipeline import attempt_key, history_markers, poll_delay
from workers.retry import RETRY_AFTER_CEILING, backoff, parse_retry_after
from workers.storage import _parts


def test_backoff_grows_exponentially_within_jitter_and_cap() -> None:
    for attempt, nominal in [(1, 2.0), (2, 4.0), (3, 8.0), (10, 60.0)]:
        delays = {backoff(attempt, 2.0, 60.0) for _ in range(50)}
        assert all(nominal * 0.5 <= d <= nominal for d in delays)
        assert len(delays) > 1  # jittered, so a herd of retries spreads out


def test_backoff_never_beats_retry_after() -> None:
    assert backoff(1, 2.0, 60.0, retry_after=30.0) == 30.0


def test_backoff_clamps_a_hostile_retry_after_and_huge_attempts() -> None:
    assert backoff(1, 2.0, 60.0, retry_after=1e12, retry_after_cap=3600.0) == 3600.0
    assert backoff(10_000, 2.0, 60.0) <= 60.0  # no overflow however many attempts


NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("1000000000000", RETRY_AFTER_CEILING),  # the poison: clamped, never an overflow
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        (format_datetime(NOW - timedelta(days=1), usegmt=True), 0.0),
        ("Fri, 31 Dec 99999 23:59:59 GMT", None),
        ("-5", None),
        ("soon", None),
        ("\u0661\u0662", None),  # digits, but not ASCII ones
        ("", None),
        (None, None),
    ],
)
def test_retry_after_in_either_form_is_read_and_bounded(
    value: str | None, seconds: float | None
) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_poll_schedule_starts_tight_and_relaxes_to_the_cap() -> None:
    settings = Settings(
        poll_min_interval_seconds=2, poll_max_interval_seconds=20, poll_backoff_factor=2
    )
    delays = [poll_delay(settings, n) for n in (*range(1, 8), 10_000)]
    assert delays[:4] == [2, 4, 8, 16]
    assert delays[4:] == [20, 20, 20, 20]


def test_each_submit_attempt_names_its_own_input_and_no_other() -> None:
    job = Job(id=uuid.uuid4(), input_key="")
    job.input_key = f"inputs/{job.id}/image.png"
    keys = [attempt_key(job, n) for n in (1, 2, 3)]
    assert keys[0] == job.input_key and len(set(keys)) == 3
    for n, key in enumerate(keys, start=1):
        url = f"https://s3.test/bucket/{key}?X-Amz-Signature=abc"
        assert [m for m in (1, 2, 3) if any(k in url for k in history_markers(job, m))] == [n]


@pytest.mark.parametrize(
    ("code", "expected", "retryable"),
    [
        (1200, ErrorCode.CONTENT_MODERATED, False),
        (1401, ErrorCode.INVALID_INPUT, False),
        (1402, ErrorCode.IMAGE_UNREACHABLE, True),  # our own S3 copy: our outage
        (1403, ErrorCode.GENERATION_FAILED, False),
        (5000, ErrorCode.UPSTREAM_UNAVAILABLE, True),
        (5003, ErrorCode.UPSTREAM_UNAVAILABLE, True),
        (None, ErrorCode.GENERATION_FAILED, False),
    ],
)
def test_wavespeed_task_codes_map_to_ours(
    code: int | None, expected: ErrorCode, retryable: bool
) -> None:
    assert classify(task_code=code) == Failure(expected, retryable)


@pytest.mark.parametrize(
    ("status", "expected", "retryable"),
    [
        (400, ErrorCode.INVALID_INPUT, False),
        (401, ErrorCode.UPSTREAM_AUTH, False),
        (403, ErrorCode.UPSTREAM_AUTH, False),
        (404, ErrorCode.INVALID_INPUT, False),
        (429, ErrorCode.UPSTREAM_UNAVAILABLE, True),
        (500, ErrorCode.UPSTREAM_UNAVAILABLE, True),
        (503, ErrorCode.UPSTREAM_UNAVAILABLE, True),
    ],
)
def test_wavespeed_http_statuses_map_to_ours(
    status: int, expected: ErrorCode, retryable: bool
) -> None:
    assert classify(status_code=status) == Failure(expected, retryable)
    # A failed task's code says more than the status of the call that reported it.
    assert classify(status_code=status, task_code=1200).code == ErrorCode.CONTENT_MODERATED


def test_parts_are_exact_size_except_the_last() -> None:
    chunks = [b"a" * 3, b"b" * 7, b"c" * 1, b"d" * 10]
    parts = list(_parts(chunks, 5))
    assert [len(p) for p in parts] == [5, 5, 5, 5, 1]
    assert b"".join(parts) == b"".join(chunks)
