"""Generation requests over the broker, taken by the service the `generation.request` task
runs: accepted, refused, redelivered, another tenant's, a reply queue not allowed, garbage;
and replies published as the producer's own tasks."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from api import inbox
from tests.support import RecordingDispatcher, image_bytes, serving
from workers import dispatch, jobs, tenants
from workers.announce import job_event
from workers.callbacks import COMPLETED, REFUSED
from workers.db import unit_of_work
from workers.dispatch import PUBLISH_ERRORS
from workers.models import BrokerRequest, Job, Reply, Tenant, TenantEvent
from workers.pipeline import Pipeline
from workers.replies import Replies
from workers.sealing import Sealer

pytestmark = pytest.mark.integration

REPLY = {"task": "myapp.video_ready", "queue": "myapp", "events": [COMPLETED, REFUSED]}


@pytest.fixture
def picture(portrait: bytes) -> Iterator[str]:
    with serving(portrait, "image/png") as url:
        yield url


def producer(sessions: sessionmaker[Session], sealer: Sealer, name: str) -> tuple[str, str]:
    """A tenant and a key of its: (tenant id, key)."""
    with unit_of_work(sessions) as session:
        tenant = tenants.create_tenant(session, name, sealer)
        _, key = tenants.create_key(session, tenant)
        return tenant.id, key


@pytest.fixture
def acme(sessions: sessionmaker[Session], sealer: Sealer) -> tuple[str, str]:
    return producer(sessions, sealer, "acme")


def message(key: str, picture: str, **fields: Any) -> dict[str, Any]:
    return {"api_key": key, "request_id": "order-1", "image_url": picture,
            "prompt": "slow push-in", **fields}  # fmt: skip


def jobs_of(sessions: sessionmaker[Session], tenant_id: str) -> list[Job]:
    with sessions() as session:
        return list(session.scalars(select(Job).where(Job.tenant_id == tenant_id)))


def test_a_request_becomes_a_job_once_however_often_it_comes(
    pipeline: Pipeline, sessions: sessionmaker[Session], acme: tuple[str, str], picture: str
) -> None:
    tenant_id, key = acme
    sent = message(key, picture, metadata={"order": 1}, reply=REPLY)
    outcomes = [inbox.take(pipeline, dict(sent)) for _ in range(3)]
    assert outcomes == [inbox.ACCEPTED, inbox.DUPLICATE, inbox.DUPLICATE]
    (job,) = jobs_of(sessions, tenant_id)
    assert (job.request_id, job.metadata_, job.reply) == ("order-1", {"order": 1}, REPLY)
    with sessions() as session:
        recorded = session.get(BrokerRequest, (tenant_id, "order-1"))
    assert recorded is not None and recorded.job_id == job.id and recorded.problem is None
    # Its first task goes out as an HTTP create's does: after the commit, backed by a row.
    assert isinstance(pipeline.dispatch, RecordingDispatcher)
    assert [(t, j) for t, j, *_ in pipeline.dispatch.take()] == [(dispatch.SUBMIT, job.id)]


def test_the_same_request_id_of_another_tenant_is_its_own(
    pipeline: Pipeline,
    sessions: sessionmaker[Session],
    sealer: Sealer,
    acme: tuple[str, str],
    picture: str,
) -> None:
    other_id, other_key = producer(sessions, sealer, "other")
    assert inbox.take(pipeline, message(acme[1], picture)) == inbox.ACCEPTED
    assert inbox.take(pipeline, message(other_key, picture)) == inbox.ACCEPTED
    assert len(jobs_of(sessions, acme[0])) == len(jobs_of(sessions, other_id)) == 1


def test_a_refused_request_is_recorded_and_announced(
    pipeline: Pipeline, sessions: sessionmaker[Session], acme: tuple[str, str]
) -> None:
    tenant_id, key = acme
    with serving(image_bytes(200, 200), "image/png") as small:
        sent = message(key, small, reply=REPLY, webhook_url="http://127.0.0.1:9/hook")
        assert inbox.take(pipeline, sent) == inbox.REFUSED_OUTCOME
        assert inbox.take(pipeline, sent) == inbox.DUPLICATE  # reported once
    assert jobs_of(sessions, tenant_id) == []
    with sessions() as session:
        recorded = session.get(BrokerRequest, (tenant_id, "order-1"))
        (event,) = session.scalars(select(TenantEvent).where(TenantEvent.type == REFUSED))
        reply = session.get(Reply, event.id)
    assert recorded is not None and recorded.problem is not None
    assert recorded.problem["code"] == "image_too_small" and recorded.job_id is None
    assert event.payload["data"] == {"request_id": "order-1", "problem": recorded.problem}
    assert reply is not None and (reply.task, reply.queue) == ("myapp.video_ready", "myapp")
    assert isinstance(pipeline.dispatch, RecordingDispatcher)
    sent_tasks = {t for t, *_ in pipeline.dispatch.take()}
    assert sent_tasks == {dispatch.NOTIFY, dispatch.REPLY}  # the callback and the reply


@pytest.mark.parametrize(
    ("reply", "allowed"),
    [
        ({"task": "myapp.done", "queue": "billing"}, "myapp.*"),  # outside the tenant's glob
        ({"task": "myapp.done", "queue": "submit"}, None),  # the product's own queue
        ({"task": "generation.submit", "queue": "myapp"}, None),  # the product's own task
        ({"task": "myapp.done"}, None),  # no queue
    ],
)
def test_a_reply_the_tenant_may_not_have_is_refused(
    pipeline: Pipeline,
    sessions: sessionmaker[Session],
    acme: tuple[str, str],
    picture: str,
    reply: dict[str, Any],
    allowed: str | None,
) -> None:
    tenant_id, key = acme
    with unit_of_work(sessions) as session:
        session.execute(update(Tenant).where(Tenant.id == tenant_id).values(reply_queues=allowed))
    assert inbox.take(pipeline, message(key, picture, reply=reply)) == inbox.REFUSED_OUTCOME
    with sessions() as session:
        recorded = session.get(BrokerRequest, (tenant_id, "order-1"))
        replies = session.scalar(select(func.count()).select_from(Reply))
    assert recorded is not None and recorded.problem is not None
    assert recorded.problem["errors"][0]["field"].startswith("reply")
    assert replies == 0  # nothing goes to a queue it may not reply to
    assert jobs_of(sessions, tenant_id) == []


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        "generation please",
        {"request_id": "r-1", "prompt": "x"},  # no key
        {"api_key": "kl_not-a-key", "request_id": "r-1", "prompt": "x"},
        {"api_key": "KEY", "prompt": "x"},  # no request id
        {"api_key": "KEY", "request_id": "has spaces", "prompt": "x"},
        {"api_key": "KEY", "request_id": "x" * 256, "prompt": "x"},
    ],
)
def test_a_message_that_is_no_request_makes_nothing(
    pipeline: Pipeline, sessions: sessionmaker[Session], acme: tuple[str, str], garbage: Any
) -> None:
    tenant_id, key = acme
    if isinstance(garbage, dict) and garbage.get("api_key") == "KEY":
        garbage = {**garbage, "api_key": key}
    with structlog.testing.capture_logs() as logs:
        assert inbox.take(pipeline, garbage) == inbox.REJECTED
    assert key not in repr(logs) and "kl_not-a-key" not in repr(logs)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(BrokerRequest)) == 0
        assert session.scalar(select(func.count()).select_from(TenantEvent)) == 0
    assert jobs_of(sessions, tenant_id) == []


def test_a_full_queue_is_tried_again_before_it_is_refused(
    pipeline: Pipeline, sessions: sessionmaker[Session], acme: tuple[str, str], picture: str
) -> None:
    tenant_id, key = acme
    with unit_of_work(sessions) as session:
        session.execute(update(Tenant).where(Tenant.id == tenant_id).values(max_queued=1))
    assert inbox.take(pipeline, message(key, picture, request_id="a")) == inbox.ACCEPTED
    with pytest.raises(inbox.TryAgain):
        inbox.take(pipeline, message(key, picture, request_id="b"))
    with sessions() as session:  # nothing recorded: the request is still to be taken
        assert session.get(BrokerRequest, (tenant_id, "b")) is None
    last = inbox.take(pipeline, message(key, picture, request_id="b"), last_try=True)
    assert last == inbox.REFUSED_OUTCOME


class FlakyBroker:
    def __init__(self, failures: int) -> None:
        self.failures, self.published = failures, []  # type: ignore[var-annotated]

    def __call__(self, task: str, queue: str, body: dict[str, Any], message_id: str) -> None:
        if self.failures:
            self.failures -= 1
            raise PUBLISH_ERRORS[1]("broker away")
        self.published.append((task, queue, body, message_id))


def test_a_reply_is_published_once_sent_and_retried_while_the_broker_is_away(
    pipeline: Pipeline, sessions: sessionmaker[Session], acme: tuple[str, str], picture: str
) -> None:
    tenant_id, key = acme
    assert inbox.take(pipeline, message(key, picture, reply=REPLY)) == inbox.ACCEPTED
    (job,) = jobs_of(sessions, tenant_id)
    with pipeline.work() as work:
        announced = job_event(work, jobs.get(work.session, job.id), COMPLETED, datetime.now(UTC))
    assert announced.reply == announced.event
    broker = FlakyBroker(failures=2)
    replies = Replies(pipeline.work, broker, pipeline.clock, 5, 0.01, 0.02)
    assert not replies.send(announced.event) and not replies.send(announced.event)
    with sessions() as session:
        row = session.get(Reply, announced.event)
        assert row is not None and (row.status, row.attempts) == ("pending", 2)
        assert row.last_error and "broker away" in row.last_error
    assert replies.send(announced.event)
    assert not replies.send(announced.event)  # sent: a late duplicate message sends nothing
    ((task, queue, body, message_id),) = broker.published
    assert (task, queue, message_id) == ("myapp.video_ready", "myapp", f"msg_{announced.event.hex}")
    assert body["type"] == COMPLETED and body["data"]["request_id"] == "order-1"


def test_a_reply_that_cannot_be_published_fails_at_its_cap(
    pipeline: Pipeline, sessions: sessionmaker[Session], acme: tuple[str, str], picture: str
) -> None:
    tenant_id, key = acme
    inbox.take(pipeline, message(key, picture, reply=REPLY))
    (job,) = jobs_of(sessions, tenant_id)
    with pipeline.work() as work:
        event = job_event(work, jobs.get(work.session, job.id), COMPLETED, datetime.now(UTC)).event
    replies = Replies(pipeline.work, FlakyBroker(failures=99), pipeline.clock, 3, 0.01, 0.02)
    for _ in range(4):
        replies.send(event)
    with sessions() as session:
        row = session.get(Reply, event)
    assert row is not None and (row.status, row.attempts) == ("failed", 3)
