"""Metrics: what the WaveSpeed client counts, what a scrape shows, and the worker's cleanup."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest

from tests.unit.test_wavespeed_client import MODEL, PREDICTION, client_for, envelope
from workers import metrics
from workers.dispatch import QUEUES
from workers.wavespeed import WaveSpeedError


def requests(operation: str, outcome: str, status: str) -> float:
    return metrics.WAVESPEED_REQUESTS.labels(operation, outcome, status)._value.get()


def no_answer(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("slow", request=request)


@pytest.mark.parametrize(
    ("answer", "outcome", "status"),
    [
        (lambda _: envelope(PREDICTION), "ok", "2xx"),
        (lambda _: httpx.Response(503), "unavailable", "5xx"),
        (lambda _: httpx.Response(429), "unavailable", "429"),
        (lambda _: httpx.Response(400, json={"message": "bad"}), "rejected", "4xx"),
        (no_answer, "ambiguous", "none"),
    ],
)
def test_wavespeed_calls_are_counted_by_outcome_and_status(
    answer: Any, outcome: str, status: str
) -> None:
    before = requests("submit", outcome, status)
    with contextlib.suppress(WaveSpeedError):  # the failure itself is the client's own test
        client_for(answer).submit(MODEL, {"prompt": "p", "image": "u"})
    assert requests("submit", outcome, status) == before + 1


def test_a_scrape_shows_every_metric_with_its_prefix() -> None:
    text = generate_latest(metrics.scrape_registry()).decode()
    for name in (
        "kling_wavespeed_requests_total", "kling_submit_latency_seconds_bucket",
        "kling_end_to_end_latency_seconds_bucket", "kling_s3_store_bytes_total",
        "kling_s3_store_seconds_bucket", "kling_spend_usd_total",
    ):  # fmt: skip
        assert name in text


class Broken:
    """Sessions and a Redis that are down."""

    def __call__(self) -> Any:
        raise ConnectionError("down")

    def pipeline(self, **_: Any) -> Any:
        raise ConnectionError("down")


def test_backlog_scrape_survives_postgres_and_redis_being_down() -> None:
    collector = metrics.BacklogCollector(Broken(), Broken())  # type: ignore[arg-type]
    families = {family.name: family.samples for family in collector.collect()}
    assert families == {"kling_jobs": [], "kling_queue_depth": []}


class FakeRedis:
    """Answers LLEN from a dict, through a pipeline as redis-py does."""

    def __init__(self, lengths: dict[str, int]) -> None:
        self.lengths = lengths
        self.asked: list[str] = []

    def pipeline(self, **_: Any) -> FakeRedis:
        return self

    def __enter__(self) -> FakeRedis:
        return self

    def __exit__(self, *_: Any) -> None:
        return None

    def llen(self, queue: str) -> None:
        self.asked.append(queue)

    def execute(self) -> list[int]:
        return [self.lengths.get(queue, 0) for queue in self.asked]


def test_queue_depth_is_one_llen_per_queue() -> None:
    redis = FakeRedis({"poll": 7})
    collector = metrics.BacklogCollector(Broken(), redis)  # type: ignore[arg-type]
    depth = {f.name: f for f in collector.collect()}["kling_queue_depth"]
    assert {s.labels["queue"]: s.value for s in depth.samples} == {
        queue: 7.0 if queue == "poll" else 0.0 for queue in QUEUES
    }
    assert redis.asked == list(QUEUES)


def test_worker_start_removes_files_of_earlier_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    stale, own = tmp_path / "counter_999999.db", tmp_path / f"counter_{os.getpid()}.db"
    stale.write_bytes(b"x")
    own.write_bytes(b"x")
    metrics.clean_multiproc_dir()
    assert not stale.exists() and own.exists()


def test_without_a_directory_the_process_registry_is_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics.clean_multiproc_dir()  # nothing to clean, nothing raised
    metrics.process_dead(os.getpid())
    assert "kling_spend_usd_total" in generate_latest(metrics.scrape_registry()).decode()
