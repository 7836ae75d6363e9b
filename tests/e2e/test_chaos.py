"""A small chaos run inside the test suite: tens of jobs, a worker SIGKILLed, Redis flushed,
under WaveSpeed faults; every invariant of the full `make chaos` run must hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import Options, run

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
def test_small_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    options = Options(
        jobs=30, workers=2, kills=1, flushes=1, redis_restarts=0, postgres_restarts=0,
        chaos_seconds=8, timeout=300, root=tmp_path / "stack",
    )  # fmt: skip
    results = run(options)
    failures = [result.line() for result in results if not result.ok]
    assert len(results) == 4
    assert failures == []
