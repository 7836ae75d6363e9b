"""`Prefer: wait=N` (RFC 7240) as the job route reads it."""

from __future__ import annotations

import pytest

from api.routes import _wait_of
from config import Settings
from workers.intake import Refusal

SETTINGS = Settings(long_poll_max_seconds=60)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, 0),
        ("", 0),
        ("wait=10", 10),
        ("WAIT = 7", 7),
        ('wait="5"', 5),
        ("respond-async, wait=20", 20),
        ("return=minimal; foo, wait=3", 3),
        ("wait=600", 60),  # capped: Preference-Applied says what was applied
        ("handling=lenient", 0),  # preferences we do not know are ignored
    ],
)
def test_wait_preferences(header: str | None, seconds: int) -> None:
    assert _wait_of(header, SETTINGS) == seconds


@pytest.mark.parametrize("header", ["wait=", "wait=soon", "wait=-1", "wait=1.5", "wait=9999999"])
def test_a_wait_that_is_no_number_is_refused(header: str) -> None:
    with pytest.raises(Refusal) as refused:
        _wait_of(header, SETTINGS)
    assert (refused.value.status, refused.value.field) == (422, "Prefer")
