"""Pure rules of the pipeline: retry backoff, the adaptive poll schedule, error mapping."""

import pytest

from config import Settings
from workers.errors import ErrorCode, task_failure
from workers.pipeline import Pipeline, backoff
from workers.sealing import Sealer
from workers.storage import _parts


def test_backoff_grows_exponentially_within_jitter_and_cap() -> None:
    for attempt, nominal in [(1, 2.0), (2, 4.0), (3, 8.0), (10, 60.0)]:
        delays = {backoff(attempt, 2.0, 60.0) for _ in range(50)}
        assert all(nominal * 0.5 <= d <= nominal for d in delays)
        assert len(delays) > 1  # jittered, so a herd of retries spreads out


def test_backoff_never_beats_retry_after() -> None:
    assert backoff(1, 2.0, 60.0, retry_after=30.0) == 30.0


def make_pipeline(**settings: object) -> Pipeline:
    return Pipeline(
        sessions=None,  # type: ignore[arg-type]
        wavespeed=None,  # type: ignore[arg-type]
        storage=None,  # type: ignore[arg-type]
        http=None,  # type: ignore[arg-type]
        settings=Settings.model_validate(settings),
        dispatch=lambda *a, **k: None,
        guard=None,  # type: ignore[arg-type]
        sealer=Sealer([]),
    )


def test_poll_schedule_starts_tight_and_relaxes_to_the_cap() -> None:
    pipeline = make_pipeline(
        poll_min_interval_seconds=2, poll_max_interval_seconds=20, poll_backoff_factor=2
    )
    delays = [pipeline.poll_delay(n) for n in range(1, 8)]
    assert delays[:4] == [2, 4, 8, 16]
    assert delays[4:] == [20, 20, 20]


@pytest.mark.parametrize(
    ("code", "expected", "retryable"),
    [
        (1200, ErrorCode.CONTENT_MODERATED, False),
        (1401, ErrorCode.INVALID_INPUT, False),
        (1402, ErrorCode.IMAGE_UNREACHABLE, False),
        (1403, ErrorCode.GENERATION_FAILED, False),
        (5000, ErrorCode.UPSTREAM_UNAVAILABLE, True),
        (5003, ErrorCode.UPSTREAM_UNAVAILABLE, True),
        (None, ErrorCode.GENERATION_FAILED, False),
    ],
)
def test_wavespeed_task_codes_map_to_ours(
    code: int | None, expected: ErrorCode, retryable: bool
) -> None:
    assert task_failure(code) == (expected, retryable)


def test_parts_are_exact_size_except_the_last() -> None:
    chunks = [b"a" * 3, b"b" * 7, b"c" * 1, b"d" * 10]
    parts = list(_parts(chunks, 5))
    assert [len(p) for p in parts] == [5, 5, 5, 5, 1]
    assert b"".join(parts) == b"".join(chunks)
