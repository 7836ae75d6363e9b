"""Every setting a benchmark or the sandbox starts the stack's processes with is valid: a
process refuses to start on settings that are not, and the run would end before it began."""

from __future__ import annotations

import pytest

from bench.harness import PRODUCTION_CADENCE, poll_schedule
from config.settings import settings_from
from sandbox.stack import SANDBOX_SETTINGS


@pytest.mark.parametrize(
    "overrides",
    [{}, PRODUCTION_CADENCE, {**PRODUCTION_CADENCE, **poll_schedule(120)}, poll_schedule(6)],
    ids=["sandbox", "production cadence", "cadence and a 120 s schedule", "6 s schedule"],
)
def test_the_settings_benchmarks_run_with_are_valid(overrides: dict[str, str]) -> None:
    settings = settings_from({**SANDBOX_SETTINGS, **overrides})
    assert settings.submit_time_limit_seconds >= settings.submit_post_seconds + 10
