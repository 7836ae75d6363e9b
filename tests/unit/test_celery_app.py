"""The Celery configuration: the beat schedule drops ticks that come too late to be useful."""

from __future__ import annotations

from datetime import timedelta

import pytest

from config.settings import settings_from
from workers.celery_app import create_celery


def seconds(schedule: object) -> float:
    if isinstance(schedule, int | float):
        return float(schedule)
    if isinstance(schedule, timedelta):
        return schedule.total_seconds()
    raise AssertionError(f"a beat entry of unknown kind: {schedule!r}")


@pytest.mark.parametrize("interval", ["5", "0.5", "60"])
def test_every_beat_entry_expires_within_its_interval(interval: str) -> None:
    # A backlog of ticks (a worker outage, a busy maintenance queue) must not run late.
    conf = create_celery(settings_from({"RECONCILE_INTERVAL_SECONDS": interval})).conf
    assert conf.beat_schedule
    for name, entry in conf.beat_schedule.items():
        expires = entry.get("options", {}).get("expires")
        assert expires is not None, f"{name} never expires"
        assert 0 < expires <= seconds(entry["schedule"]), name
