"""The tenant's event feed: every event, callback or not, in an order a cursor can trust."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from tests.integration.flow import new_job, status
from workers import callbacks, feed, jobs
from workers.announce import job_event
from workers.models import CallbackDelivery, TenantEvent
from workers.pipeline import Pipeline
from workers.work import silent

pytestmark = pytest.mark.integration


def _page(
    pipeline: Pipeline,
    tenant_id: str,
    after: uuid.UUID | None = None,
    types: tuple[str, ...] = (),
) -> list[TenantEvent]:
    with pipeline.sessions() as session:
        return list(feed.page(session, tenant_id, after=after, types=types, limit=100))


def _ids(events: list[TenantEvent]) -> list[uuid.UUID]:
    return [e.id for e in events]


def test_every_event_is_in_the_feed_and_a_callback_carries_its_id(
    pipeline: Pipeline, portrait: bytes
) -> None:
    quiet = new_job(pipeline, portrait)  # no callback URL
    called = new_job(pipeline, portrait, webhook_url="https://example.com/hooks")
    pipeline.cancel(quiet)
    pipeline.cancel(called)
    tenant_id = status(pipeline, quiet).tenant_id
    events = _page(pipeline, tenant_id)
    assert [(e.job_id, e.type) for e in events] == [
        (quiet, callbacks.CANCELLED),
        (called, callbacks.CANCELLED),
    ]
    assert events[0].payload["data"]["status"] == "cancelled"
    with pipeline.sessions() as session:
        (delivery,) = session.scalars(
            select(CallbackDelivery).where(CallbackDelivery.job_id == called)
        ).all()
    assert delivery.id == events[1].id  # the callback's webhook-id names the feed's event
    assert _ids(_page(pipeline, tenant_id, after=events[0].id)) == _ids(events[1:])
    assert _page(pipeline, tenant_id, after=events[1].id) == []
    assert _page(pipeline, tenant_id, types=(callbacks.COMPLETED,)) == []
    assert _page(pipeline, "someone-else") == []
    with pytest.raises(feed.UnknownEvent):
        _page(pipeline, "someone-else", after=events[0].id)


def test_an_event_that_commits_late_is_not_skipped_by_a_cursor(
    pipeline: Pipeline, portrait: bytes
) -> None:
    """The event written first commits last. A feed ordered by insertion would hand out the
    second event, and a reader past it would never see the first one."""
    first, second, earlier = (new_job(pipeline, portrait) for _ in range(3))
    pipeline.cancel(earlier)
    tenant_id = status(pipeline, first).tenant_id
    (mark,) = _page(pipeline, tenant_id)
    with silent(pipeline.sessions) as slow:
        job_event(slow, jobs.get(slow.session, first), callbacks.PROCESSING, pipeline.clock())
        with silent(pipeline.sessions) as quick:
            job_event(
                quick, jobs.get(quick.session, second), callbacks.PROCESSING, pipeline.clock()
            )
        # `second` is committed, but an older transaction is still open: held back.
        assert _page(pipeline, tenant_id, after=mark.id) == []
    after_mark = _page(pipeline, tenant_id, after=mark.id)
    assert [e.job_id for e in after_mark] == [first, second]


def test_event_ids_are_only_ours() -> None:
    made = uuid.uuid4()
    assert feed.parse_event_id(feed.event_id(made)) == made
    for wrong in ("", "msg_", f"msg_{made.hex}0", made.hex, f"evt_{made.hex}", "msg_" + "z" * 32):
        with pytest.raises(ValueError):
            feed.parse_event_id(wrong)
