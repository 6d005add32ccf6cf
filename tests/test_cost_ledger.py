"""The SQLite ledger store on a real file: atomic reserve under the cap, settle, sweeps, money."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from cost_ledger import (
    ActionSpend,
    MonthTotals,
    ReserveRequest,
    SettleResult,
    SqliteLedgerStore,
    from_micro,
    to_micro,
)

pytestmark = pytest.mark.prd200

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
MONTH = "2026-03"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteLedgerStore]:
    ledger = SqliteLedgerStore(tmp_path / "cost.db")
    await ledger.open()
    yield ledger
    await ledger.close()


def request(
    reservation_id: str,
    amount: str,
    *,
    cap: str = "1.00",
    action: str = "dm.send",
    now: datetime = NOW,
    ttl_s: float = 60.0,
) -> ReserveRequest:
    return ReserveRequest(
        reservation_id, MONTH, action, Decimal(amount), f"req-{reservation_id}",
        Decimal(cap), now, ttl_s,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("usd", "micro"),
    [("0", 0), ("0.000001", 1), ("0.0000001", 1), ("0.0000011", 2), ("1.25", 1_250_000)],
)
def test_money_is_whole_micro_dollars_rounded_up(usd: str, micro: int) -> None:
    assert to_micro(Decimal(usd)) == micro
    assert from_micro(micro) == Decimal(micro) / 1_000_000


async def test_a_reservation_that_would_pass_the_cap_is_refused(store) -> None:
    assert (await store.reserve(request("a", "0.60"))).accepted
    refused = await store.reserve(request("b", "0.50"))
    assert not refused.accepted
    assert refused.totals == MonthTotals(MONTH, Decimal("0"), Decimal("0.600000"))
    assert (await store.reserve(request("c", "0.40"))).accepted  # exactly at the cap


async def test_reserving_the_same_id_twice_counts_it_once(store) -> None:
    assert (await store.reserve(request("a", "0.30"))).accepted
    again = await store.reserve(request("a", "0.30"))
    assert again.accepted and again.totals.reserved_usd == Decimal("0.3")


async def test_concurrent_reservations_never_pass_the_cap(store) -> None:
    results = await asyncio.gather(*(store.reserve(request(f"r{i}", "0.10")) for i in range(25)))
    assert sum(result.accepted for result in results) == 10
    totals = await store.totals(MONTH, NOW)
    assert totals.total_usd == Decimal("1.00")


async def test_commit_moves_the_reservation_to_its_actual_cost_once(store) -> None:
    await store.reserve(request("a", "0.30"))
    first = await store.settle("a", Decimal("0.25"), NOW)
    assert first == SettleResult(True, True, False, MonthTotals(MONTH, Decimal("0.25"), Decimal(0)))
    second = await store.settle("a", Decimal("0.25"), NOW)
    assert second.found and not second.changed
    assert (await store.totals(MONTH, NOW)).committed_usd == Decimal("0.25")
    assert await store.by_action(MONTH) == {"dm.send": ActionSpend(Decimal("0.25"), Decimal(0))}


async def test_release_frees_the_reservation_and_an_unknown_id_is_not_found(store) -> None:
    await store.reserve(request("a", "0.30"))
    released = await store.settle("a", None, NOW)
    assert released.changed and released.totals == MonthTotals.empty(MONTH)
    assert await store.by_action(MONTH) == {}
    assert await store.settle("missing", None, NOW) == SettleResult(found=False)


async def test_an_expired_reservation_is_released_and_a_late_commit_still_counts(store) -> None:
    await store.reserve(request("a", "0.30", ttl_s=1.0))
    later = NOW + timedelta(seconds=5)
    assert (await store.totals(MONTH, later)).reserved_usd == 0
    late = await store.settle("a", Decimal("0.30"), later)
    assert late.late and late.totals is not None
    assert late.totals.committed_usd == Decimal("0.3")


async def test_sweeps_list_open_reservations_and_overruns(store) -> None:
    await store.reserve(request("old", "0.10", now=NOW - timedelta(minutes=10), ttl_s=3600))
    await store.reserve(request("new", "0.10", ttl_s=3600))
    overdue = await store.overdue(NOW - timedelta(minutes=5), limit=10)
    assert [call.id for call in overdue] == ["old"]
    await store.settle("new", Decimal("0.15"), NOW)
    (overrun,) = await store.overruns(MONTH)
    assert (overrun.id, overrun.reserved_usd, overrun.cost_usd) == (
        "new",
        Decimal("0.1"),
        Decimal("0.15"),
    )


async def test_the_ledger_survives_a_reopen(store, tmp_path: Path) -> None:
    await store.reserve(request("a", "0.30"))
    await store.settle("a", Decimal("0.30"), NOW)
    reopened = SqliteLedgerStore(tmp_path / "cost.db")
    await reopened.open()
    try:
        assert (await reopened.totals(MONTH, NOW)).committed_usd == Decimal("0.3")
    finally:
        await reopened.close()


def seed_ledger(data_dir: Path, spends: list[tuple[datetime, Decimal]], month: str) -> None:
    """Commit ``spends`` (made at, cost) of ``month`` into DATA_DIR's ledger, before a server runs.

    For tests of what a server shows about money already spent.
    """

    async def seed() -> None:
        ledger = SqliteLedgerStore(data_dir / "cost_ledger.sqlite3")
        await ledger.open()
        try:
            for n, (at, usd) in enumerate(spends):
                cap = Decimal("1000000")
                reserve = ReserveRequest(
                    f"seed-{n}", month, "claude.complete", usd, f"s{n}", cap, at, 60.0
                )
                assert (await ledger.reserve(reserve)).accepted
                assert (await ledger.settle(f"seed-{n}", usd, at)).changed
        finally:
            await ledger.close()

    asyncio.run(seed())


async def test_daily_sums_one_month_per_day_in_one_query(store) -> None:
    starts = [datetime(2026, 3, day, tzinfo=UTC) for day in range(1, 32)]
    starts.append(datetime(2026, 4, 1, tzinfo=UTC))
    for rid, amount, at in [
        ("a", "0.10", NOW),
        ("b", "0.20", NOW),
        ("c", "0.30", NOW + timedelta(days=1)),
    ]:
        assert (await store.reserve(request(rid, amount, now=at, ttl_s=7 * 86400))).accepted
    await store.settle("a", Decimal("0.10"), NOW)  # committed
    await store.settle("c", None, NOW)  # released: never ran, not spent
    assert await store.daily(MONTH, starts) == {15: Decimal("0.300000")}  # b: still reserved
    assert await store.daily("2026-04", starts) == {}
