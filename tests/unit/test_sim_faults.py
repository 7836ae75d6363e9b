"""Fault profiles, their dice, and the account-tier limits."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from sandbox.wavespeed.faults import FaultInjector, FaultProfile
from sandbox.wavespeed.limits import RateWindow, SlotGate


def test_profile_is_all_off_by_default() -> None:
    injector = FaultInjector()
    assert not any(injector.hit("submit_500") for _ in range(1000))
    assert injector.task_failure() is None
    assert injector.fired == {}


@pytest.mark.parametrize(
    "profile",
    [
        {"submit_500": 1.5},
        {"submit_429": -0.1},
        {"no_such_knob": 1},
        {"task_fail": {"9999": 0.5}},
        {"task_fail": {"1200": 0.6, "5000": 0.6}},
        {"submit_latency_ms": [50, 10]},
        {"inference_seconds": [1]},
        {"concurrency": 0},
        {"requests_per_minute": 0},
        {"history_500": 1.5},
        {"result_404": -0.5},
        {"output_404_seconds": -1},
    ],
)
def test_bad_profiles_are_refused(profile: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        FaultProfile.model_validate(profile)


def test_task_fail_codes_arrive_as_json_strings() -> None:
    profile = FaultProfile.model_validate({"task_fail": {"1403": 0.25, "5003": 0.25}})
    assert profile.task_fail == {1403: 0.25, 5003: 0.25}
    assert profile.model_dump(mode="json")["task_fail"] == {"1403": 0.25, "5003": 0.25}


def test_certain_faults_always_fire_and_are_counted() -> None:
    injector = FaultInjector(FaultProfile(submit_429=1.0, task_fail={1200: 1.0}))
    assert all(injector.hit("submit_429") for _ in range(10))
    assert injector.task_failure() == 1200
    assert injector.fired == {"submit_429": 10, "task_fail.1200": 1}


def test_a_seed_replays_the_same_faults() -> None:
    profile = FaultProfile(submit_500=0.5, task_fail={5000: 0.3, 1403: 0.3}, seed=42)
    runs = []
    for _ in range(2):
        injector = FaultInjector(profile)
        runs.append([(injector.hit("submit_500"), injector.task_failure()) for _ in range(50)])
    assert runs[0] == runs[1]
    assert {hit for hit, _ in runs[0]} == {True, False}


def test_probability_is_roughly_honoured() -> None:
    injector = FaultInjector(FaultProfile(result_500=0.3, seed=1))
    fired = sum(injector.hit("result_500") for _ in range(5000))
    assert 1300 < fired < 1700


def test_new_knobs_are_off_by_default() -> None:
    profile = FaultProfile()
    assert (profile.history_500, profile.result_404, profile.result_404_sticky) == (0, 0, False)
    assert profile.output_404_seconds is None


def test_a_sticky_choice_is_rolled_once_per_key_and_kept() -> None:
    injector = FaultInjector(FaultProfile(result_404=0.5, result_404_sticky=True, seed=3))
    keys = [f"p{i}" for i in range(40)]
    first = {key: injector.hit_for("result_404", key) for key in keys}
    assert set(first.values()) == {True, False}
    for _ in range(5):
        assert {key: injector.hit_for("result_404", key) for key in keys} == first
    assert injector.fired["result_404"] == 6 * sum(first.values())
    # Another profile (other knobs, another seed) keeps the choices: a lost prediction stays lost.
    injector.replace(FaultProfile(result_404=0.5, result_404_sticky=True, submit_500=0.1, seed=9))
    assert {key: injector.hit_for("result_404", key) for key in keys} == first
    injector.forget()
    assert injector.fired == {}


def test_a_sticky_knob_that_is_off_decides_nothing() -> None:
    injector = FaultInjector(FaultProfile(result_404_sticky=True))
    assert injector.hit_for("result_404", "p1") is False
    injector.replace(FaultProfile(result_404=1.0, result_404_sticky=True))
    assert injector.hit_for("result_404", "p1") is True
    injector.replace(FaultProfile())
    assert injector.hit_for("result_404", "p1") is False


def test_rate_window_refuses_over_the_limit_until_a_minute_passed() -> None:
    window = RateWindow()
    assert window.admit(2, now=100.0) is None
    assert window.admit(2, now=110.0) is None
    assert window.admit(2, now=120.0) == pytest.approx(40.0)
    assert window.admit(2, now=160.5) is None
    assert window.admit(None, now=160.6) is None


def test_slot_gate_queues_over_the_cap_and_follows_a_new_cap() -> None:
    async def scenario() -> list[int]:
        limit = {"value": 1}
        gate = SlotGate(lambda: limit["value"])
        peak: list[int] = []
        release = asyncio.Event()

        async def task() -> None:
            async with gate.slot():
                peak.append(gate.active)
                await release.wait()

        tasks = [asyncio.create_task(task()) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert gate.active == 1
        limit["value"] = 3
        await gate.limit_changed()
        await asyncio.sleep(0.05)
        assert gate.active == 3
        release.set()
        await asyncio.gather(*tasks)
        return peak

    assert asyncio.run(scenario()) == [1, 2, 3]
