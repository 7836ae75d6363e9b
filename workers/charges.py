"""Whether WaveSpeed charged for a job: `true`, `false` or `unknown`, settled as the job ends.

What WaveSpeed documents: it bills every prediction it accepts, it refunds failed tasks, and a
prediction can be deleted (`POST /api/v3/predictions/delete`). What it does not document:
whether deleting a task that is waiting or running refunds it, in full or in part, nor how
soon a running task stops. So a job was

- charged when its prediction completed (an output exists), whatever happened to it next;
- not charged when it never got a prediction and the answer to its submit is known, or when
  its prediction failed at WaveSpeed (refunded);
- unknown otherwise: deleted at WaveSpeed before it finished, stopped while a submit had no
  answer yet, or a prediction WaveSpeed lost or never finished.

The column `jobs.charged` holds the settled value (NULL: unknown). A deleted prediction's
last report (`Pipeline.withdraw`) may settle an unknown afterwards.
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy import case, null, true
from sqlalchemy.sql.elements import ColumnElement

from workers.errors import ErrorCode
from workers.models import Job
from workers.states import JobState

Charged = Literal["true", "false", "unknown"]

# Failures that come with an output: WaveSpeed finished (and billed) the prediction.
_AFTER_OUTPUT = frozenset(
    {ErrorCode.OUTPUT_EXPIRED, ErrorCode.OUTPUT_INVALID, ErrorCode.STORAGE_FAILED}
)
# Failures the pipeline reaches only from a refused submit or a failed task: nothing is
# billed in the first case, and WaveSpeed refunds the second.
_REFUNDED = frozenset(
    {
        ErrorCode.INVALID_INPUT,
        ErrorCode.IMAGE_UNREACHABLE,
        ErrorCode.CONTENT_MODERATED,
        ErrorCode.GENERATION_FAILED,
        ErrorCode.UPSTREAM_UNAVAILABLE,
    }
)
# Ends that stop a job from outside its own steps (the caller, its deadline, an operator):
# a submit may be on its way, so no prediction id yet proves nothing while `submitting`.
_STOPS = frozenset({ErrorCode.CANCELLED, ErrorCode.DEADLINE_EXCEEDED, ErrorCode.QUARANTINED})


def settled(code: ErrorCode) -> ColumnElement[bool | None]:
    """What a job ending with `code` was charged, as a SQL expression over the row as it
    stands before the ending UPDATE (Postgres evaluates SET against the old row)."""
    has_output = Job.output_url.is_not(None)
    if code in _AFTER_OUTPUT:
        return case((true(), True))
    if code in _REFUNDED:
        return case((has_output, True), else_=False)
    never_sent: ColumnElement[bool] = Job.prediction_id.is_(None)
    if code in _STOPS:
        never_sent = never_sent & (Job.status != JobState.SUBMITTING)
    elif code == ErrorCode.SUBMIT_UNCONFIRMED:
        return case((has_output, True), else_=null())
    return case((has_output, True), (never_sent, False), else_=null())


def of_report(status: str | None) -> bool | None:
    """What WaveSpeed's last report of a prediction says about its charge: a completed one is
    billed, a failed one refunded; anything else (deleted, still running, gone) says nothing."""
    return {"completed": True, "failed": False}.get(status or "")


def of(job: Job) -> Charged:
    """The record's `charged`: the settled value of an ended job; for a live one, what is
    known so far (nothing is charged before a submit, an output is)."""
    if job.charged is not None:
        return "true" if job.charged else "false"
    if job.status == JobState.QUEUED and job.prediction_id is None:
        return "false"
    if job.status == JobState.STORING or job.output_url is not None:
        return "true"
    return "unknown"
