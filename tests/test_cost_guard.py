"""CostGuard on the embedded SQLite ledger (and the guard's logic with any store).

PostgreSQL and Supabase REST are in test_cost_guard_pg.py; the helpers here are shared.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from cloud_executor import CloudExecutor
from config.hybrid_config import HybridConfig
from cost_guard import CostGuard, Reservation, month_of, usd
from cost_ledger import (
    LedgerStore,
    LedgerUnavailable,
    MonthTotals,
    ReserveRequest,
    ReserveResult,
    SettleResult,
    SqliteLedgerStore,
)
from cost_ledger_pg import PostgresLedgerStore, SupabaseLedgerStore
from errors import CloudUnavailable, ConfigError, CostCapReached, InvalidParams

pytestmark = pytest.mark.prd200

ROOT = Path(__file__).resolve().parent.parent
CAP = Decimal("400")
SOFT = Decimal("380")
CENT = Decimal("0.01")


# -- helpers shared with test_cost_guard_pg.py ---------------------------------------------------


class FakeClock:
    """A settable UTC clock: ``clock()`` is now, ``advance(s)`` moves it."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class WatchedStore:
    """Wraps a real store: records every total it answers, and can be switched 'down'."""

    inner: LedgerStore
    down: bool = False
    seen_totals: list[Decimal] = field(default_factory=list)

    @property
    def kind(self) -> Any:
        return self.inner.kind

    def describe(self) -> str:
        return self.inner.describe()

    def _check(self) -> None:
        if self.down:
            raise LedgerUnavailable("switched off by the test")

    async def open(self) -> None:
        self._check()
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def heal(self) -> None:
        self._check()
        await self.inner.heal()

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        self._check()
        result = await self.inner.reserve(request)
        self.seen_totals.append(result.totals.total_usd)
        return result

    async def settle(
        self, reservation_id: str, amount_usd: Decimal | None, now: datetime
    ) -> SettleResult:
        self._check()
        result = await self.inner.settle(reservation_id, amount_usd, now)
        if result.totals:
            self.seen_totals.append(result.totals.total_usd)
        return result

    def settle_behind(self, reservation_id: str, amount_usd: Decimal | None, now: datetime) -> None:
        return None  # every commit through the wrapper is waited for, and so watched

    async def totals(self, month: str, now: datetime) -> MonthTotals:
        self._check()
        return await self.inner.totals(month, now)

    async def by_action(self, month: str) -> Any:
        self._check()
        return await self.inner.by_action(month)

    async def daily(self, month: str, day_starts: Any) -> Any:
        self._check()
        return await self.inner.daily(month, day_starts)

    async def overdue(self, created_before: datetime, limit: int) -> Any:
        self._check()
        return await self.inner.overdue(created_before, limit)

    async def overruns(self, month: str) -> Any:
        self._check()
        return await self.inner.overruns(month)


GuardFactory = Callable[..., Awaitable[CostGuard]]


async def cloud_never_saw_it(request_id: str) -> str:
    """The cloud's answer for a key it never received (so the call never ran)."""
    return "unknown"


def never_ran_sweep(store: LedgerStore, clock: FakeClock) -> AbstractAsyncContextManager[CostGuard]:
    """A guard with a 60 s TTL whose sweep hears from the cloud that nothing ran."""
    return opened(store, clock=clock, reservation_ttl_s=60, request_state=cloud_never_saw_it)


@asynccontextmanager
async def opened(store: LedgerStore, **kwargs: Any) -> AsyncIterator[CostGuard]:
    """A CostGuard over ``store`` with the PRD's caps, opened and finally closed."""
    kwargs.setdefault("monthly_cap_usd", CAP)
    kwargs.setdefault("soft_cap_usd", SOFT)
    kwargs.setdefault("tz", UTC)
    guard = CostGuard(store, **kwargs)
    await guard.open()
    try:
        yield guard
    finally:
        await guard.close()


async def spend(guard: CostGuard, amount: Decimal, action: str = "claude.complete") -> None:
    """Reserve and commit ``amount`` (test set-up: 'so much was already spent')."""
    reservation = await guard.reserve(action, amount, "setup")
    await guard.commit(reservation)


async def burst(guard: CostGuard, calls: int, amount: Decimal = CENT) -> int:
    """Run ``calls`` concurrent reserve+commit; return how many were allowed."""

    async def one(i: int) -> bool:
        try:
            reservation = await guard.reserve("dm.send", amount, f"req-{i}")
        except CostCapReached:
            return False
        await guard.commit(reservation)
        return True

    return sum(await asyncio.gather(*(one(i) for i in range(calls))))


# A separate OS process with its own CostGuard, built from configuration like the server does.
# "burst": reserve+commit N calls concurrently after "go" on stdin, print how many ran and the
# largest month total any ledger answer showed. "hang": reserve once, print, then wait forever.
WORKER = r"""
import asyncio, json, sys
from decimal import Decimal
from config.hybrid_config import HybridConfig
from cost_guard import CostGuard
from errors import CostCapReached

async def main() -> None:
    spec = json.loads(sys.argv[1])
    guard = CostGuard.from_config(HybridConfig.from_mapping(spec["config"]))
    await guard.open()
    assert guard.healthy, guard._last_error
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    amount = Decimal(spec["amount"])
    peak = Decimal(0)
    if spec["mode"] == "hang":
        reservation = await guard.reserve("dm.send", amount, "doomed")
        print(json.dumps({"reserved": reservation.id}), flush=True)
        await asyncio.sleep(3600)

    async def one(i: int) -> bool:
        nonlocal peak
        try:
            reservation = await guard.reserve("dm.send", amount, f"w{i}")
        except CostCapReached:
            return False
        peak = max(peak, guard.current_totals().total_usd)
        await guard.commit(reservation)
        peak = max(peak, guard.current_totals().total_usd)
        return True

    ran = sum(await asyncio.gather(*(one(i) for i in range(spec["calls"]))))
    print(json.dumps({"ran": ran, "peak": str(peak)}), flush=True)
    await guard.close()

asyncio.run(main())
"""


@dataclass
class Worker:
    proc: subprocess.Popen[str]

    def wait_ready(self) -> None:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if line.strip() != "ready":
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"worker did not start: {line!r} {err[-3000:]}")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self, timeout_s: float = 60.0) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=timeout_s)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        assert self.proc.returncode == 0 and lines, f"worker failed: {out!r} {err[-3000:]}"
        return dict(json.loads(lines[-1]))

    def read_json(self) -> dict[str, Any]:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        assert line.startswith("{"), f"unexpected worker output {line!r}"
        return dict(json.loads(line))


def spawn_worker(script: str, spec: dict[str, Any]) -> subprocess.Popen[str]:
    """``python -c script <spec as JSON>`` from the project root, its pipes open, and no
    database URL from this environment (the spec's config says which ledger it uses)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SUPABASE_DB_URL")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(spec)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def start_worker() -> Iterator[Callable[..., Worker]]:
    """Start worker processes (see WORKER); any still running at the end are killed."""
    started: list[Worker] = []

    def start(config: dict[str, str], *, mode: str, calls: int = 0, amount: str = "0.01") -> Worker:
        spec = {"config": config, "mode": mode, "calls": calls, "amount": amount}
        worker = Worker(spawn_worker(WORKER, spec))
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait(timeout=10)
        for pipe in (worker.proc.stdin, worker.proc.stdout, worker.proc.stderr):
            if pipe is not None:
                pipe.close()


def run_two_process_burst(
    start_worker: Callable[..., Worker], config: dict[str, str], calls_each: int
) -> tuple[int, Decimal]:
    """Two OS processes burst at one ledger at once; return (calls that ran, peak total)."""
    workers = [start_worker(config, mode="burst", calls=calls_each) for _ in range(2)]
    for worker in workers:
        worker.wait_ready()
    for worker in workers:
        worker.go()
    results = [worker.result() for worker in workers]
    return sum(r["ran"] for r in results), max(Decimal(r["peak"]) for r in results)


def kill_between_reserve_and_commit(
    start_worker: Callable[..., Worker], config: dict[str, str], amount: str
) -> None:
    """A process reserves ``amount`` and is SIGKILLed before it can commit or release."""
    worker = start_worker(config, mode="hang", amount=amount)
    worker.wait_ready()
    worker.go()
    assert worker.read_json()["reserved"]
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait(timeout=10)


NEW_YORK = ZoneInfo("America/New_York")  # summer time starts 8 March 2026 at 02:00


async def forecast_scenario(store: LedgerStore) -> dict[str, Any]:
    """Spend on local days of March 2026 in New York, then return the guard's forecast.

    The month's spend per day follows EVERREACH_TZ, not UTC, across the summer-time change;
    what is still reserved counts, what was released does not, February's last evening is out.
    """

    def at(day: int, hour: int, minute: int = 0, month: int = 3) -> datetime:
        return datetime(2026, month, day, hour, minute, tzinfo=NEW_YORK)

    clock = FakeClock(at(28, 20, month=2))  # 1 March, 01:00 UTC: still February here
    caps = {"monthly_cap_usd": Decimal("60"), "soft_cap_usd": Decimal("50")}
    async with opened(store, clock=clock, tz=NEW_YORK, **caps) as guard:
        await spend(guard, Decimal("40"))
        for day, hour, minute, amount in ((2, 12, 0, "10"), (3, 23, 30, "20"), (9, 0, 30, "5")):
            clock.now = at(day, hour, minute)  # 3 March 23:30 is already the 4th in UTC
            await spend(guard, Decimal(amount))
        await guard.reserve("dm.send", Decimal("1"), "still-open")
        await guard.release(await guard.reserve("dm.send", Decimal("7"), "never-ran"))
        snap = await guard.snapshot()
    assert snap["month"] == "2026-03"
    return dict(snap["forecast"])


def assert_march_forecast(forecast: dict[str, Any]) -> None:
    """What ``forecast_scenario`` must give, worked out by hand."""
    daily = ["0.00", "10.00", "20.00", "0.00", "0.00", "0.00", "0.00", "0.00", "6.00"]
    assert forecast["daily_usd"] == daily
    assert forecast["as_of"] == "2026-03-09" and forecast["month_end"] == "2026-03-31"
    pace = Decimal(26) / 7  # the last 7 days, the 3rd to the 9th
    assert forecast["spent_usd"] == "36.00"
    assert forecast["pace_usd_per_day"] == "3.71"
    assert Decimal(forecast["projected_usd"]) == (36 + pace * 22).quantize(CENT)
    # 14 more dollars at 26/7 a day: 4 days; 24 more: 7 days.
    assert forecast["soft_cap_date"] == "2026-03-13"
    assert forecast["hard_cap_date"] == "2026-03-16"
    assert forecast["soft_cap_usd"] == "50.00" and forecast["hard_cap_usd"] == "60.00"


# -- SQLite --------------------------------------------------------------------------------------


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "cost_ledger.sqlite3"


async def test_ten_one_cent_calls_make_exactly_ten_cents(ledger_path: Path) -> None:
    async with opened(SqliteLedgerStore(ledger_path)) as guard:
        for _ in range(10):
            await spend(guard, CENT)
        assert guard.current_totals().committed_usd == Decimal("0.10")
        snap = await guard.snapshot()
    assert snap["spent_usd"] == "0.10"
    assert snap["by_action"] == {"claude.complete": "0.10"}


async def test_380_recorded_reaches_the_soft_cap(ledger_path: Path) -> None:
    async with opened(SqliteLedgerStore(ledger_path)) as guard:
        await spend(guard, Decimal("379.99"))
        assert not guard.is_soft_cap_reached()
        await spend(guard, CENT)
        assert guard.is_soft_cap_reached()
        assert not guard.is_hard_cap_reached()
        assert guard.cap_error() is None


async def test_reserve_past_the_hard_cap_says_why_and_how_to_raise_it(ledger_path: Path) -> None:
    clock = FakeClock(datetime(2026, 3, 10, 12, tzinfo=UTC))
    async with opened(SqliteLedgerStore(ledger_path), clock=clock) as guard:
        await spend(guard, Decimal("399.95"))
        with pytest.raises(CostCapReached) as info:
            await guard.reserve("dm.send", Decimal("0.10"), "r1")
        await spend(guard, Decimal("0.05"))  # exactly to the cap is allowed
        assert guard.is_hard_cap_reached()
        assert guard.cap_error() is not None
    detail = info.value.detail
    assert "2026-03" in detail and "399.95" in detail and "400.00" in detail
    assert "MONTHLY_COST_CAP" in detail and "2026-04-01" in detail
    assert info.value.http_status == 429


async def test_cap_holds_under_200_concurrent_calls(ledger_path: Path) -> None:
    store = WatchedStore(SqliteLedgerStore(ledger_path))
    async with opened(store) as guard:
        await spend(guard, Decimal("399.90"))
        ran = await burst(guard, 200)
        snap = await guard.snapshot()
    assert ran == 10
    assert max(store.seen_totals) == Decimal("400.00")
    assert snap["spent_usd"] == "400.00" and snap["reserved_usd"] == "0.00"


async def test_cap_holds_across_two_processes_on_one_sqlite_file(
    tmp_path: Path, start_worker: Callable[..., Worker]
) -> None:
    config = {"DATA_DIR": str(tmp_path / "data"), "EVERREACH_TZ": "UTC"}
    async with opened(SqliteLedgerStore(tmp_path / "data" / "cost_ledger.sqlite3")) as guard:
        await spend(guard, Decimal("399.90"))
        ran, peak = run_two_process_burst(start_worker, config, calls_each=100)
        await guard.refresh()
        assert guard.current_totals() == MonthTotals(guard.month(), Decimal("400"), Decimal(0))
    assert ran == 10
    assert peak <= CAP


async def test_killed_process_leaves_no_phantom_spend_after_the_ttl(
    tmp_path: Path, start_worker: Callable[..., Worker]
) -> None:
    config = {"DATA_DIR": str(tmp_path / "data"), "EVERREACH_TZ": "UTC"}
    kill_between_reserve_and_commit(start_worker, config, amount="300")
    clock = FakeClock()
    store = SqliteLedgerStore(tmp_path / "data" / "cost_ledger.sqlite3")
    async with opened(store, clock=clock, request_state=cloud_never_saw_it) as guard:
        assert guard.current_totals().reserved_usd == Decimal("300")  # still held: may be running
        with pytest.raises(CostCapReached):
            await guard.reserve("dm.send", Decimal("200"), "r")
        clock.advance(900 + 1)
        await guard.refresh()
        assert guard.current_totals().reserved_usd == Decimal(0)
        await guard.reserve("dm.send", Decimal("400"), "r")


async def test_reservation_expires_after_the_ttl(ledger_path: Path) -> None:
    clock = FakeClock()
    async with never_ran_sweep(SqliteLedgerStore(ledger_path), clock) as guard:
        await guard.reserve("dm.send", Decimal("390"), "never-settled")
        clock.advance(59)
        await guard.refresh()
        with pytest.raises(CostCapReached):
            await guard.reserve("dm.send", Decimal("20"), "r2")
        clock.advance(2)
        await guard.refresh()  # the sweep (off the request path) asks the cloud, then releases
        await guard.reserve("dm.send", Decimal("20"), "r3")
        assert guard.current_totals().reserved_usd == Decimal("20")


async def test_late_commit_after_expiry_is_still_recorded(ledger_path: Path) -> None:
    clock = FakeClock()
    async with never_ran_sweep(SqliteLedgerStore(ledger_path), clock) as guard:
        slow = await guard.reserve("dm.send", Decimal("5"), "slow")
        clock.advance(120)
        await guard.refresh()
        assert guard.current_totals().reserved_usd == Decimal(0)
        await guard.commit(slow, Decimal("4.5"))
        assert guard.current_totals() == MonthTotals(guard.month(), Decimal("4.5"), Decimal(0))


async def test_release_gives_the_money_back(ledger_path: Path) -> None:
    async with opened(SqliteLedgerStore(ledger_path)) as guard:
        reservation = await guard.reserve("dm.send", Decimal("400"), "r")
        assert guard.is_hard_cap_reached()
        await guard.release(reservation)
        await guard.release(reservation)  # twice is harmless
        assert guard.current_totals().total_usd == Decimal(0)
        await guard.commit(await guard.reserve("dm.send", Decimal("400"), "r2"))


async def test_commit_records_the_actual_cost_once(ledger_path: Path) -> None:
    async with opened(SqliteLedgerStore(ledger_path)) as guard:
        reservation = await guard.reserve("claude.complete", CENT, "r")
        await guard.commit(reservation, 0.004)  # type: ignore[arg-type]  # a JSON float
        await guard.commit(reservation, Decimal("1"))  # a repeated commit changes nothing
        assert guard.current_totals().committed_usd == Decimal("0.004")
        tiny = await guard.reserve("claude.complete", Decimal("0.0000001"), "r2")
        assert tiny.amount_usd == Decimal("0.000001")  # rounded up to a whole micro-dollar


async def test_month_rolls_over_at_the_first_in_everreach_tz(ledger_path: Path) -> None:
    # 23:59 on 31 January in Auckland is still 31 January 10:59 in UTC.
    clock = FakeClock(datetime(2026, 1, 31, 10, 59, tzinfo=UTC))
    tz = ZoneInfo("Pacific/Auckland")
    async with opened(SqliteLedgerStore(ledger_path), clock=clock, tz=tz) as guard:
        await spend(guard, Decimal("395"))
        assert guard.month() == "2026-01" and guard.is_soft_cap_reached()
        clock.advance(120)  # 00:01 on 1 February in Auckland, still January in UTC
        assert guard.month() == "2026-02"
        assert not guard.is_soft_cap_reached()  # no I/O needed to see the new month
        reservation = await guard.reserve("dm.send", Decimal("50"), "r")
        assert reservation.month == "2026-02"
        await guard.commit(reservation)
        snap = await guard.snapshot()
    assert snap["month"] == "2026-02" and snap["spent_usd"] == "50.00"


async def test_snapshot_forecasts_the_month_from_its_spend_per_local_day(
    ledger_path: Path,
) -> None:
    assert_march_forecast(await forecast_scenario(SqliteLedgerStore(ledger_path)))


async def test_snapshot_has_no_forecast_while_the_ledger_is_down(ledger_path: Path) -> None:
    store = WatchedStore(SqliteLedgerStore(ledger_path))
    async with opened(store) as guard:
        await spend(guard, CENT)
        assert (await guard.snapshot())["forecast"]["spent_usd"] == "0.01"
        store.down = True
        await guard.refresh()
        snap = await guard.snapshot()
    assert snap["healthy"] is False and snap["forecast"] is None


def test_month_of_uses_the_zone() -> None:
    moment = datetime(2026, 2, 28, 23, 30, tzinfo=UTC)
    assert month_of(moment, UTC) == "2026-02"
    assert month_of(moment, ZoneInfo("Europe/Berlin")) == "2026-03"
    assert month_of(moment, ZoneInfo("America/New_York")) == "2026-02"


async def test_instances_sharing_a_ledger_see_each_others_spend(ledger_path: Path) -> None:
    async with (
        opened(SqliteLedgerStore(ledger_path)) as first,
        opened(SqliteLedgerStore(ledger_path)) as second,
    ):
        await spend(first, Decimal("380"))
        assert not second.is_soft_cap_reached()  # not yet refreshed
        await second.refresh()  # what the background task does every few seconds
        assert second.is_soft_cap_reached()
        with pytest.raises(CostCapReached):
            await second.reserve("dm.send", Decimal("20.01"), "r")


async def test_unwritable_ledger_fails_closed_without_crashing(tmp_path: Path) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("a file where the data directory should be")
    async with opened(SqliteLedgerStore(blocker / "cost_ledger.sqlite3")) as guard:
        assert not guard.healthy
        assert guard.is_soft_cap_reached() and guard.is_hard_cap_reached()
        with pytest.raises(CostCapReached, match="unreachable"):
            await guard.reserve("dm.send", CENT, "r")
        assert (await guard.snapshot())["healthy"] is False
        blocker.unlink()
        await guard.refresh()  # what the background task retries every second
        assert guard.healthy and not guard.is_soft_cap_reached()
        await spend(guard, CENT)


async def test_database_down_fails_closed(tmp_path: Path) -> None:
    store = PostgresLedgerStore(
        "postgresql://postgres@127.0.0.1:1/none", connect_timeout_s=0.3, statement_timeout_s=1
    )
    async with opened(store) as guard:
        assert not guard.healthy
        assert guard.is_soft_cap_reached() and guard.is_hard_cap_reached()
        with pytest.raises(CostCapReached) as info:
            await guard.reserve("dm.send", CENT, "r")
        snap = await guard.snapshot()
    assert "unreachable" in info.value.detail and "fails closed" in info.value.detail
    assert snap["healthy"] is False and snap["store"] == "postgres"
    assert "127.0.0.1:1" in snap["ledger"]


async def test_commit_during_an_outage_lands_when_the_ledger_is_back(ledger_path: Path) -> None:
    store = WatchedStore(SqliteLedgerStore(ledger_path))
    async with opened(store) as guard:
        reservation = await guard.reserve("dm.send", Decimal("2"), "r")
        store.down = True
        await guard.commit(reservation, Decimal("3"))  # does not raise: kept for later
        assert not guard.healthy and guard.is_soft_cap_reached()
        assert (await guard.snapshot())["pending_settlements"] == 1
        await guard.refresh()
        assert not guard.healthy
        store.down = False
        await guard.refresh()
        assert guard.healthy
        assert guard.current_totals() == MonthTotals(guard.month(), Decimal("3"), Decimal(0))


async def test_close_is_idempotent_and_stops_the_refresh_task(ledger_path: Path) -> None:
    guard = CostGuard(
        SqliteLedgerStore(ledger_path), monthly_cap_usd=CAP, soft_cap_usd=SOFT, tz=UTC
    )
    await guard.open()
    task = guard._task
    assert task is not None and not task.done()
    await guard.close()
    await guard.close()
    assert task.done() and not guard.healthy


async def test_snapshot_reports_caps_reservations_and_spend_per_action(ledger_path: Path) -> None:
    async with opened(SqliteLedgerStore(ledger_path)) as guard:
        await spend(guard, Decimal("0.002"), "research.platform")
        await spend(guard, Decimal("0.005"), "linkedin.message")
        held: Reservation = await guard.reserve("upwork.propose", Decimal("0.003"), "r")
        snap = await guard.snapshot()
        await guard.release(held)
    assert snap["spent_usd"] == "0.007" and snap["reserved_usd"] == "0.003"
    assert snap["soft_cap_usd"] == "380.00" and snap["hard_cap_usd"] == "400.00"
    assert snap["by_action"] == {"linkedin.message": "0.005", "research.platform": "0.002"}
    assert snap["reserved_by_action"] == {"upwork.propose": "0.003"}
    assert snap["store"] == "sqlite" and snap["healthy"] is True
    assert snap["soft_cap_reached"] is False


@pytest.mark.parametrize(
    ("amount", "text"),
    [("0.1", "0.10"), ("400", "400.00"), ("0.002", "0.002"), ("0.0000015", "0.000002")],
)
def test_usd_formats_exactly(amount: str, text: str) -> None:
    assert usd(Decimal(amount).quantize(Decimal("0.000001"), rounding="ROUND_CEILING")) == text


# -- store selection -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "kind"),
    [
        ({}, "sqlite"),
        ({"DATABASE_URL": "postgresql://u:secret@db.example:5432/app"}, "postgres"),
        ({"SUPABASE_DB_URL": "postgresql://u:secret@db.example:5432/app"}, "postgres"),
        ({"SUPABASE_URL": "https://x.supabase.co", "SUPABASE_SERVICE_KEY": "k"}, "supabase"),
        (
            {
                "DATABASE_URL": "postgresql://u@db.example/app",
                "SUPABASE_URL": "https://x.supabase.co",
                "SUPABASE_SERVICE_KEY": "k",
            },
            "postgres",
        ),
    ],
)
def test_from_config_picks_the_store(variables: dict[str, str], kind: str, tmp_path: Path) -> None:
    config = HybridConfig.from_mapping({"DATA_DIR": str(tmp_path), **variables})
    guard = CostGuard.from_config(config)
    assert guard.store_kind == kind
    assert "secret" not in guard._store.describe()


def test_from_config_sqlite_file_is_under_data_dir(tmp_path: Path) -> None:
    guard = CostGuard.from_config(HybridConfig.from_mapping({"DATA_DIR": str(tmp_path)}))
    assert isinstance(guard._store, SqliteLedgerStore)
    assert guard._store.path == tmp_path / "cost_ledger.sqlite3"


def test_from_config_half_a_supabase_config_is_an_error(tmp_path: Path) -> None:
    config = HybridConfig.from_mapping({"SUPABASE_URL": "https://x.supabase.co"})
    with pytest.raises(ConfigError, match="SUPABASE_SERVICE_KEY"):
        CostGuard.from_config(config)


def test_from_config_uses_everreach_tz_and_caps() -> None:
    config = HybridConfig.from_mapping(
        {"EVERREACH_TZ": "Asia/Tokyo", "MONTHLY_COST_CAP": "50", "COST_SOFT_CAP": "45.5"}
    )
    guard = CostGuard.from_config(config)
    assert guard._tz == ZoneInfo("Asia/Tokyo")
    assert (guard._hard_cap_usd, guard._soft_cap_usd) == (Decimal(50), Decimal("45.5"))


def test_from_config_empty_tz_is_the_machines_zone() -> None:
    import tzlocal

    guard = CostGuard.from_config(HybridConfig.from_mapping({}))
    assert str(guard._tz) == str(tzlocal.get_localzone())


# -- Supabase REST without a server: the network layer fails -------------------------------------


async def test_supabase_unreachable_fails_closed() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as http:
        store = SupabaseLedgerStore("https://x.supabase.co", "k", http_client=http)
        async with opened(store) as guard:
            assert not guard.healthy and guard.is_soft_cap_reached()
            with pytest.raises(CostCapReached, match="unreachable"):
                await guard.reserve("dm.send", CENT, "r")


# -- the spend bracket: every way out settles the reservation -------------------------------------


async def test_a_call_that_ran_commits_what_it_cost(ledger_path: Path) -> None:
    async with opened(SqliteLedgerStore(ledger_path)) as guard:
        async with guard.spend("dm.send", CENT, "r1") as spend:
            assert spend.limit_usd == CENT
            spend.ran(Decimal("0.004"))
        totals = guard.current_totals()
    assert (totals.committed_usd, totals.reserved_usd) == (Decimal("0.004"), 0)


@pytest.mark.parametrize(
    ("error", "committed"),
    [
        pytest.param(InvalidParams("NaN in params"), Decimal(0), id="never-ran-is-released"),
        pytest.param(
            CloudUnavailable("read timeout", never_ran=False), CENT, id="ambiguous-is-spent"
        ),
        pytest.param(ValueError("a bug"), CENT, id="any-other-error-is-spent"),
        pytest.param(asyncio.CancelledError(), CENT, id="cancelled-is-spent"),
    ],
)
async def test_leaving_the_bracket_by_an_exception_settles_it(
    ledger_path: Path, error: BaseException, committed: Decimal
) -> None:
    async with opened(SqliteLedgerStore(ledger_path)) as guard:
        with pytest.raises(type(error)):
            async with guard.spend("dm.send", CENT, "r1"):
                raise error
        totals = guard.current_totals()
    assert (totals.committed_usd, totals.reserved_usd) == (committed, 0)


async def test_reprice_swaps_the_reservation_for_the_quoted_price(ledger_path: Path) -> None:
    async with opened(SqliteLedgerStore(ledger_path)) as guard:
        await spend(guard, Decimal("399.90"))
        async with guard.spend("dm.send", CENT, "r1") as held:
            await held.reprice(Decimal("0.10"))  # fits only because 0.01 is given back first
            assert held.limit_usd == Decimal("0.10")
        with pytest.raises(CostCapReached):
            async with guard.spend("dm.send", CENT, "r2") as refused:
                await refused.reprice(Decimal("0.02"))
        totals = guard.current_totals()
    assert (totals.committed_usd, totals.reserved_usd) == (CAP, 0)


async def test_a_commit_behind_comes_before_the_next_reservation(ledger_path: Path) -> None:
    async with opened(SqliteLedgerStore(ledger_path)) as guard:
        await spend(guard, Decimal("399.80"))
        async with guard.spend("dm.send", Decimal("0.20"), "r1", commit_behind=True) as call:
            call.ran(CENT)
        # Fits only with the commit of $0.01 (not the $0.20 held) written before it.
        reservation = await guard.reserve("dm.send", Decimal("0.19"), "r2")
        await guard.commit(reservation)
        snapshot = await guard.snapshot()
    assert (snapshot["spent_usd"], snapshot["reserved_usd"]) == ("400.00", "0.00")


async def test_commits_behind_are_in_the_snapshot_and_written_at_close(ledger_path: Path) -> None:
    async with opened(SqliteLedgerStore(ledger_path)) as guard:
        async with guard.spend("dm.send", CENT, "r1", commit_behind=True) as call:
            call.ran(Decimal("0.004"))
        assert (await guard.snapshot())["spent_usd"] == "0.004"
        async with guard.spend("dm.send", CENT, "r2", commit_behind=True):
            pass
    async with opened(SqliteLedgerStore(ledger_path)) as reopened:
        snapshot = await reopened.snapshot()
    assert (snapshot["spent_usd"], snapshot["reserved_usd"]) == ("0.014", "0.00")


async def test_an_overrun_committed_behind_still_closes_the_budget_at_once(
    ledger_path: Path,
) -> None:
    async with opened(SqliteLedgerStore(ledger_path)) as guard:
        async with guard.spend("claude.complete", CENT, "r1", commit_behind=True) as call:
            call.ran(Decimal("0.05"))
        assert guard.budget_closed()
        with pytest.raises(CostCapReached, match="closed"):
            await guard.reserve("dm.send", CENT, "r2")


async def overrun_seen_by_another(one: CostGuard, other: CostGuard) -> None:
    """``one`` commits $0.05 on a $0.01 reservation; ``other`` (same ledger) must close too."""
    seen: list[int] = []
    one.on_overrun = lambda: seen.append(1)
    async with one.spend("claude.complete", CENT, "r1") as call:
        call.ran(Decimal("0.05"))
    assert one.budget_closed() and seen == [1]
    await other.refresh()
    assert other.budget_closed() and other.is_hard_cap_reached()
    with pytest.raises(CostCapReached, match="closed"):
        await other.reserve("dm.send", CENT, "r2")
    assert (await other.snapshot())["overruns"][0]["cost_usd"] == "0.05"


async def test_a_budget_closed_by_an_overrun_is_seen_by_other_instances(
    ledger_path: Path,
) -> None:
    async with (
        opened(SqliteLedgerStore(ledger_path)) as one,
        opened(SqliteLedgerStore(ledger_path)) as other,
    ):
        assert not other.budget_closed()
        await overrun_seen_by_another(one, other)


# -- unsettled reservations: spent unless the cloud says the request never ran ---------------------


@dataclass
class IdempotencyCloud:
    """The cloud's ``GET /api/idempotency/{key}`` as an ``httpx.MockTransport`` handler."""

    answer: httpx.Response | Exception
    asked: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.asked.append(request)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def state(value: str, key: str = "crashed-call") -> httpx.Response:
    return httpx.Response(200, json={"key": key, "state": value})


@pytest.mark.parametrize(
    ("answer", "spent"),
    [
        pytest.param(state("unknown"), Decimal(0), id="unknown-is-released"),
        pytest.param(state("done"), Decimal(5), id="done-is-spent"),
        pytest.param(state("running"), Decimal(5), id="running-is-spent"),
        pytest.param(state("indeterminate"), Decimal(5), id="indeterminate-is-spent"),
        pytest.param(state("unknown", key="another-key"), Decimal(5), id="other-key-is-spent"),
        pytest.param(httpx.Response(404), Decimal(5), id="no-endpoint-is-spent"),
        pytest.param(httpx.Response(200, text="<html>"), Decimal(5), id="junk-is-spent"),
        pytest.param(httpx.ConnectError("refused"), Decimal(5), id="no-answer-is-spent"),
    ],
)
async def test_an_unsettled_reservation_is_spent_unless_the_cloud_never_saw_it(
    ledger_path: Path, answer: httpx.Response | Exception, spent: Decimal
) -> None:
    cloud = IdempotencyCloud(answer)
    clock = FakeClock()
    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(cloud)) as client,
        opened(SqliteLedgerStore(ledger_path), clock=clock, reservation_ttl_s=60) as guard,
    ):
        executor = CloudExecutor(endpoint="http://cloud.test", api_key="k-123", client=client)
        guard.request_state = executor.request_state
        await guard.reserve("dm.send", Decimal(5), "crashed-call")  # never settled
        clock.advance(59)
        await guard.refresh()
        assert cloud.asked == []  # not overdue yet
        clock.advance(2)
        await guard.reserve("dm.send", CENT, "r2")
        assert cloud.asked == []  # reserving never waits on the cloud: the sweep is background
        await guard.refresh()
        await guard.refresh()  # settled once: not asked again
        totals = guard.current_totals()
    assert [r.url.path for r in cloud.asked] == ["/api/idempotency/crashed-call"]
    assert cloud.asked[0].headers["Authorization"] == "Bearer k-123"
    assert (totals.committed_usd, totals.reserved_usd) == (spent, CENT)


async def test_without_a_cloud_to_ask_an_unsettled_reservation_is_spent(ledger_path: Path) -> None:
    clock = FakeClock()
    async with opened(SqliteLedgerStore(ledger_path), clock=clock, reservation_ttl_s=60) as guard:
        await guard.reserve("dm.send", Decimal(5), "crashed-call")
        clock.advance(61)
        await guard.refresh()
        totals = guard.current_totals()
    assert (totals.committed_usd, totals.reserved_usd) == (Decimal(5), 0)


@pytest.mark.parametrize("amount", ["1e999", "-0.01", "NaN", "1e12"])
async def test_an_amount_the_ledger_cannot_hold_exactly_is_refused(
    ledger_path: Path, amount: str
) -> None:
    async with opened(SqliteLedgerStore(ledger_path)) as guard:
        with pytest.raises(ValueError):
            await guard.reserve("dm.send", Decimal(amount), "r1")
