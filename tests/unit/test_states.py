import uuid
from itertools import pairwise
from typing import cast

import pytest
from sqlalchemy import Interval, bindparam, func
from sqlalchemy.orm import Session

from workers.jobs import Transition
from workers.states import TERMINAL, JobState, can_transition

HAPPY_PATH = [
    JobState.QUEUED,
    JobState.SUBMITTING,
    JobState.PROCESSING,
    JobState.STORING,
    JobState.COMPLETED,
]


def test_happy_path_is_allowed_step_by_step() -> None:
    for src, dst in pairwise(HAPPY_PATH):
        assert can_transition(src, dst), (src, dst)


def test_no_skipping_ahead() -> None:
    assert not can_transition(JobState.QUEUED, JobState.PROCESSING)
    assert not can_transition(JobState.SUBMITTING, JobState.STORING)
    assert not can_transition(JobState.PROCESSING, JobState.COMPLETED)


@pytest.mark.parametrize("state", [s for s in JobState if not s.terminal])
def test_any_live_state_can_fail_or_be_cancelled(state: JobState) -> None:
    assert can_transition(state, JobState.FAILED)
    assert can_transition(state, JobState.CANCELLED)


@pytest.mark.parametrize("state", sorted(TERMINAL))
def test_terminal_states_are_final_but_for_restoring_a_failed_store(state: JobState) -> None:
    allowed = {dst for dst in JobState if can_transition(state, dst)}
    assert allowed == ({JobState.STORING} if state == JobState.FAILED else set())


def test_retries_go_back_to_the_queue() -> None:
    assert can_transition(JobState.SUBMITTING, JobState.QUEUED)
    assert can_transition(JobState.PROCESSING, JobState.QUEUED)
    assert not can_transition(JobState.STORING, JobState.QUEUED)


def test_only_a_job_still_in_the_queue_can_expire() -> None:
    assert {s for s in JobState if can_transition(s, JobState.EXPIRED)} == {JobState.QUEUED}


@pytest.mark.parametrize("name", ["error_code", "fisrt_check"])
def test_a_transition_refuses_values_that_are_not_its_parameters(name: str) -> None:
    """A column's name would become one more value the UPDATE sets, and a misspelt one would
    be dropped: both are refused before anything is sent."""
    adopt = Transition(
        JobState.SUBMITTING,
        JobState.PROCESSING,
        due_at=func.now() + bindparam("first_check", type_=Interval()),
    )
    assert {"job_id", "reason", "first_check"} <= adopt.params
    with pytest.raises(TypeError, match=name):
        adopt(cast(Session, None), uuid.uuid4(), reason="submitted", **{name: "x"})
