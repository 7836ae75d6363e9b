"""The create body's schema refuses what PostgreSQL or a page of results could not hold: each
refusal names the field and a stable rule code, as the API answers it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from api.problems import validation_problem
from api.schemas import BulkCancel, GenerationCreate

BODY = {"image_url": "https://example.com/a.png", "prompt": "slow push-in"}


def refusals(raw: str) -> list[tuple[str, str]]:
    """(field, code) of each error, for a body as Python's JSON parser reads it (NaN too)."""
    with pytest.raises(ValidationError) as caught:
        GenerationCreate.model_validate(json.loads(raw))
    problem = validation_problem(caught.value.errors(include_url=False))
    return [(e["field"], e["code"]) for e in problem["errors"]]


def body(**fields: Any) -> str:
    return json.dumps({**BODY, **fields})


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused_where_they_stand(number: str) -> None:
    assert refusals(body()[:-1] + f', "guidance_scale": {number}}}') == [
        ("guidance_scale", "not_finite")
    ]
    assert refusals(body()[:-1] + f', "metadata": {{"ok": 1, "x": {number}}}}}') == [
        ("metadata.x", "not_finite")
    ]


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({f"k{i}": i for i in range(51)}, ("metadata", "too_many_keys")),
        ({"k" * 65: 1}, ("metadata", "invalid_key")),
        ({"": 1}, ("metadata", "invalid_key")),
        ({"note": "v" * 513}, ("metadata.note", "too_long")),
        ({"list": [1, 2]}, ("metadata.list", "not_a_scalar")),
        ({"nested": {"a": 1}}, ("metadata.nested", "not_a_scalar")),
        ({"nul": "a\x00b"}, ("metadata.nul", "invalid")),
        ({f"k{i:02}": "v" * 300 for i in range(30)}, ("metadata", "too_large")),
    ],
)
def test_metadata_is_bounded_in_keys_and_bytes(
    metadata: dict[str, Any], expected: tuple[str, str]
) -> None:
    assert refusals(body(metadata=metadata)) == [expected]


def test_metadata_at_its_bounds_is_accepted() -> None:
    metadata: dict[str, Any] = {f"{i:02}" + "k" * 62: "v" * 96 for i in range(50)}
    metadata.update({"01" + "k" * 62: 1.5, "02" + "k" * 62: None, "03" + "k" * 62: True})
    assert 8000 < len(json.dumps(metadata, separators=(",", ":"))) <= 8 * 1024
    created = GenerationCreate.model_validate({**BODY, "metadata": metadata})
    assert created.metadata == metadata


def test_a_priority_is_high_normal_or_low_and_normal_unless_given() -> None:
    assert GenerationCreate.model_validate(BODY).priority == "normal"
    assert GenerationCreate.model_validate({**BODY, "priority": "high"}).priority == "high"
    (refusal,) = refusals(body(priority="urgent"))
    assert refusal[0] == "priority"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"start_deadline": "2020-01-01T00:00:00Z"}, ("start_deadline", "in_the_past")),
        ({"start_deadline": "2999-01-01T00:00:00Z"}, ("start_deadline", "too_far")),
        ({"start_deadline": "2030-01-01T00:00:00"}, ("start_deadline", "needs_offset")),
        ({"start_within_seconds": 0}, ("start_within_seconds", "out_of_range")),
        ({"start_within_seconds": 31 * 86400}, ("start_within_seconds", "out_of_range")),
    ],
)
def test_a_start_deadline_is_an_aware_time_ahead_within_30_days(
    fields: dict[str, Any], expected: tuple[str, str]
) -> None:
    assert refusals(body(**fields)) == [expected]


def test_a_start_deadline_soon_is_accepted() -> None:
    soon = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    assert GenerationCreate.model_validate({**BODY, "start_deadline": soon}).start_deadline


def test_a_bulk_filter_holds_only_text_postgres_can_store() -> None:
    for metadata in ({"a\x00b": "x"}, {"a": "x\x00"}, {"a": "\ud800"}):
        with pytest.raises(ValidationError):
            BulkCancel.model_validate({"metadata": metadata})
