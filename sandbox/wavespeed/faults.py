"""The fault profile: which of WaveSpeed's bad days the simulator acts out, and how often.

A profile is plain JSON (`--faults`, `PUT /_sim/faults`); every knob is optional and off by
default. Probabilities are drawn from one seeded generator so a run with `seed` set and the
same request order fails the same way twice.

`result_404` rolls per request; with `result_404_sticky` it rolls once per prediction and the
choice is kept for the simulator's life (a profile change does not re-roll it, `/_sim/reset`
forgets it), so a chosen prediction answers 404 for as long as the knob is on: a prediction
WaveSpeed has lost.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Bounds = tuple[Annotated[float, Field(ge=0.0)], Annotated[float, Field(ge=0.0)]]

# Task-level failure codes a profile may inject, with the message WaveSpeed would put in
# `data.error` for each.
TASK_FAILURE_MESSAGES: dict[int, str] = {
    1200: "The content may violate our content policy; please adjust the prompt or image.",
    1400: "Missing required parameter.",
    1401: "Invalid parameter.",
    1402: "Failed to download the input media from the given URL.",
    1403: "Task failed: the model could not generate a video for this input.",
    1405: "Task failed during generation; please try again later.",
    5000: "Internal server error, please try again later.",
    5003: "Service temporarily unavailable, please try again later.",
}


class FaultProfile(BaseModel):
    """Every fault knob; the JSON shape of `--faults` and `/_sim/faults`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    submit_429: Probability = 0.0
    submit_500: Probability = 0.0
    submit_timeout: Probability = 0.0
    # Longer than the official SDK's 60 s submit read timeout, so its callers do time out.
    submit_timeout_seconds: float = Field(default=65.0, ge=0.0)
    submit_drop_after_create: Probability = 0.0
    submit_latency_ms: Bounds | None = None
    # A slow `/result` (WaveSpeed busy): the answer comes after this long.
    result_latency_ms: Bounds | None = None
    result_429: Probability = 0.0
    result_500: Probability = 0.0
    result_404: Probability = 0.0
    result_404_sticky: bool = False
    history_500: Probability = 0.0
    # WaveSpeed keeps (and echoes in history, results and webhooks) a prediction's image URL
    # without its fragment: its docs say nothing either way.
    input_fragment_dropped: bool = False
    # `POST /media/uploads` and `/media/upload/binary` answer 500: nothing is stored.
    upload_500: Probability = 0.0
    task_fail: dict[int, Probability] = Field(default_factory=dict)
    webhook_drop: Probability = 0.0
    webhook_duplicate: Probability = 0.0
    webhook_delay_ms: Bounds | None = None
    output_gone_after_seconds: float | None = Field(default=None, ge=0.0)
    # The CDN has not caught up yet: an output answers 404 for this long after completion.
    output_404_seconds: float | None = Field(default=None, ge=0.0)
    output_truncate: Probability = 0.0
    # A completed output WaveSpeed flags in `has_nsfw_contents`.
    nsfw: Probability = 0.0
    inference_seconds: Bounds | None = None
    requests_per_minute: int | None = Field(default=None, ge=1)
    concurrency: int | None = Field(default=None, ge=1)
    seed: int | None = None

    @field_validator(
        "submit_latency_ms", "result_latency_ms", "webhook_delay_ms", "inference_seconds"
    )
    @classmethod
    def ordered_bounds(cls, value: Bounds | None) -> Bounds | None:
        if value is not None and value[0] > value[1]:
            raise ValueError("range must be [min, max] with min <= max")
        return value

    @field_validator("task_fail")
    @classmethod
    def known_codes(cls, value: dict[int, float]) -> dict[int, float]:
        unknown = sorted(set(value) - set(TASK_FAILURE_MESSAGES))
        if unknown:
            raise ValueError(f"unknown task failure codes {unknown}")
        return value

    @model_validator(mode="after")
    def task_fail_total(self) -> FaultProfile:
        if sum(self.task_fail.values()) > 1.0:
            raise ValueError("task_fail probabilities must add up to at most 1")
        return self


class FaultInjector:
    """Rolls the dice for one profile and counts every fault it fires."""

    def __init__(self, profile: FaultProfile | None = None) -> None:
        self.fired: Counter[str] = Counter()
        self.profile = FaultProfile()
        self._rng = random.Random()
        self._chosen: dict[str, dict[str, bool]] = {}  # knob -> key -> rolled once: fires?
        self.replace(profile or FaultProfile())

    def forget(self) -> None:
        """Clear the counts and every per-key choice (a fresh account)."""
        self.fired.clear()
        self._chosen.clear()

    def replace(self, profile: FaultProfile) -> None:
        """Swap the profile in; reseeding makes a seeded profile replay from its start."""
        self.profile = profile
        self._rng = random.Random(profile.seed)

    def hit(self, knob: str) -> bool:
        """Whether the probability knob `knob` fires this time (counted when it does)."""
        chance = float(getattr(self.profile, knob))
        # Knobs that are off consume no randomness, so turning one on leaves the others' draws.
        if chance <= 0.0 or self._rng.random() >= chance:
            return False
        self.fired[knob] += 1
        return True

    def hit_for(self, knob: str, key: str) -> bool:
        """Like `hit`, but rolled once per `key` and remembered: a chosen key fires every time
        while the knob is on (counted each time), the others never do."""
        chance = float(getattr(self.profile, knob))
        if chance <= 0.0:
            return False  # decided nothing, so turning the knob on later still rolls
        chosen = self._chosen.setdefault(knob, {})
        if key not in chosen:
            chosen[key] = self._rng.random() < chance
        if chosen[key]:
            self.fired[knob] += 1
        return chosen[key]

    def uniform(self, bounds: Bounds) -> float:
        """A value drawn uniformly from `[min, max]`."""
        return self._rng.uniform(bounds[0], bounds[1])

    def task_failure(self) -> int | None:
        """The failure code to end a task with, or None to let it succeed."""
        if not self.profile.task_fail:
            return None
        draw = self._rng.random()
        for code, chance in sorted(self.profile.task_fail.items()):
            if draw < chance:
                self.fired[f"task_fail.{code}"] += 1
                return code
            draw -= chance
        return None
