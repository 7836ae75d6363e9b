"""Short runs of `make chaos` and `make faults` inside the test suite; every check of the
full runs must hold.

- Chaos: tens of jobs, a worker SIGKILLed, Redis flushed, jobs cancelled and deadlines
  missed, under WaveSpeed faults.
- Faults: every phase of `make faults` (Redis, S3 and one worker host cut off, WaveSpeed's
  history down, `/result` and the CDN answering 404, a callback receiver black-holed, hostile
  input, a key over its rate limit), with outages of seconds instead of minutes.

Each starts a stack of its own and spends most of its time waiting out outages and
inferences, so the chaos run goes on in a process of its own while the fault run runs here.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.faults import Options, run

pytestmark = pytest.mark.integration

CHAOS = {
    "jobs": 30, "workers": 2, "kills": 1, "flushes": 1, "redis-restarts": 0,
    "postgres-restarts": 0, "cancels": 6, "retries": 3, "broker-requests": 12,
    "chaos-seconds": 8, "timeout": 300,
}  # fmt: skip


def _scratch(what: str) -> Path:
    # Not under pytest's tmp_path (mode 0700): the embedded PostgreSQL runs as its own user.
    return Path(tempfile.mkdtemp(prefix=f"kling-test-{what}-"))


@dataclass
class Chaos:
    process: subprocess.Popen[bytes]
    output: Path  # a file, not a pipe: nobody reads it until the run has ended

    def result(self, timeout: float) -> tuple[int, str]:
        returncode = self.process.wait(timeout)
        return returncode, self.output.read_text(errors="replace")


@pytest.fixture(scope="module")
def chaos() -> Iterator[Chaos]:
    root = _scratch("chaos")
    argv = [sys.executable, "-m", "bench.chaos", "--root", str(root)]
    argv += [f"--{name}={value}" for name, value in CHAOS.items()]
    output = Path(tempfile.mkstemp(prefix="kling-test-chaos-", suffix=".txt")[1])
    with output.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
    try:
        yield Chaos(process, output)
    finally:
        if process.poll() is None:  # interrupted, so that it stops the stack it started
            process.send_signal(signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(root, ignore_errors=True)
        output.unlink()


@pytest.mark.timeout(900)
def test_short_fault_run_keeps_every_promise(chaos: Chaos) -> None:
    root = _scratch("faults")
    options = Options(outage_seconds=8, jobs=4, inference_seconds=2, timeout=600, root=root)
    try:
        results = run(options)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    failures = [result.line() for result in results if not result.ok]
    assert len(results) >= 14
    assert failures == []


@pytest.mark.timeout(600)
def test_small_chaos_run_keeps_every_invariant(chaos: Chaos) -> None:
    returncode, output = chaos.result(timeout=540)
    checks = [line for line in output.splitlines() if line.startswith(("PASS ", "FAIL "))]
    assert returncode == 0, output[-6000:]
    assert len(checks) == 9, output[-6000:]
    assert all(line.startswith("PASS ") for line in checks), checks
