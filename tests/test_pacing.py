"""Tests of pacing.py and pacing_stores.py: the slot math, the Pacer and each of its stores."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from pacing import (
    Decision,
    Op,
    Outcome,
    Pacer,
    PaceReason,
    PaceStore,
    Rule,
    Slot,
    SlotStatus,
    decide,
    fits,
    next_slot,
)
from pacing_stores import PostgresPaceStore, RedisPaceStore, SqlitePaceStore
from rate_limits import RateLimits
from tests.conftest import free_port

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


# -- the slot math, as tables ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("times", "rule", "now_s", "expected"),
    [
        ([], Rule(3, 5), 1.0, 1.0),
        ([0, 0], Rule(3, 5), 1.0, 1.0),
        ([0, 0, 0], Rule(3, 5), 1.0, 5.0),  # the 4th run waits for the first to leave the window
        ([0, 0, 0], Rule(3, 5), 7.0, 7.0),
        ([0, 1, 2, 3], Rule(3, 5), 4.0, 6.0),  # the 3rd latest (1) + 5
        ([100], Rule(20, 86400, min_interval_s=90), 120.0, 190.0),
        ([100], Rule(20, 86400, min_interval_s=90, jitter_s=7.5), 120.0, 197.5),
        ([0, 10], Rule(2, 60, min_interval_s=10), 11.0, 60.0),  # the window beats the interval
        ([0, 50], Rule(2, 60, min_interval_s=30), 51.0, 80.0),  # the interval beats the window
        ([0, 5], Rule(1, 5), 0.0, 10.0),  # after every booked slot, never before one
        ([], Rule(1, 5, quiet=((100, 200),)), 150.0, 200.0),
        ([], Rule(1, 5, quiet=((100, 200), (200, 300))), 150.0, 300.0),
        ([], Rule(1, 5, quiet=((100, 200),)), 200.0, 200.0),  # the end of a span is not quiet
        ([], Rule(1, 5, quiet=((100, 200),), horizon_s=180.0), 150.0, None),
    ],
)
def test_next_slot(
    times: Sequence[float], rule: Rule, now_s: float, expected: float | None
) -> None:
    assert next_slot(times, rule, now_s) == expected


@pytest.mark.parametrize(
    ("times", "x", "rule", "expected"),
    [
        ([], 0.0, Rule(1, 5), True),
        ([0, 0, 0], 4.9, Rule(3, 5), False),
        ([0, 0, 0], 5.0, Rule(3, 5), True),  # windows are half-open: [0, 5)
        ([0, 0, 5, 5], 5.01, Rule(3, 5), True),
        ([0, 10], 5.0, Rule(1, 5), True),  # between two slots, a window apart from both
        ([0, 10], 4.9, Rule(1, 5), False),
        ([0, 10], 5.1, Rule(1, 5), False),  # [5.1, 10.1) would hold 10 too
        ([0, 10], 5.0, Rule(5, 60, min_interval_s=3), True),
        ([0, 10], 8.0, Rule(5, 60, min_interval_s=3), False),  # too close to the next
        ([0, 10], 2.0, Rule(5, 60, min_interval_s=3), False),  # too close to the previous
        ([], 150.0, Rule(1, 5, quiet=((100, 200),)), False),
    ],
)
def test_fits(times: Sequence[float], x: float, rule: Rule, expected: bool) -> None:
    assert fits(times, x, rule) is expected


ONE_PER_5 = Rule(1, 5)
RUN_A = Slot(0.0, "a")
HOLD_S = Slot(5.0, "s", True)


@pytest.mark.parametrize(
    ("entries", "op", "now_s", "expected"),
    [
        ([], Op.ACQUIRE, 1.0, Outcome(SlotStatus.OK, 1.0, add=Slot(1.0, "s"))),
        ([RUN_A], Op.ACQUIRE, 1.0, Outcome(SlotStatus.BUSY, 5.0)),  # nothing booked
        ([RUN_A], Op.RESERVE, 1.0, Outcome(SlotStatus.BOOKED, 5.0, add=Slot(5.0, "s", True))),
        # A claim of an unknown hold books one.
        ([RUN_A], Op.CLAIM, 1.0, Outcome(SlotStatus.BOOKED, 5.0, add=Slot(5.0, "s", True))),
        ([RUN_A, HOLD_S], Op.CLAIM, 4.0, Outcome(SlotStatus.EARLY, 5.0)),
        (
            [RUN_A, HOLD_S],
            Op.CLAIM,
            5.5,  # a little late, still a window after "a": run now
            Outcome(SlotStatus.OK, 5.5, remove="s", add=Slot(5.5, "s")),
        ),
        (
            [RUN_A, HOLD_S, Slot(10.0, "b", True)],
            Op.CLAIM,
            7.0,  # late: at 7 it would share [7, 12) with "b"; booked again after "b"
            Outcome(SlotStatus.BOOKED, 15.0, remove="s", add=Slot(15.0, "s", True)),
        ),
        (
            [RUN_A, Slot(3.0, "b", True), HOLD_S],
            Op.CLAIM,
            9.0,  # an overdue hold ("b", not run yet) does not count against it
            Outcome(SlotStatus.OK, 9.0, remove="s", add=Slot(9.0, "s")),
        ),
    ],
)
def test_decide(entries: list[Slot], op: Op, now_s: float, expected: Outcome) -> None:
    assert decide(entries, op, ONE_PER_5, now_s, "s") == expected


# -- the Pacer over each store -----------------------------------------------------------------


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


StoreFactory = Callable[[], PaceStore]


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Stores of one kind that share their buckets (one SQLite file, Redis or PostgreSQL db)."""
    if request.param == "sqlite":
        return lambda: SqlitePaceStore(tmp_path / "pacing.sqlite3")
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        return lambda: RedisPaceStore(url)
    dsn = request.getfixturevalue("postgres_dsn")
    return lambda: PostgresPaceStore(dsn)


@pytest.fixture
async def pacers(
    store_factory: StoreFactory,
) -> AsyncIterator[Callable[..., Awaitable[Pacer]]]:
    opened: list[Pacer] = []

    async def make(limits: dict, *, clock: Clock | None = None, **kwargs: object) -> Pacer:
        pacer = Pacer(
            RateLimits.from_dict(limits),
            store_factory(),
            clock=clock or Clock(),
            rng=random.Random(7),
            **kwargs,  # type: ignore[arg-type]
        )
        await pacer.open()
        opened.append(pacer)
        return pacer

    yield make
    for pacer in opened:
        await pacer.aclose()


DM_3_PER_5 = {"dm.send": {"max": 3, "per_sec": 5}}


async def test_three_run_at_once_and_three_are_deferred_to_when_the_window_opens(
    pacers: Callable[..., Awaitable[Pacer]],
) -> None:
    pacer = await pacers(DM_3_PER_5)
    decisions = [await pacer.reserve_slot("dm.send", T0) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 3 + [False] * 3
    assert {d.not_before for d in decisions[3:]} == {T0 + timedelta(seconds=5)}
    assert len({d.slot_id for d in decisions}) == 6
    assert all(d.reason is PaceReason.PACED and d.limit == "dm.send" for d in decisions[3:])


async def test_deferred_items_get_distinct_slots_in_order(
    pacers: Callable[..., Awaitable[Pacer]],
) -> None:
    pacer = await pacers({"linkedin.*": {"max": 1, "per_sec": 60}})
    slots = [await pacer.reserve_slot("linkedin.message", T0) for _ in range(4)]
    assert [d.not_before for d in slots] == [None] + [
        T0 + timedelta(seconds=60 * n) for n in (1, 2, 3)
    ]
    # A new request joins the end of the queue: deferred work keeps its place.
    later = await pacer.acquire("linkedin.connect", T0 + timedelta(seconds=61))
    assert not later.allowed and later.slot_id is None
    assert later.not_before == T0 + timedelta(seconds=240)


async def test_acquire_over_the_limit_books_nothing(
    pacers: Callable[..., Awaitable[Pacer]],
) -> None:
    pacer = await pacers({"research.keyword": {"max": 1, "per_sec": 10}})
    assert (await pacer.acquire("research.keyword", T0)).allowed
    refused = [await pacer.acquire("research.keyword", T0 + timedelta(seconds=1)) for _ in range(5)]
    assert {d.not_before for d in refused} == {T0 + timedelta(seconds=10)}
    assert (await pacer.acquire("research.keyword", T0 + timedelta(seconds=10))).allowed


async def test_a_claim_at_its_slot_runs_and_a_claim_before_it_waits(
    pacers: Callable[..., Awaitable[Pacer]],
) -> None:
    pacer = await pacers({"dm.send": {"max": 1, "per_sec": 5}})
    await pacer.reserve_slot("dm.send", T0)
    deferred = await pacer.reserve_slot("dm.send", T0, slot_id="outbox-7")
    assert deferred.slot_id == "outbox-7"
    early = await pacer.claim("dm.send", "outbox-7", T0 + timedelta(seconds=4))
    assert not early.allowed and early.not_before == T0 + timedelta(seconds=5)
    assert (await pacer.claim("dm.send", "outbox-7", T0 + timedelta(seconds=5))).allowed


async def test_claims_a_little_late_run_as_booked_in_order(
    pacers: Callable[..., Awaitable[Pacer]],
) -> None:
    # Each claim comes a few ms after its slot (a timer's delay): running "now" would overlap
    # the next hold by those ms; the run is recorded at its slot, and no item leapfrogs another.
    pacer = await pacers({"dm.send": {"max": 1, "per_sec": 5}})
    ids = [(await pacer.reserve_slot("dm.send", T0)).slot_id for _ in range(4)]
    for n in (1, 2, 3):
        late = T0 + timedelta(seconds=5 * n, milliseconds=4 * n)
        assert (await pacer.claim("dm.send", ids[n], late)).allowed, n
    (snapshot,) = await pacer.snapshot(T0 + timedelta(seconds=15.1))
    assert (snapshot.used, snapshot.deferred) == (1, 0)
    assert snapshot.next_free_at == T0 + timedelta(seconds=20)


async def test_late_claims_after_a_restart_never_run_together(
    pacers: Callable[..., Awaitable[Pacer]],
) -> None:
    pacer = await pacers({"dm.send": {"max": 1, "per_sec": 5}})
    ids = [(await pacer.reserve_slot("dm.send", T0)).slot_id for _ in range(4)]
    # Down from 1 s to 17 s: the slots at 5, 10 and 15 are all overdue at once.
    back = T0 + timedelta(seconds=17)
    first = await pacer.claim("dm.send", ids[1], back)
    second = await pacer.claim("dm.send", ids[2], back)
    third = await pacer.claim("dm.send", ids[3], back)
    assert first.allowed
    assert (second.allowed, second.not_before) == (False, back + timedelta(seconds=5))
    assert (third.allowed, third.not_before) == (False, back + timedelta(seconds=10))
    assert (await pacer.claim("dm.send", ids[2], back + timedelta(seconds=5))).allowed


async def test_a_released_slot_is_free_again(pacers: Callable[..., Awaitable[Pacer]]) -> None:
    pacer = await pacers({"dm.send": {"max": 1, "per_sec": 5}})
    await pacer.reserve_slot("dm.send", T0)
    cancelled = await pacer.reserve_slot("dm.send", T0)
    assert cancelled.slot_id is not None
    await pacer.release("dm.send", cancelled.slot_id)
    again = await pacer.reserve_slot("dm.send", T0)
    assert again.not_before == T0 + timedelta(seconds=5)


async def test_min_interval_and_jitter_space_the_runs(
    pacers: Callable[..., Awaitable[Pacer]],
) -> None:
    pacer = await pacers(
        {
            "linkedin.message": {
                "max": 20,
                "per_sec": 86400,
                "min_interval_sec": 90,
                "jitter_sec": 30,
            }
        }
    )
    times = [T0]
    for _ in range(5):
        decision = await pacer.reserve_slot("linkedin.message", T0)
        if decision.not_before is not None:
            times.append(decision.not_before)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times[1:])]
    assert len(gaps) == 3
    assert all(90 <= gap <= 120 for gap in gaps)
    assert len(set(gaps)) > 1  # jittered, not a fixed beat


async def test_quiet_hours_defer_to_their_local_end(
    pacers: Callable[..., Awaitable[Pacer]],
) -> None:
    berlin = ZoneInfo("Europe/Berlin")
    pacer = await pacers(
        {"dm.send": {"max": 5, "per_sec": 60, "quiet_hours": "23:00-07:00"}}, tz=berlin
    )
    night = datetime(2026, 3, 10, 23, 30, tzinfo=berlin)
    refused = await pacer.acquire("dm.send", night)
    assert not refused.allowed
    assert refused.not_before == datetime(2026, 3, 11, 7, 0, tzinfo=berlin)
    assert (await pacer.acquire("dm.send", datetime(2026, 3, 11, 7, 0, tzinfo=berlin))).allowed


async def test_unlimited_actions_never_touch_the_store(
    pacers: Callable[..., Awaitable[Pacer]],
) -> None:
    pacer = await pacers(DM_3_PER_5)
    decision = await pacer.acquire("research.keyword", T0)
    assert decision == Decision(True, None, PaceReason.UNLIMITED)


async def test_snapshot_shows_used_booked_and_next_free(
    pacers: Callable[..., Awaitable[Pacer]],
) -> None:
    clock = Clock()
    pacer = await pacers({**DM_3_PER_5, "upwork.*": {"max": 10, "per_sec": 60}}, clock=clock)
    for _ in range(4):
        await pacer.reserve_slot("dm.send")
    clock.advance(1)
    [dm, upwork] = await pacer.snapshot()
    assert (dm.key, dm.used, dm.max, dm.deferred) == ("dm.send", 3, 3, 1)
    assert dm.next_free_at == T0 + timedelta(seconds=5)
    assert dm.backlog_s == 4.0  # the deferred run's slot is at 5 s, the clock at 1 s
    assert (upwork.used, upwork.deferred, upwork.next_free_at) == (0, 0, None)
    assert dm.as_json()["next_free_at"] == (T0 + timedelta(seconds=5)).isoformat()


def _max_in_any_window(times: Sequence[float], per_s: float) -> int:
    ordered = sorted(times)
    return max(
        (sum(1 for t in ordered if start <= t < start + per_s) for start in ordered), default=0
    )


async def test_two_instances_together_never_exceed_the_limit(
    pacers: Callable[..., Awaitable[Pacer]],
) -> None:
    clock = Clock()
    limits = {"dm.send": {"max": 3, "per_sec": 1}}
    first, second = await pacers(limits, clock=clock), await pacers(limits, clock=clock)
    ran: list[float] = []
    for _ in range(40):
        decisions = await asyncio.gather(
            *(pacer.acquire("dm.send") for pacer in (first, second) for _ in range(4))
        )
        ran += [clock.now.timestamp() for d in decisions if d.allowed]
        clock.advance(0.125)
    assert _max_in_any_window(ran, 1.0) == 3
    assert len(ran) == 3 * 5  # 5 s of windows, each full: the limit is also reached


async def test_two_instances_booking_at_once_get_distinct_slots(
    pacers: Callable[..., Awaitable[Pacer]],
) -> None:
    limits = {"dm.send": {"max": 2, "per_sec": 10}}
    first, second = await pacers(limits), await pacers(limits)
    decisions = await asyncio.gather(
        *(pacer.reserve_slot("dm.send", T0) for pacer in (first, second) for _ in range(5))
    )
    slots = sorted((d.not_before or T0).timestamp() for d in decisions)
    assert _max_in_any_window(slots, 10.0) == 2
    assert slots[-1] == T0.timestamp() + 40


@pytest.mark.parametrize(
    "down",
    [
        lambda: RedisPaceStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.5),
        lambda: PostgresPaceStore(f"postgresql://postgres@127.0.0.1:{free_port()}/x", timeout_s=1),
    ],
    ids=["redis", "postgres"],
)
async def test_a_store_that_is_down_defers_and_never_allows(down: StoreFactory) -> None:
    pacer = Pacer(RateLimits.from_dict(DM_3_PER_5), down(), clock=Clock(), unavailable_retry_s=5)
    await pacer.open()
    try:
        decisions = [await pacer.reserve_slot("dm.send") for _ in range(3)]
        assert all(not d.allowed for d in decisions)
        assert {d.reason for d in decisions} == {PaceReason.STORE_UNAVAILABLE}
        assert {d.not_before for d in decisions} == {T0 + timedelta(seconds=5)}
        claimed = await pacer.claim("dm.send", "outbox-1")
        assert (claimed.allowed, claimed.slot_id) == (False, "outbox-1")
        [snap] = await pacer.snapshot()
        assert snap.available is False
        assert (await pacer.acquire("research.keyword")).allowed  # unlimited: no store needed
    finally:
        await pacer.aclose()


@pytest.mark.redis
async def test_the_redis_script_matches_the_python_math(redis_url: str) -> None:
    """The same requests through Lua and through ``decide`` give the same answers."""
    store = RedisPaceStore(redis_url)
    await store.open()
    entries: list[Slot] = []
    rule = Rule(2, 10, min_interval_s=1.5, keep_s=11.5, trim_s=20, quiet=((130.0, 140.0),))
    script = [
        (Op.ACQUIRE, 100.0, "a"),
        (Op.ACQUIRE, 100.5, "b"),
        (Op.RESERVE, 101.0, "c"),
        (Op.RESERVE, 101.0, "d"),
        (Op.ACQUIRE, 103.0, "e"),
        (Op.CLAIM, 105.0, "c"),
        (Op.CLAIM, 112.0, "c"),
        (Op.CLAIM, 119.0, "d"),
        (Op.RESERVE, 119.0, "f"),
        (Op.RESERVE, 119.0, "g"),
        (Op.CLAIM, 120.0, "g"),  # early
        (Op.CLAIM, 129.5, "g"),  # "c" and "f" are overdue holds: they do not count
        (Op.CLAIM, 135.0, "zz"),
    ]
    try:
        for op, now_s, slot_id in script:
            entries = [e for e in entries if e.at_s >= now_s - rule.trim_s]
            expected = decide(entries, op, rule, now_s, slot_id)
            got = await store.decide("parity", op, rule, now_s, slot_id)
            assert (got.status, got.at_s) == (expected.status, expected.at_s), (op, now_s)
            if expected.remove is not None:
                entries = [e for e in entries if (e.slot_id, e.hold) != (expected.remove, True)]
            if expected.add is not None:
                entries = sorted([*entries, expected.add])
            assert await store.slots("parity", 0) == entries
    finally:
        await store.aclose()


@contextlib.contextmanager
def throwaway_redis(port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A redis-server of our own on ``port`` (never the shared one), stopped on exit."""
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def _answers(pacer: Pacer) -> bool:
    return (await pacer.snapshot())[0].available


@pytest.mark.process
@pytest.mark.redis
async def test_redis_going_down_defers_and_coming_back_resumes() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    clock = Clock()
    pacer = Pacer(
        RateLimits.from_dict(DM_3_PER_5),
        RedisPaceStore(f"redis://127.0.0.1:{port}/0", socket_timeout_s=0.5),
        clock=clock,
    )
    await pacer.open()
    try:
        with throwaway_redis(port):
            await until_async(lambda: _answers(pacer), what="the throwaway Redis")
            assert (await pacer.acquire("dm.send")).allowed
        down = await pacer.acquire("dm.send")
        assert (down.allowed, down.reason) == (False, PaceReason.STORE_UNAVAILABLE)
        with throwaway_redis(port):
            await until_async(lambda: _answers(pacer), what="Redis to come back")
            # It came back empty: the limit starts over, and it is enforced again.
            assert [(await pacer.acquire("dm.send")).allowed for _ in range(4)] == [
                True, True, True, False,
            ]  # fmt: skip
    finally:
        await pacer.aclose()


async def until_async(predicate: Callable[[], Awaitable[bool]], *, what: str) -> None:
    """Wait until ``await predicate()`` holds; the limit only stops a hung test."""
    for _ in range(1000):
        if await predicate():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"gave up waiting for: {what}")
