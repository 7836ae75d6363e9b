"""The Celery configuration: the beat schedule drops ticks that come too late to be useful, and
only a plain Redis broker takes the shared-client transport (`workers.broker`)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from config.settings import settings_from
from workers import broker
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


@pytest.mark.parametrize(
    ("url", "transport"),
    [
        ("redis://cache.internal:6379/0", broker.TRANSPORT),
        # kombu sets TLS up from the scheme, which naming a transport class would bypass.
        ("rediss://cache.internal:6380/0", "rediss"),
        ("sentinel://cache.internal:26379/0", "sentinel"),
    ],
)
def test_only_a_plain_redis_broker_takes_the_shared_client(url: str, transport: str) -> None:
    app = create_celery(settings_from({"REDIS_URL": url}))
    connection = app.connection_for_write()
    assert connection.transport_cls == transport
    if transport == "rediss":
        assert connection.ssl  # kombu's default for the scheme: TLS, not plain text
