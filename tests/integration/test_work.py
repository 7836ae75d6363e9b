"""Units of work: messages after the commit, one admission pass per freed slot, the outbox
settled by the task it announced, and what a job costs Postgres."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import event, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from tests.integration.flow import age, new_job, status, submit
from tests.support import RecordingDispatcher, SimulatorAdmin, wait_for
from workers import dispatch
from workers.db import PING_AFTER_SECONDS, make_engine, make_session_factory, unit_of_work
from workers.intake import GenerationInput, accept, commit_staged, create_job, stage
from workers.models import Job, OutboxMessage, Tenant
from workers.outbox import relay
from workers.pipeline import Pipeline, poll_delay, utcnow
from workers.runtime import build_callbacks
from workers.states import JobState
from workers.work import OUTBOX, Units

pytestmark = pytest.mark.usefixtures("stack")


def units(
    sessions: sessionmaker[Session], dispatcher: Any, admit: Any = None, max_countdown: float = 60
) -> Units:
    return Units(sessions, dispatcher, max_countdown, utcnow, admit=admit)


def test_messages_go_after_the_commit_and_never_for_a_rollback(
    sessions: sessionmaker[Session], dispatcher: RecordingDispatcher
) -> None:
    unit = units(sessions, dispatcher)
    subject = uuid.uuid4()
    with unit() as work:
        work.send(dispatch.POLL, subject, 5, seq=3)
        work.session.execute(text("SELECT 1"))
        assert dispatcher.sent == []  # nothing before the commit
    assert dispatcher.take() == [(dispatch.POLL, subject, 5, {"seq": 3})]
    with pytest.raises(RuntimeError), unit() as work:
        work.send(dispatch.POLL, subject)
        raise RuntimeError("the change failed")
    assert dispatcher.take() == []


def test_a_wait_longer_than_the_broker_should_hold_is_left_to_the_row(
    sessions: sessionmaker[Session], dispatcher: RecordingDispatcher
) -> None:
    with units(sessions, dispatcher, max_countdown=60)() as work:
        work.send(dispatch.RECOVER, uuid.uuid4(), 61, attempt=1)
        work.send(dispatch.RECOVER, uuid.uuid4(), 60, attempt=1)
    assert [countdown for _, _, countdown, _ in dispatcher.take()] == [60]


def test_a_broker_failure_after_the_commit_keeps_the_change_and_stops_the_rest(
    pipeline: Pipeline, portrait: bytes
) -> None:
    tried: list[str] = []

    def broker_down(task: str, *_: Any, **__: Any) -> None:
        tried.append(task)
        raise ConnectionError("redis is restarting")

    job_id = new_job(pipeline, portrait)
    with units(pipeline.sessions, broker_down)() as work:
        work.session.execute(update(Job).where(Job.id == job_id).values(prompt="kept"))
        work.send(dispatch.SUBMIT, job_id)
        work.send(dispatch.POLL, job_id)
    assert isinstance(work.unsent, ConnectionError)
    assert tried == [dispatch.SUBMIT]  # the first failure stops the rest
    assert status(pipeline, job_id).prompt == "kept"


def test_a_time_limit_that_fires_while_publishing_still_stops_the_step(
    sessions: sessionmaker[Session],
) -> None:
    def slow_broker(*_: Any, **__: Any) -> None:
        raise SoftTimeLimitExceeded()

    with pytest.raises(SoftTimeLimitExceeded), units(sessions, slow_broker)() as work:
        work.send(dispatch.POLL, uuid.uuid4())


def test_the_gate_is_asked_once_after_a_freeing_unit_and_only_when_a_job_waits(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    passes: list[int] = []
    unit = units(pipeline.sessions, dispatcher, admit=lambda: passes.append(1))
    with unit() as work:
        work.free_slot()
        work.free_slot()
    assert passes == []  # nobody waits: no pass, and no transaction for one
    new_job(pipeline, portrait)  # queued, not admitted
    with unit() as work:
        work.free_slot()
        work.free_slot()
    assert passes == [1]
    with unit() as work:
        pass
    assert passes == [1]


def test_the_first_task_settles_its_outbox_row_and_the_relay_leaves_it_alone(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> None:
    job_id = new_job(pipeline, portrait)
    with pipeline.sessions() as session:
        row = session.scalars(select(OutboxMessage).where(OutboxMessage.job_id == job_id)).one()
    pipeline.submit(job_id, row.id)
    assert status(pipeline, job_id).status == JobState.PROCESSING
    with pipeline.sessions() as session:
        assert session.get_one(OutboxMessage, row.id).published_at is not None
    assert relay(pipeline.sessions, dispatcher) == 0


def test_the_api_sends_the_first_task_with_the_outbox_row_behind_it(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, tenant: Tenant
) -> None:
    request = GenerationInput(prompt="slow pan left", guidance_scale=0.5, duration=5)
    staged = stage(pipeline.storage, pipeline.settings, request, portrait)
    job = commit_staged(
        pipeline.work, pipeline.storage, staged, lambda w: accept(w, tenant, request, staged)
    )
    ((task, job_id, countdown, kwargs),) = dispatcher.take()
    assert (task, job_id, countdown) == (dispatch.SUBMIT, job.id, None)
    with pipeline.sessions() as session:
        row = session.get_one(OutboxMessage, kwargs[OUTBOX])
        assert row.job_id == job.id and row.published_at is None  # until its task runs


def test_a_job_from_accept_to_its_callback_is_eight_transactions(
    pipeline: Pipeline,
    portrait: bytes,
    dispatcher: RecordingDispatcher,
    simulator: SimulatorAdmin,
    tenant: Tenant,
) -> None:
    """Accepted, submitted, settled by WaveSpeed's webhook, stored, called back: the path of
    nearly every job, and what each one costs Postgres in commits and statements."""
    simulator.set_faults(inference_seconds=[0, 0])
    commits = _commits(pipeline)
    engine = pipeline.sessions.kw["bind"]
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    received: list[int] = []
    service = replace(build_callbacks(pipeline), post=lambda *_: _answered(received))

    request = GenerationInput(
        prompt="slow pan left", guidance_scale=0.5, duration=5,
        webhook_url="https://hooks.example.com/kling",
    )  # fmt: skip
    settings, storage = pipeline.settings, pipeline.storage
    job_id = create_job(pipeline.sessions, storage, settings, tenant, request, portrait).id
    with pipeline.sessions() as session:
        outbox = session.scalars(select(OutboxMessage.id)).one()
    pipeline.submit(job_id, outbox)
    prediction_id = status(pipeline, job_id).prediction_id
    assert prediction_id
    finished = wait_for(lambda: _finished(pipeline, prediction_id), timeout=30, interval=0.2)
    assert pipeline.take_webhook(prediction_id, finished)
    pipeline.store(job_id)
    (delivery,) = [j for t, j, *_ in dispatcher.take() if t == dispatch.NOTIFY]
    service.deliver(delivery)
    assert status(pipeline, job_id).status == JobState.COMPLETED and received == [204]
    assert len(commits) <= 8, len(commits)
    # Statements too: each costs the worker CPU (a transition and its event are one).
    assert len(statements) <= 39, len(statements)


def test_a_poll_that_finds_the_prediction_running_is_one_transaction(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    """The poll's claim books the chain's next check, so a prediction still running costs no
    second write, and the row still says when the check is due (the reconciler's cue if its
    message is lost). A chain taken over (no `seq`) cannot know its check in advance: it
    writes it after the answer."""
    simulator.set_faults(inference_seconds=[30, 30])
    job_id, first = _processing(pipeline, portrait, dispatcher)
    commits = _commits(pipeline)
    pipeline.poll(job_id, first["seq"])
    assert len(commits) == 1
    ((task, _, countdown, kwargs),) = dispatcher.take()
    assert (task, kwargs["seq"]) == (dispatch.POLL, first["seq"] + 1)
    assert countdown == poll_delay(pipeline.settings, first["seq"] + 1)
    assert _booked_in(pipeline, job_id) == countdown
    # The message was lost; the reconciler's takeover, an hour on, books the check again.
    age(pipeline, job_id, 3600, "due_at")
    commits.clear()
    pipeline.poll(job_id)
    assert len(commits) == 2
    ((task, _, countdown, _),) = dispatcher.take()
    assert task == dispatch.POLL and _booked_in(pipeline, job_id) == countdown


def test_a_poll_books_again_what_the_claim_could_not_know(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher, simulator: SimulatorAdmin
) -> None:
    """A slow answer: the claim's booking would be due before the message it sends, and the
    reconciler would take a message on time for a lost one. Resends counted meanwhile: the
    check ran, so they start again from zero."""
    grace = pipeline.settings.poll_overdue_grace_seconds
    slow = grace / 10 * 1000 + 300
    simulator.set_faults(inference_seconds=[60, 60], result_latency_ms=[slow, slow])
    job_id, chain = _processing(pipeline, portrait, dispatcher)
    commits = _commits(pipeline)
    pipeline.poll(job_id, chain["seq"])
    assert len(commits) == 2
    ((_, _, countdown, chain),) = dispatcher.take()
    assert _booked_in(pipeline, job_id) == countdown  # from the answer, not from the claim
    simulator.set_faults(inference_seconds=[60, 60])
    with unit_of_work(pipeline.sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(resends=1))
    commits.clear()
    pipeline.poll(job_id, chain["seq"])
    assert len(commits) == 2
    with pipeline.sessions() as session:
        assert session.get_one(Job, job_id).resends == 0


def _processing(
    pipeline: Pipeline, portrait: bytes, dispatcher: RecordingDispatcher
) -> tuple[uuid.UUID, dict[str, Any]]:
    """A job submitted, and the keywords of its first poll's message."""
    job_id = new_job(pipeline, portrait)
    submit(pipeline, job_id)
    ((_, _, _, first),) = dispatcher.take()
    return job_id, first


def _commits(pipeline: Pipeline) -> list[int]:
    """The commits of the pipeline's engine from now on."""
    commits: list[int] = []
    event.listen(pipeline.sessions.kw["bind"], "commit", lambda _: commits.append(1))
    return commits


def _booked_in(pipeline: Pipeline, job_id: uuid.UUID) -> float:
    """Seconds from the job's last write to its due time."""
    with pipeline.sessions() as session:
        job = session.get_one(Job, job_id)
        assert job.due_at is not None
        return (job.due_at - job.updated_at).total_seconds()


def _answered(received: list[int]) -> httpx.Response:
    received.append(204)
    return httpx.Response(204)


def _finished(pipeline: Pipeline, prediction_id: str) -> dict[str, Any] | None:
    prediction = pipeline.wavespeed.result(prediction_id)
    if prediction.status != "completed":
        return None
    return {"id": prediction.id, "status": "completed", "outputs": prediction.outputs}


def test_a_unit_of_work_is_one_transaction_for_postgres(database_url: str, tmp_path: Path) -> None:
    """The pool tests a connection only after it sat idle: a busy process pays no ping, and
    so no extra round trip and no extra transaction, per unit of work. Read from libpq's trace
    of this engine's own connection, which no other backend of the server can add to."""
    engine = make_engine(database_url, pool_size=1, max_overflow=0)
    sessions = make_session_factory(engine)
    wire = tmp_path / "wire.log"
    with wire.open("w") as trace:

        @event.listens_for(engine, "connect")
        def _trace(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.pgconn.trace(trace.fileno())
            dbapi_connection.pgconn.set_trace_flags(
                psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE
            )

        idle: list[float] = []  # from one unit's end to the next one's start
        ended = None
        for _ in range(50):
            started = time.monotonic()
            if ended is not None:
                idle.append(started - ended)
            with unit_of_work(sessions) as session:
                session.execute(text("SELECT 1"))
            ended = time.monotonic()
        engine.dispose()
    # A statement is a simple Query, or an Execute once psycopg has prepared it.
    messages = [line.split("\t") for line in wire.read_text().splitlines() if line[:2] == "F\t"]
    sent = [m[3].strip(' "') if m[2] == "Query" else m[2] for m in messages
            if m[2] in ("Query", "Execute")]  # fmt: skip

    assert sent.count("COMMIT") == 50, sent
    # A ping is a SELECT 1 rolled back; only a gap a loaded machine stretched past the
    # threshold may earn one, where SQLAlchemy's pre-ping would send one per checkout.
    assert sent.count("ROLLBACK") <= sum(gap >= PING_AFTER_SECONDS for gap in idle), sent
    assert len(sent) == 150 + 2 * sent.count("ROLLBACK"), sent


def test_a_connection_that_died_while_idle_is_replaced_before_use(database_url: str) -> None:
    engine = make_engine(database_url, pool_size=1, max_overflow=0, ping_after=0.2)
    sessions = make_session_factory(engine)
    try:
        with sessions() as session:
            pid = session.scalar(text("SELECT pg_backend_pid()"))
        with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        time.sleep(0.3)
        with unit_of_work(sessions) as session:  # no error: tested, found dead, replaced
            assert session.scalar(text("SELECT pg_backend_pid()")) != pid
    finally:
        engine.dispose()
