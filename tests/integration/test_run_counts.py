"""What a worker's deaths leave counted in Redis (`workers.poison`), on a real server: the
runs that died stay counted, and nothing else stays."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from sandbox.stack import Stack
from workers import dispatch
from workers.poison import COUNT_TTL_SECONDS, RunCounter, key

pytestmark = pytest.mark.integration

TASK = dispatch.POLL


@pytest.fixture
def client(stack: Stack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    yield client
    client.close()


@pytest.fixture
def runs(client: redis.Redis) -> RunCounter:
    return RunCounter(client, limit=2)


def kept(client: redis.Redis, subject: str) -> tuple[int, int]:
    """The count kept for `subject`, and for how many seconds more."""
    with client.pipeline() as pipe:
        pipe.get(key(TASK, subject))
        pipe.ttl(key(TASK, subject))
        count, ttl = pipe.execute()
    return int(count or 0), int(ttl)


def test_a_run_that_ends_leaves_no_key_behind(runs: RunCounter, client: redis.Redis) -> None:
    subject = str(uuid.uuid4())
    assert runs.begin(TASK, subject) == 1
    runs.end(TASK, subject)
    # Not a zero kept for a week: one for every task of every job would fill Redis.
    assert client.exists(key(TASK, subject)) == 0


def test_the_runs_that_died_stay_counted_past_a_run_that_ends(
    runs: RunCounter, client: redis.Redis
) -> None:
    subject = str(uuid.uuid4())
    runs.begin(TASK, subject)
    runs.begin(TASK, subject)  # two runs whose worker died: neither ended
    assert runs.begin(TASK, subject) == 3
    runs.end(TASK, subject)
    count, ttl = kept(client, subject)
    assert count == 2 and 0 < ttl <= COUNT_TTL_SECONDS
    assert runs.poisoned(runs.begin(TASK, subject))


def test_a_count_lost_while_its_run_ran_does_not_excuse_a_later_death(
    runs: RunCounter, client: redis.Redis
) -> None:
    subject = str(uuid.uuid4())
    runs.begin(TASK, subject)
    client.delete(key(TASK, subject))  # flushed, or expired, while the run ran
    runs.end(TASK, subject)
    assert client.exists(key(TASK, subject)) == 0  # not a count of -1
    runs.begin(TASK, subject)  # a run whose worker dies
    assert runs.begin(TASK, subject) == 2


def test_a_restarted_redis_that_forgot_the_script_still_uncounts(
    runs: RunCounter, client: redis.Redis
) -> None:
    subject = str(uuid.uuid4())
    runs.begin(TASK, subject)
    client.script_flush()  # what a restart does to the scripts Redis had loaded
    runs.end(TASK, subject)
    assert client.exists(key(TASK, subject)) == 0


def test_a_redis_that_runs_no_scripts_still_uncounts_the_runs_that_end(
    client: redis.Redis, stack: Stack
) -> None:
    # A user its ACL keeps from scripting, as some managed servers and proxies do.
    user = f"noscripts-{uuid.uuid4().hex[:8]}"
    client.acl_setuser(
        user, enabled=True, nopass=True, keys=["*"], commands=["+@all", "-@scripting"]
    )
    restricted = redis.Redis.from_url(stack.env["REDIS_URL"], username=user)
    try:
        runs = RunCounter(restricted, limit=2)
        subject = str(uuid.uuid4())
        for _ in range(3):  # runs that end: none is a death
            runs.begin(TASK, subject)
            runs.end(TASK, subject)
        assert not runs.poisoned(runs.begin(TASK, subject))
        assert kept(client, subject)[0] == 1
    finally:
        restricted.close()
        client.acl_deluser(user)
