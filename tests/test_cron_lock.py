"""cron_lock: one replica takes a job's fire time (real Redis); no Redis or a failed one runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest

from cron_lock import LOCK_PREFIX, FireTimeLock, lock_key
from redis_client import open_redis
from tests.conftest import free_port

FIRE = datetime(2026, 5, 6, 7, 8, 0, tzinfo=UTC)

pytestmark = pytest.mark.redis


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[Callable[[str], FireTimeLock]]:
    opened: list[FireTimeLock] = []

    def make(instance_id: str) -> FireTimeLock:
        lock = FireTimeLock(instance_id=instance_id, redis_url=redis_url)
        lock.open()
        opened.append(lock)
        return lock

    yield make
    for lock in opened:
        await lock.close()


def test_lock_key_is_the_job_and_the_utc_fire_time() -> None:
    assert lock_key("backup", FIRE) == f"{LOCK_PREFIX}backup:2026-05-06T07:08:00+00:00"


def test_the_same_instant_in_another_zone_is_the_same_key() -> None:
    paris = FIRE.astimezone(timezone(timedelta(hours=2)))
    assert lock_key("backup", paris) == lock_key("backup", FIRE)


async def test_without_redis_every_instance_runs_every_time() -> None:
    lock = FireTimeLock(instance_id="solo", redis_url=None)
    lock.open()
    assert lock.kind == "none (single instance)"
    assert lock.client is None
    assert await lock.take("job", FIRE, ttl_s=60)
    assert await lock.take("job", FIRE, ttl_s=60)  # no lock: the same fire time again runs
    await lock.close()


async def test_two_replicas_one_wins_a_fire_time(
    replicas: Callable[[str], FireTimeLock], redis_url: str
) -> None:
    a, b = replicas("a"), replicas("b")
    assert a.kind == "redis"
    assert await a.take("job", FIRE, ttl_s=60) is True
    assert await b.take("job", FIRE, ttl_s=60) is False
    assert await a.take("job", FIRE, ttl_s=60) is False  # not twice on the same replica either
    client = open_redis(redis_url)
    try:
        assert await client.get(lock_key("job", FIRE)) == "a"
        ttl_ms = await client.pttl(lock_key("job", FIRE))
        assert 0 < ttl_ms <= 60_000
    finally:
        await client.aclose()


async def test_many_replicas_racing_for_one_fire_time_exactly_one_wins(
    replicas: Callable[[str], FireTimeLock],
) -> None:
    locks = [replicas(f"r{i}") for i in range(12)]
    for _ in range(5):  # several fire times, each raced by all at once
        fire = FIRE + timedelta(minutes=_)
        won = await asyncio.gather(*(lock.take("job", fire, ttl_s=60) for lock in locks))
        assert won.count(True) == 1


async def test_other_jobs_and_other_fire_times_are_free(
    replicas: Callable[[str], FireTimeLock],
) -> None:
    a, b = replicas("a"), replicas("b")
    assert await a.take("job", FIRE, ttl_s=60)
    assert await b.take("other", FIRE, ttl_s=60)
    assert await b.take("job", FIRE + timedelta(minutes=1), ttl_s=60)


async def test_the_lock_expires_after_its_ttl(
    replicas: Callable[[str], FireTimeLock], redis_url: str
) -> None:
    a, b = replicas("a"), replicas("b")
    assert await a.take("job", FIRE, ttl_s=0.05)
    client = open_redis(redis_url)
    try:

        async def gone() -> bool:
            return not await client.exists(lock_key("job", FIRE))

        deadline = asyncio.get_running_loop().time() + 10
        while not await gone():
            assert asyncio.get_running_loop().time() < deadline, "the lock never expired"
            await asyncio.sleep(0.01)
    finally:
        await client.aclose()
    assert await b.take("job", FIRE, ttl_s=60)


async def test_a_borrowed_client_is_used_and_left_open(redis_url: str) -> None:
    shared = open_redis(redis_url)
    try:
        lock = FireTimeLock(instance_id="a", redis_url=None, redis=shared)
        lock.open()
        assert lock.kind == "redis"
        assert lock.client is shared
        assert await lock.take("job", FIRE, ttl_s=60)
        connection_before = await shared.client_id()
        await lock.close()
        # The same connection still serves: the lock did not close its owner's client.
        assert await shared.client_id() == connection_before
        assert await shared.get(lock_key("job", FIRE)) == "a"
    finally:
        await shared.aclose()


async def test_a_redis_that_is_down_fails_open_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    lock = FireTimeLock(instance_id="a", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    lock.open()
    try:
        with caplog.at_level(logging.WARNING, logger="local_cron"):
            assert await lock.take("nightly", FIRE, ttl_s=60) is True
            assert await lock.take("nightly", FIRE, ttl_s=60) is True
        messages = [r.getMessage() for r in caplog.records]
        assert any(
            "no replica lock for nightly" in m and "running anyway" in m for m in messages
        ), messages
    finally:
        await lock.close()
