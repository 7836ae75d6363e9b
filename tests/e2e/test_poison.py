"""A task that keeps killing its worker is put aside for an operator after a few deaths,
visibly (the job's history, `kling quarantine list`), and runs again once released."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest
import redis
from sqlalchemy import func, update
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from config.settings import settings_from
from sandbox.processes import Process
from sandbox.stack import Stack
from sandbox.wavespeed.render import placeholder_video
from tests.support import wait_for
from workers import dispatch, jobs, poison, tenants
from workers.celery_app import create_celery
from workers.db import make_engine, make_session_factory, unit_of_work
from workers.dispatch import CeleryDispatcher
from workers.intake import GenerationInput, create_job
from workers.models import Job
from workers.runtime import build_storage
from workers.sealing import Sealer

pytestmark = pytest.mark.integration

DEATHS = 2


@contextmanager
def black_hole() -> Iterator[str]:
    """A CDN that takes connections and never answers: a store against it hangs."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/output.mp4"
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()


def test_a_store_that_kills_its_worker_is_put_aside_then_released(
    stack: Stack, database_url: str, portrait: bytes
) -> None:
    redis_url = re.sub(r"/\d+$", "", stack.env["REDIS_URL"]) + "/6"
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
    env |= {"POISON_MAX_DELIVERIES": str(DEATHS), "DOWNLOAD_TIMEOUT_SECONDS": "120"}
    settings: Settings = settings_from(stack.env, **{k.lower(): v for k, v in env.items()})
    broker = redis.Redis.from_url(redis_url)
    broker.flushdb()
    worker = stack.start_worker("poisoned", concurrency=1, env=env, queues=["store"])
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    storage = build_storage(settings)
    send = CeleryDispatcher(create_celery(settings))
    try:
        with black_hole() as cdn:
            job_id = storing_job(sessions, storage, settings, portrait, cdn)
            runs = poison.key(dispatch.STORE, str(job_id))
            for death in range(1, DEATHS + 1):
                make_due(sessions, job_id)  # what the reconciler does once a lease ran out
                send(dispatch.STORE, job_id)
                # The store hangs on the CDN: kill its process, as an OOM killer would.
                wait_for(lambda d=death: int(broker.get(runs) or 0) == d, timeout=60)
                kill_pool_child(worker)
            make_due(sessions, job_id)
            send(dispatch.STORE, job_id)  # the next try is not run but put aside
            wait_for(lambda: "put aside" in last_reason(sessions, job_id), timeout=60)
        with sessions() as session:
            assert jobs.get(session, job_id).status == "storing"
        operator = {**stack.env, **env}
        listed = json.loads(cli(operator, "quarantine", "list"))
        assert [(e["task"], e["subject_id"]) for e in listed] == [(dispatch.STORE, str(job_id))]
        assert f"died {DEATHS} times" in listed[0]["reason"]
        with cdn_serving(placeholder_video(5)) as fixed:
            with unit_of_work(sessions) as session:  # the CDN works again
                session.execute(update(Job).where(Job.id == job_id).values(output_url=fixed))
            make_due(sessions, job_id)
            cli(operator, "quarantine", "release", str(listed[0]["id"]))
            wait_for(lambda: status(sessions, job_id) == "completed", timeout=60)
        assert json.loads(cli(operator, "quarantine", "list")) == []
    finally:
        worker.stop()
        storage.close()
        broker.close()
        engine.dispose()


def storing_job(
    sessions: sessionmaker[Session], storage: object, settings: Settings, image: bytes, url: str
) -> uuid.UUID:
    with unit_of_work(sessions) as session:
        owner = tenants.create_tenant(session, "poisoned", Sealer.from_settings(settings))
    request = GenerationInput(prompt="slow pan left", guidance_scale=0.5, duration=5)
    job = create_job(sessions, storage, settings, owner, request, image)  # type: ignore[arg-type]
    with unit_of_work(sessions) as session:  # as if WaveSpeed had finished it
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(
                status="storing", prediction_id="p-poison", output_url=url,
                output_at=func.now(), store_deadline_at=func.now() + func.make_interval(0, 0, 0, 1),
            )
        )  # fmt: skip
    return job.id


@contextmanager
def cdn_serving(video: bytes) -> Iterator[str]:
    """A CDN that works: it serves `video`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "video/mp4")
            self.send_header("content-length", str(len(video)))
            self.end_headers()
            self.wfile.write(video)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/output.mp4"
    finally:
        server.shutdown()
        server.server_close()


def make_due(sessions: sessionmaker[Session], job_id: uuid.UUID) -> None:
    with unit_of_work(sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(due_at=func.now()))


def kill_pool_child(worker: Process) -> None:
    children = psutil.Process(worker.pid).children()
    assert len(children) == 1
    os.kill(children[0].pid, signal.SIGKILL)


def status(sessions: sessionmaker[Session], job_id: uuid.UUID) -> str:
    with sessions() as session:
        return str(jobs.get(session, job_id).status)


def last_reason(sessions: sessionmaker[Session], job_id: uuid.UUID) -> str:
    with sessions() as session:
        return str(jobs.events(session, job_id)[-1].reason)


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", *args], env=env, check=True,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return done.stdout
