"""The API's waiters: woken by PostgreSQL's notifications of a job's state changes, and by
the listener's return after its connection was lost (a notification may have been missed)."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from api.waiters import APPLICATION, JobWatch, WaiterSlots, libpq_dsn
from tests.integration.flow import new_job
from workers.intake import Refusal
from workers.pipeline import Pipeline

pytestmark = pytest.mark.integration


async def _woken(event: asyncio.Event, within: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), within)
    except TimeoutError:
        return False
    return True


async def _listening(watch: JobWatch) -> None:
    while not watch.listening:
        await asyncio.sleep(0.05)


def test_a_change_wakes_the_waiters_of_its_job_only(
    pipeline: Pipeline, portrait: bytes, database_url: str
) -> None:
    changing, quiet = new_job(pipeline, portrait), new_job(pipeline, portrait)

    async def scenario() -> tuple[bool, bool]:
        watch = JobWatch(database_url)
        listener = asyncio.create_task(watch.run())
        async with watch.watch(changing) as woken, watch.watch(quiet) as other:
            assert watch.listening  # the first waiter started the listener
            woken.clear()
            await asyncio.to_thread(pipeline.cancel, changing)
            result = await _woken(woken, 5), await _woken(other, 0.5)
        listener.cancel()
        return result

    assert asyncio.run(scenario()) == (True, False)


def test_waiters_wake_when_the_listener_comes_back(
    pipeline: Pipeline, portrait: bytes, database_url: str
) -> None:
    """A change made while the listening connection is down sends a notification nobody
    hears: waiters are woken when the listener is lost and again when it is back, so they
    look again; and notifications are heard again after it."""
    job_id = new_job(pipeline, portrait)

    async def scenario() -> tuple[bool, bool]:
        watch = JobWatch(database_url, reconnect_max=0.5)
        listener = asyncio.create_task(watch.run())
        async with watch.watch(job_id) as woken:
            woken.clear()
            with psycopg.connect(libpq_dsn(database_url), autocommit=True) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s AND datname = current_database()",
                    (APPLICATION,),
                )
            back = await _woken(woken, 10)
            woken.clear()
            await asyncio.wait_for(_listening(watch), 10)
            await asyncio.to_thread(pipeline.cancel, job_id)  # heard again after it
            again = await _woken(woken, 5)
        listener.cancel()
        return back, again

    assert asyncio.run(scenario()) == (True, True)


def test_nobody_listens_while_nobody_waits(database_url: str) -> None:
    """A listening connection is woken (and counts a transaction) by every notification of
    every job: it is open only while someone waits, and `linger` seconds more."""

    def listeners() -> int:
        with psycopg.connect(libpq_dsn(database_url), autocommit=True) as admin:
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = %s AND datname = current_database()",
                (APPLICATION,),
            ).fetchone()
        return int(row[0]) if row else 0

    async def scenario() -> list[int]:
        watch = JobWatch(database_url, linger=0.5)
        listener = asyncio.create_task(watch.run())
        await asyncio.sleep(1)
        counts = [await asyncio.to_thread(listeners)]
        async with watch.watch(uuid.uuid4()):
            counts.append(await asyncio.to_thread(listeners))
        await asyncio.sleep(2)
        counts.append(await asyncio.to_thread(listeners))
        async with watch.watch(uuid.uuid4()):  # and again when someone waits again
            counts.append(await asyncio.to_thread(listeners))
        listener.cancel()
        return counts

    assert asyncio.run(scenario()) == [0, 1, 0, 1]


def test_a_tenant_holds_at_most_its_share_of_waiters() -> None:
    slots = WaiterSlots(2)
    with slots.slot("a"), slots.slot("a"):
        with pytest.raises(Refusal) as refused:
            slots.check("a")
        assert (refused.value.status, refused.value.code) == (429, "too_many_waiters")
        with slots.slot("b"):  # another tenant's share is its own
            pass
    with slots.slot("a"), slots.slot("a"):  # given back when they end
        pass
