"""A short fault run inside the test suite: every phase of `make faults` (Redis, S3 and one
worker host cut off, WaveSpeed's history down, `/result` and the CDN answering 404, a callback
receiver black-holed, hostile input, a key over its rate limit), with outages of seconds
instead of minutes; every check of the full run must hold."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from bench.faults import Options, run

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)
def test_short_fault_run_keeps_every_promise() -> None:
    # Not under pytest's tmp_path (mode 0700): the embedded PostgreSQL runs as its own user.
    root = Path(tempfile.mkdtemp(prefix="kling-test-faults-"))
    options = Options(outage_seconds=8, jobs=4, inference_seconds=2, timeout=600, root=root)
    try:
        results = run(options)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    failures = [result.line() for result in results if not result.ok]
    assert len(results) >= 14
    assert failures == []
