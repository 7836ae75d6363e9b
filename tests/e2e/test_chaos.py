"""A small chaos run inside the test suite: tens of jobs, a worker SIGKILLed, Redis flushed,
jobs cancelled and deadlines missed, under WaveSpeed faults; every invariant of the full
`make chaos` run must hold."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from bench.chaos import Options, run

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
def test_small_chaos_run_keeps_every_invariant() -> None:
    # Not under pytest's tmp_path (mode 0700): the embedded PostgreSQL runs as its own user.
    root = Path(tempfile.mkdtemp(prefix="kling-test-chaos-"))
    options = Options(
        jobs=30, workers=2, kills=1, flushes=1, redis_restarts=0, postgres_restarts=0,
        cancels=6, retries=3, broker_requests=12, chaos_seconds=8, timeout=300, root=root,
    )  # fmt: skip
    try:
        results = run(options)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    failures = [result.line() for result in results if not result.ok]
    assert len(results) == 9
    assert failures == []
