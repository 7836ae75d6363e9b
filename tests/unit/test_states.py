from itertools import pairwise

import pytest

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
