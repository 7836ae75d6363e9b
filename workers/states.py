"""Job states and the transitions allowed between them (DESIGN.md, "Job states")."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    SUBMITTING = "submitting"
    PROCESSING = "processing"
    STORING = "storing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Not submitted by its start deadline: never sent to WaveSpeed, so never charged.
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED})
# The states a job is still on its way in: where it can be stopped (cancel, its deadline).
LIVE = tuple(s for s in JobState if s not in TERMINAL)

# Forward moves of the happy path, plus the steps back to `queued` that a retry takes.
_FORWARD: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.SUBMITTING, JobState.EXPIRED}),
    JobState.SUBMITTING: frozenset({JobState.PROCESSING, JobState.QUEUED}),
    # Back to the queue when WaveSpeed fails a task with a retryable (5xxx) code.
    JobState.PROCESSING: frozenset({JobState.STORING, JobState.QUEUED}),
    JobState.STORING: frozenset({JobState.COMPLETED}),
}


# The one way out of a terminal state: a paid-for output whose store failed is stored again
# when an operator or the producer asks (`Pipeline.restore`).
RESTORE = (JobState.FAILED, JobState.STORING)


def can_transition(src: JobState, dst: JobState) -> bool:
    """Whether `src -> dst` is a legal move: the path above, failing/cancelling a live job, or
    restoring a failed store."""
    if (src, dst) == RESTORE:
        return True
    if src.terminal:
        return False
    if dst in (JobState.FAILED, JobState.CANCELLED):
        return True
    return dst in _FORWARD.get(src, frozenset())
