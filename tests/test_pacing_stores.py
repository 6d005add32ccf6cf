"""pacing_stores: the three bucket stores on the real thing (an SQLite file, Redis, PostgreSQL).

Every store applies ``pacing.decide`` atomically: requests at once never take more than
``max`` slots of a window, also through several store objects sharing one backend.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from pacing import Op, PacingUnavailable, Rule, Slot, SlotStatus
from pacing_stores import PostgresPaceStore, RedisPaceStore, SqlitePaceStore
from redis_client import open_redis
from tests.conftest import free_port, until

T = 1_800_000_000.0  # a Unix time; pacing works in Unix seconds
RULE = Rule(3, 10.0, keep_s=10.0, trim_s=20.0)

Store = SqlitePaceStore | PostgresPaceStore | RedisPaceStore
StoreFactory = Callable[[], Store]


@pytest.fixture(params=["sqlite", "redis", "postgres"])
async def stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], Any]]:
    """Open stores of one kind sharing one backend (one file, one Redis db, one schema)."""
    if request.param == "sqlite":
        make: StoreFactory = lambda: SqlitePaceStore(tmp_path / "pacing.sqlite3")  # noqa: E731
    elif request.param == "redis":
        url = request.getfixturevalue("redis_url")
        make = lambda: RedisPaceStore(url)  # noqa: E731
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        make = lambda: PostgresPaceStore(dsn)  # noqa: E731
    opened: list[Store] = []

    async def factory() -> Store:
        store = make()
        await store.open()
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.aclose()


async def test_acquire_takes_up_to_max_then_says_when_the_window_opens(stores: Any) -> None:
    store = await stores()
    for i in range(3):
        outcome = await store.decide("dm", Op.ACQUIRE, RULE, T + i, f"a{i}")
        assert (outcome.status, outcome.at_s) == (SlotStatus.OK, T + i)
    busy = await store.decide("dm", Op.ACQUIRE, RULE, T + 3, "a3")
    assert (busy.status, busy.at_s) == (SlotStatus.BUSY, T + 10)  # the first slot + per_s
    assert [s.slot_id for s in await store.slots("dm", 0)] == ["a0", "a1", "a2"]  # no booking
    again = await store.decide("dm", Op.ACQUIRE, RULE, T + 10, "a4")
    assert again.status is SlotStatus.OK


async def test_concurrent_acquires_never_exceed_max(stores: Any) -> None:
    many = [await stores() for _ in range(3)]  # three instances sharing the backend
    outcomes = await asyncio.gather(
        *(many[i % 3].decide("dm", Op.ACQUIRE, RULE, T, f"c{i}") for i in range(30))
    )
    assert [o.status for o in outcomes].count(SlotStatus.OK) == RULE.max
    assert all(o.status in (SlotStatus.OK, SlotStatus.BUSY) for o in outcomes)
    assert len(await many[0].slots("dm", 0)) == RULE.max


async def test_concurrent_reservations_get_distinct_slots_within_the_limit(stores: Any) -> None:
    many = [await stores() for _ in range(3)]
    outcomes = await asyncio.gather(
        *(many[i % 3].decide("dm", Op.RESERVE, RULE, T, f"r{i}") for i in range(9))
    )
    times = sorted(o.at_s for o in outcomes if o.at_s is not None)
    assert len(times) == 9
    # Any window of per_s seconds holds at most max of them.
    for start in times:
        assert sum(start <= t < start + RULE.per_s for t in times) <= RULE.max
    slots = await many[1].slots("dm", 0)
    assert len(slots) == 9
    assert sum(s.hold for s in slots) == 6  # three run now, six are booked ahead


async def test_a_booked_hold_is_early_before_its_time_and_runs_at_it(stores: Any) -> None:
    store = await stores()
    for i in range(3):
        await store.decide("dm", Op.ACQUIRE, RULE, T, f"a{i}")
    booked = await store.decide("dm", Op.RESERVE, RULE, T, "later")
    assert (booked.status, booked.at_s) == (SlotStatus.BOOKED, T + 10)
    assert Slot(T + 10, "later", True) in await store.slots("dm", 0)
    early = await store.decide("dm", Op.CLAIM, RULE, T + 5, "later")
    assert (early.status, early.at_s) == (SlotStatus.EARLY, T + 10)
    assert Slot(T + 10, "later", True) in await store.slots("dm", 0)  # still booked
    ran = await store.decide("dm", Op.CLAIM, RULE, T + 10, "later")
    assert (ran.status, ran.at_s) == (SlotStatus.OK, T + 10)
    slots = await store.slots("dm", 0)
    assert Slot(T + 10, "later", False) in slots  # the hold became a run
    assert Slot(T + 10, "later", True) not in slots


async def test_release_frees_a_hold_but_never_a_run(stores: Any) -> None:
    store = await stores()
    for i in range(3):
        await store.decide("dm", Op.ACQUIRE, RULE, T, f"a{i}")
    await store.decide("dm", Op.RESERVE, RULE, T, "held")
    await store.release("dm", "held")
    await store.release("dm", "a0")  # a run: it happened, it stays
    await store.release("dm", "never-booked")  # nothing to do
    assert [s.slot_id for s in await store.slots("dm", 0)] == ["a0", "a1", "a2"]
    rebook = await store.decide("dm", Op.RESERVE, RULE, T, "next")
    assert rebook.at_s == T + 10  # the released slot is free again


async def test_old_slots_are_trimmed_and_slots_since_filters(stores: Any) -> None:
    store = await stores()
    await store.decide("dm", Op.ACQUIRE, RULE, T, "old")
    await store.decide("dm", Op.ACQUIRE, RULE, T + 15, "mid")
    assert [s.slot_id for s in await store.slots("dm", T + 1)] == ["mid"]
    await store.decide("dm", Op.ACQUIRE, RULE, T + 30, "new")  # trims before T + 10
    assert [s.slot_id for s in await store.slots("dm", 0)] == ["mid", "new"]


async def test_buckets_are_independent(stores: Any) -> None:
    store = await stores()
    for i in range(3):
        await store.decide("dm", Op.ACQUIRE, RULE, T, f"a{i}")
    assert (await store.decide("post", Op.ACQUIRE, RULE, T, "p")).status is SlotStatus.OK
    assert [s.slot_id for s in await store.slots("post", 0)] == ["p"]


async def test_a_slot_far_past_the_horizon_books_nothing(stores: Any) -> None:
    store = await stores()
    rule = Rule(1, 10.0, keep_s=10.0, trim_s=20.0, quiet=((T + 1, T + 100),), horizon_s=T + 50)
    await store.decide("dm", Op.ACQUIRE, rule, T, "a")
    far = await store.decide("dm", Op.RESERVE, rule, T, "b")
    assert (far.status, far.at_s) == (SlotStatus.FAR, None)
    assert [s.slot_id for s in await store.slots("dm", 0)] == ["a"]


async def test_slot_times_keep_their_milliseconds(stores: Any) -> None:
    store = await stores()
    now = T + 0.123456
    outcome = await store.decide("dm", Op.ACQUIRE, RULE, now, "ms")
    assert outcome.at_s == now
    assert await store.slots("dm", 0) == [Slot(now, "ms", False)]


# -- each store's own edges ------------------------------------------------------------------


async def test_sqlite_store_that_cannot_open_its_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "a-directory.sqlite3"
    path.mkdir()
    store = SqlitePaceStore(path)
    with pytest.raises(PacingUnavailable, match=rf"pacing store {path}"):
        await store.open()


async def test_sqlite_decision_takes_the_write_lock_before_reading_the_bucket(
    tmp_path: Path,
) -> None:
    """Another process writing the bucket: the decision waits and then counts its slots."""
    path = tmp_path / "p.sqlite3"
    store = SqlitePaceStore(path)
    await store.open()
    statements: list[str] = []
    store._file._conn.set_trace_callback(statements.append)  # type: ignore[union-attr]
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        for i in range(3):
            other.execute(
                "INSERT INTO pace_slots (bucket, slot_id, at_s, hold) VALUES ('dm', ?, ?, 0)",
                (f"other{i}", T),
            )
        decision = asyncio.create_task(store.decide("dm", Op.ACQUIRE, RULE, T, "mine"))
        await until(
            lambda: any(s.startswith(("BEGIN", "INSERT")) for s in statements),
            what="the decision to wait for the write lock",
        )
        other.execute("COMMIT")
        outcome = await decision
    finally:
        other.close()
        await store.aclose()
    assert outcome.status is SlotStatus.BUSY  # it saw the other writer's three slots


async def test_sqlite_buckets_outlive_the_store(tmp_path: Path) -> None:
    first = SqlitePaceStore(tmp_path / "p.sqlite3")
    await first.open()
    await first.decide("dm", Op.RESERVE, RULE, T, "kept")
    await first.aclose()
    second = SqlitePaceStore(tmp_path / "p.sqlite3")
    await second.open()
    try:
        assert await second.slots("dm", 0) == [Slot(T, "kept", False)]
    finally:
        await second.aclose()


@pytest.mark.redis
async def test_redis_keys_carry_the_prefix_and_expire_after_the_trim(redis_url: str) -> None:
    store = RedisPaceStore(redis_url, prefix="test:pace:")
    await store.open()
    client = open_redis(redis_url)
    try:
        await store.decide("dm", Op.ACQUIRE, RULE, T, "a")
        assert await client.zscore("test:pace:dm", "r:a") == T
        ttl_ms = await client.pttl("test:pace:dm")
        assert 1000 <= ttl_ms <= RULE.trim_s * 1000 + 1000  # gone once nothing can matter
    finally:
        await client.aclose()
        await store.aclose()


@pytest.mark.redis
async def test_redis_store_leaves_a_borrowed_client_open(redis_url: str) -> None:
    shared = open_redis(redis_url)
    try:
        store = RedisPaceStore(None, redis=shared)
        await store.open()
        await store.decide("dm", Op.ACQUIRE, RULE, T, "a")
        connection = await shared.client_id()
        await store.aclose()
        assert await shared.client_id() == connection
    finally:
        await shared.aclose()


async def test_redis_store_not_open_or_down_is_unavailable() -> None:
    store = RedisPaceStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.5)
    with pytest.raises(PacingUnavailable, match=r"pacing store \(Redis\) is not open"):
        await store.decide("dm", Op.ACQUIRE, RULE, T, "a")
    await store.open()
    try:
        with pytest.raises(PacingUnavailable, match=r"pacing store \(Redis\): ConnectionError"):
            await store.decide("dm", Op.ACQUIRE, RULE, T, "a")
        with pytest.raises(PacingUnavailable):
            await store.slots("dm", 0)
    finally:
        await store.aclose()


async def test_postgres_store_down_retries_at_most_every_retry_s() -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    store = PostgresPaceStore(dsn, timeout_s=0.5, retry_s=3600)
    with pytest.raises(PacingUnavailable, match=r"pacing store \(PostgreSQL\)"):
        await store.open()
    with pytest.raises(PacingUnavailable, match="is not reachable yet"):
        await store.decide("dm", Op.ACQUIRE, RULE, T, "a")  # no new attempt within retry_s
    eager = PostgresPaceStore(dsn, timeout_s=0.5, retry_s=0)
    with pytest.raises(PacingUnavailable) as caught:
        await eager.decide("dm", Op.ACQUIRE, RULE, T, "a")  # tries again at once
    assert "not reachable yet" not in str(caught.value)
    await store.aclose()
    await eager.aclose()


@pytest.mark.postgres
async def test_postgres_store_opens_itself_on_first_use(postgres_dsn: str) -> None:
    store = PostgresPaceStore(postgres_dsn)  # never opened, e.g. the database was down
    try:
        assert (await store.decide("dm", Op.ACQUIRE, RULE, T, "a")).status is SlotStatus.OK
        assert await store.slots("dm", 0) == [Slot(T, "a", False)]
    finally:
        await store.aclose()


@pytest.mark.postgres
async def test_postgres_stores_starting_together_create_the_table_once(postgres_dsn: str) -> None:
    many = [PostgresPaceStore(postgres_dsn) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in many))
        await many[0].decide("dm", Op.ACQUIRE, RULE, T, "a")
        assert await many[3].slots("dm", 0) == [Slot(T, "a", False)]
    finally:
        await asyncio.gather(*(s.aclose() for s in many))
