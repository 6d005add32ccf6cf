"""cost_reservation: money, months, one call's reservation (``Spend``) and the refusals.

The reservations go through a real ``CostGuard`` over the SQLite ledger on a real file.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cost_guard import CostGuard
from cost_ledger import LoggedCall, MonthTotals, SqliteLedgerStore
from cost_reservation import (
    MAX_LEDGER_USD,
    LedgerMonth,
    Reservation,
    Spend,
    budget_closed,
    cap_reached,
    ledger_unreachable,
    left_without_running,
    log_overrun,
    money,
    month_of,
    next_month,
    overdue_verdicts,
    overrun_report,
    usd,
)
from errors import CostCapReached, HandlerError, UnknownAction

CAP = Decimal("1.00")
NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def guard(tmp_path: Path) -> AsyncIterator[CostGuard]:
    cost_guard = CostGuard(
        SqliteLedgerStore(tmp_path / "cost.db"),
        monthly_cap_usd=CAP,
        soft_cap_usd=Decimal("0.80"),
        tz=UTC,
        clock=Clock(),
    )
    await cost_guard.open()
    yield cost_guard
    await cost_guard.close()


async def totals(guard: CostGuard) -> tuple[Decimal, Decimal]:
    await guard.refresh()
    current = guard.current_totals()
    return current.committed_usd, current.reserved_usd


# -- money and months ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        ("0", "0.00"),
        ("0.1", "0.10"),
        ("12", "12.00"),
        ("0.002", "0.002"),
        ("0.000001", "0.000001"),
        ("1.230000", "1.23"),
        ("999999999999.999999", "999999999999.999999"),
    ],
)
def test_usd_is_exact_with_at_least_two_decimals(amount: str, text: str) -> None:
    assert usd(Decimal(amount)) == text


@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        (0.01, Decimal("0.01")),  # a float through its shortest repr, not its binary value
        (0.1 + 0.2, Decimal("0.300001")),  # 0.30000000000000004, rounded up
        ("0.0000001", Decimal("0.000001")),  # finer than a micro-dollar: rounded up
        (3, Decimal("3")),
        (Decimal("2.5"), Decimal("2.5")),
        (0, Decimal(0)),
        (MAX_LEDGER_USD, MAX_LEDGER_USD),
    ],
)
def test_money_is_exact_whole_micro_dollars(
    amount: Decimal | int | float | str, expected: Decimal
) -> None:
    assert money(amount, "cost") == expected


@pytest.mark.parametrize(
    "amount", [-0.01, "-1", "NaN", float("inf"), "1e13", MAX_LEDGER_USD + Decimal("0.000001")]
)
def test_money_refuses_what_the_ledger_cannot_hold_and_says_the_range(
    amount: object,
) -> None:
    with pytest.raises(ValueError, match=r"^cost_usd must be a finite amount from 0 to "):
        money(amount, "cost_usd")  # type: ignore[arg-type]


def test_money_refuses_a_boolean() -> None:
    with pytest.raises(TypeError, match="cost_usd must be an amount of US dollars, got True"):
        money(True, "cost_usd")


def test_month_of_rolls_over_at_local_midnight() -> None:
    moment = datetime(2026, 3, 31, 23, 30, tzinfo=UTC)
    assert month_of(moment, UTC) == "2026-03"
    assert month_of(moment, ZoneInfo("Europe/Paris")) == "2026-04"
    assert month_of(datetime(2026, 1, 1, 3, tzinfo=UTC), timezone(timedelta(hours=-5))) == (
        "2025-12"
    )


@pytest.mark.parametrize(
    ("month", "after"), [("2026-01", "2026-02"), ("2026-11", "2026-12"), ("2026-12", "2027-01")]
)
def test_next_month(month: str, after: str) -> None:
    assert next_month(month) == after


def test_reservation_round_trips_through_its_ledger_row() -> None:
    res = Reservation("id1", "dm.send", Decimal("0.5"), "req-1", "2026-03")
    row = res.logged(Decimal("0.4"))
    assert row == LoggedCall("id1", "2026-03", "dm.send", "req-1", Decimal("0.5"), Decimal("0.4"))
    assert Reservation.of(row) == res


# -- Spend: the bracket ----------------------------------------------------------------------


async def test_a_call_that_ran_commits_its_actual_cost(guard: CostGuard) -> None:
    async with guard.spend("dm.send", Decimal("0.50"), "r1") as spend:
        assert spend.limit_usd == Decimal("0.5")
        assert await totals(guard) == (0, Decimal("0.5"))
        spend.ran(Decimal("0.20"))
    assert await totals(guard) == (Decimal("0.2"), 0)


async def test_leaving_without_a_cost_commits_the_amount_reserved(guard: CostGuard) -> None:
    async with guard.spend("dm.send", Decimal("0.30"), "r1") as spend:
        spend.ran()
        assert spend.cost_usd == Decimal("0.3")
    async with guard.spend("dm.send", Decimal("0.25"), "r2"):
        pass  # no ran(): it may have run
    assert await totals(guard) == (Decimal("0.55"), 0)


async def test_an_error_that_proves_the_call_never_ran_releases_it(guard: CostGuard) -> None:
    with pytest.raises(UnknownAction):
        async with guard.spend("dm.send", Decimal("0.50"), "r1"):
            raise UnknownAction("no such action")
    with pytest.raises(HandlerError):
        async with guard.spend("dm.send", Decimal("0.50"), "r2"):
            raise HandlerError("refused before running", never_ran=True)
    assert await totals(guard) == (0, 0)


async def test_any_other_error_counts_the_reservation_as_spent_and_logs_it(
    guard: CostGuard, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cost_guard"), pytest.raises(TimeoutError):
        async with guard.spend("dm.send", Decimal("0.40"), "r1"):
            raise TimeoutError
    with pytest.raises(HandlerError):
        async with guard.spend("dm.send", Decimal("0.10"), "r2"):
            raise HandlerError("failed while running")
    assert await totals(guard) == (Decimal("0.5"), 0)
    assert any(
        "dm.send call left its cost bracket with TimeoutError" in r.getMessage()
        and "$0.40 counts as spent" in r.getMessage()
        for r in caplog.records
    )


async def test_an_error_after_ran_commits_the_cost_given(guard: CostGuard) -> None:
    with pytest.raises(RuntimeError):
        async with guard.spend("dm.send", Decimal("0.40"), "r1") as spend:
            spend.ran(Decimal("0.05"))
            raise RuntimeError("after the call")
    assert await totals(guard) == (Decimal("0.05"), 0)


async def test_reprice_swaps_the_reservation_for_the_serving_sides_price(
    guard: CostGuard,
) -> None:
    async with guard.spend("dm.send", Decimal("0.10"), "r1") as spend:
        old = spend.reservation
        await spend.reprice(Decimal("0.70"))
        assert spend.limit_usd == Decimal("0.7")
        assert spend.reservation is not None and old is not None
        assert spend.reservation.request_id == old.request_id == "r1"
        assert spend.reservation.id != old.id
        assert await totals(guard) == (0, Decimal("0.7"))
        spend.ran(Decimal("0.65"))
    assert await totals(guard) == (Decimal("0.65"), 0)


async def test_reprice_past_the_cap_raises_and_holds_nothing(guard: CostGuard) -> None:
    with pytest.raises(CostCapReached, match="would pass MONTHLY_COST_CAP"):
        async with guard.spend("dm.send", Decimal("0.10"), "r1") as spend:
            await spend.reprice(Decimal("1.50"))
    assert spend.reservation is None
    assert await totals(guard) == (0, 0)


async def test_settle_early_settles_once(guard: CostGuard) -> None:
    async with guard.spend("dm.send", Decimal("0.30"), "r1") as spend:
        await spend.settle(never_ran=True)
        assert await totals(guard) == (0, 0)
        await spend.settle(never_ran=False)  # already settled: nothing happens
        assert spend.take(never_ran=False) is None
    assert await totals(guard) == (0, 0)


def test_take_says_what_settles_the_reservation() -> None:
    res = Reservation("id", "a.b", Decimal("0.5"), "r", "2026-03")
    spend = Spend(guard=None, reservation=res)  # type: ignore[arg-type]
    assert spend.take(never_ran=True) == (res, None)  # released
    assert spend.take(never_ran=True) is None  # once
    spend = Spend(guard=None, reservation=res)  # type: ignore[arg-type]
    assert spend.take(never_ran=False) == (res, Decimal("0.5"))  # may have run
    spend = Spend(guard=None, reservation=res)  # type: ignore[arg-type]
    spend.ran(Decimal("0.1"))
    assert spend.take(never_ran=True) == (res, Decimal("0.1"))  # it ran: the cost wins


async def test_the_cap_holds_under_concurrent_brackets(guard: CostGuard) -> None:
    ran = 0

    async def one(n: int) -> None:
        nonlocal ran
        try:
            async with guard.spend("dm.send", Decimal("0.07"), f"r{n}") as spend:
                await asyncio.sleep(0)
                spend.ran()
                ran += 1
        except CostCapReached:
            pass

    await asyncio.gather(*(one(n) for n in range(40)))
    assert ran == 14  # 14 * 0.07 = 0.98; one more would pass 1.00
    assert await totals(guard) == (Decimal("0.98"), 0)


async def test_concurrent_reprices_compete_for_the_room_and_never_pass_the_cap(
    guard: CostGuard,
) -> None:
    spends = [
        Spend(guard, await guard.reserve("dm.send", Decimal("0.10"), f"r{n}")) for n in range(5)
    ]
    outcomes = await asyncio.gather(
        *(s.reprice(Decimal("0.30")) for s in spends), return_exceptions=True
    )
    repriced = [s for s, out in zip(spends, outcomes, strict=True) if out is None]
    refused = [out for out in outcomes if isinstance(out, CostCapReached)]
    assert len(repriced) + len(refused) == 5
    assert 1 <= len(repriced) <= 3
    assert all(s.reservation is None for s, out in zip(spends, outcomes, strict=True) if out)
    committed, reserved = await totals(guard)
    assert reserved == Decimal("0.30") * len(repriced) <= CAP
    assert committed == 0


# -- left_without_running, sweeps, overruns --------------------------------------------------


def test_left_without_running_trusts_only_an_action_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    res = Reservation("id", "dm.send", Decimal("0.5"), "r", "2026-03")
    spend = Spend(guard=None, reservation=res)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="cost_guard"):
        assert left_without_running(spend, CostCapReached("no")) is True
        assert left_without_running(spend, HandlerError("ran")) is False
        assert caplog.records == []  # an ActionError is not "left with a reservation"
        assert left_without_running(spend, asyncio.CancelledError()) is False
        assert "left its cost bracket with CancelledError" in caplog.records[-1].getMessage()
        caplog.clear()
        spend.ran(Decimal("0.1"))
        assert left_without_running(spend, KeyError("x")) is False
        assert caplog.records == []  # it has a cost: nothing to warn about


def _call(rid: str, reserved: str = "0.20", cost: str | None = None) -> LoggedCall:
    return LoggedCall(
        f"id-{rid}", "2026-03", "dm.send", rid, Decimal(reserved), Decimal(cost or reserved)
    )


async def test_overdue_reservations_are_released_only_if_the_cloud_says_never_ran(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = [_call("a"), _call("b"), _call("c"), _call("d")]
    started: set[str] = set()
    everyone_asked = asyncio.Event()

    async def ask(request_id: str) -> str | None:
        started.add(request_id)
        if len(started) == len(calls):
            everyone_asked.set()
        await everyone_asked.wait()  # all are asked together, not one after another
        if request_id == "c":
            raise ConnectionError("cloud down")
        return {"a": "unknown", "b": "done", "d": None}[request_id]

    with caplog.at_level(logging.WARNING, logger="cost_guard"):
        verdicts = await asyncio.wait_for(overdue_verdicts(calls, ask, 900), timeout=10)
    assert [(r.id, cost) for r, cost in verdicts] == [
        ("id-a", None),
        ("id-b", Decimal("0.20")),
        ("id-c", Decimal("0.20")),
        ("id-d", Decimal("0.20")),
    ]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "could not ask the cloud about request c" in text
    assert "the cloud says unknown, so it is released" in text
    assert "the cloud says nothing, so it is counted as spent ($0.20)" in text


async def test_without_a_way_to_ask_every_overdue_reservation_counts_as_spent() -> None:
    verdicts = await overdue_verdicts([_call("a")], None, 60)
    assert [(r.request_id, cost) for r, cost in verdicts] == [("a", Decimal("0.20"))]
    assert await overdue_verdicts([], None, 60) == []


def test_an_overrun_is_reported_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    call = _call("r9", reserved="0.10", cost="0.25")
    assert overrun_report(call) == {
        "action": "dm.send",
        "request_id": "r9",
        "reserved_usd": "0.10",
        "cost_usd": "0.25",
    }
    with caplog.at_level(logging.WARNING, logger="cost_guard"):
        log_overrun(call)
    message = caplog.records[-1].getMessage()
    assert "dm.send (request r9) cost $0.25 but reserved only $0.10" in message
    assert "cloud budget of 2026-03 is closed" in message


# -- refusals --------------------------------------------------------------------------------


def test_cap_reached_says_how_much_why_and_how_to_fix_it() -> None:
    totals_ = MonthTotals("2026-12", Decimal("0.9"), Decimal("0.05"))
    exc = cap_reached(totals_, CAP, UTC, "dm.send", Decimal("0.1"))
    assert exc.detail == (
        "monthly cloud spend cap reached for 2026-12 (UTC): $0.90 spent + $0.05 reserved"
        " + $0.10 for dm.send would pass MONTHLY_COST_CAP $1.00; raise MONTHLY_COST_CAP or wait"
        " for the month to roll over on 2027-01-01"
    )
    assert exc.extra == {
        "month": "2026-12",
        "spent_usd": "0.90",
        "reserved_usd": "0.05",
        "cap_usd": "1.00",
    }
    assert exc.never_ran and exc.http_status == 429
    assert "for dm.send" not in cap_reached(totals_, CAP, UTC).detail


def test_budget_closed_names_the_worst_overrun_and_the_fix() -> None:
    totals_ = MonthTotals("2026-03", Decimal("0.5"), Decimal(0))
    small, worst = _call("r1", "0.10", "0.12"), _call("r2", "0.10", "0.40")
    exc = budget_closed(totals_, [small, worst], CAP)
    assert "the cloud budget of 2026-03 is closed: dm.send (request r2) cost $0.40" in exc.detail
    assert "reserved only $0.10" in exc.detail
    assert "check COST_RATES_FILE" in exc.detail and "wait for 2026-04-01" in exc.detail
    assert exc.extra["cap_usd"] == "1.00"


def test_ledger_unreachable_fails_closed_and_says_local_handlers_still_run() -> None:
    exc = ledger_unreachable("PostgreSQL db:5432/app", "connection refused")
    assert exc.detail == (
        "the cost ledger (PostgreSQL db:5432/app) is unreachable, so cloud spend fails closed"
        " until it is back (connection refused); actions with a local handler still run locally"
    )
    assert exc.extra == {"ledger_healthy": False}


# Zones whose local midnight of the 1st is ordinary, offset by a fraction of an hour, or
# skipped or repeated by a change of clocks at midnight (Havana, Santiago, Beirut in some
# years): the month kept must be the month computed, every time.
_ZONES = [
    "UTC",
    "Europe/Berlin",
    "Asia/Kathmandu",
    "Pacific/Chatham",
    "America/Havana",
    "America/Santiago",
    "Asia/Beirut",
    "America/St_Johns",
]
_INSTANTS = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2031, 1, 1), timezones=st.just(UTC)
)


@settings(max_examples=300)
@given(st.sampled_from(_ZONES), st.lists(_INSTANTS, min_size=1, max_size=30))
def test_the_ledger_month_kept_is_the_month_of_every_instant(zone: str, instants) -> None:
    tz = ZoneInfo(zone)
    kept = LedgerMonth(tz)
    for now in instants + sorted(instants):
        assert kept(now) == month_of(now, tz)
        # the instants around each month's turn in this zone
        assert kept(now.replace(day=1, hour=0)) == month_of(now.replace(day=1, hour=0), tz)


def test_the_ledger_month_turns_at_local_midnight_of_the_first() -> None:
    tz = ZoneInfo("America/Havana")  # UTC-5 in winter
    kept = LedgerMonth(tz)
    turn = datetime(2026, 2, 1, 5, 0, tzinfo=UTC)  # midnight in Havana
    assert kept(turn - timedelta(microseconds=1)) == "2026-01"
    assert kept(turn) == "2026-02"
    assert kept(turn - timedelta(microseconds=1)) == "2026-01"  # back again: not kept
