"""Budget leases: calls carved in memory from a block reserved in the SQLite ledger.

Real SQLite files, real OS processes for the kill and the two-process cap; no timing asserted.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from cost_guard import CostGuard
from cost_ledger import LEASE_ACTION, LeasingStore, SqliteLedgerStore
from cost_ledger_pg import PostgresLedgerStore
from errors import CloudUnavailable, CostCapReached
from tests.test_cost_guard import CENT, FakeClock, opened, spawn_worker

pytestmark = pytest.mark.prd200

ROOT = Path(__file__).resolve().parent.parent


def rows(path: Path) -> list[tuple[str, str, int, int]]:
    """(action, status, cost, reserved) of every ledger row, in micro-dollars."""
    with sqlite3.connect(path) as conn:
        found = conn.execute(
            "SELECT action, status, cost_micro_usd, reserved_micro_usd FROM actp_cost_log"
        ).fetchall()
    return [(str(a), str(s), int(c), int(r)) for a, s, c, r in found]


async def call(guard: CostGuard, n: int, cost: Decimal | None = None) -> None:
    async with guard.spend("dm.send", CENT, f"req-{n}", commit_behind=True) as spend:
        spend.ran(cost)


def test_only_the_sqlite_store_leases() -> None:
    assert isinstance(SqliteLedgerStore(Path("unused.sqlite3")), LeasingStore)
    assert not isinstance(PostgresLedgerStore("postgresql://127.0.0.1/none"), LeasingStore)


async def test_calls_are_carved_from_one_lease_and_its_rest_is_given_back_on_close(
    ledger_path: Path,
) -> None:
    async with opened(SqliteLedgerStore(ledger_path)) as guard:
        for n in range(10):
            await call(guard, n, Decimal("0.004") if n % 2 else None)
        await guard.refresh()  # the commits queued behind are written
        leases = [row for row in rows(ledger_path) if row[0] == LEASE_ACTION]
        assert [(s, r) for _, s, _, r in leases] == [("reserved", 16 * 10_000)]
        # Still held: the lease's size less the reservations of the ten calls.
        assert guard.current_totals().reserved_usd == Decimal("0.06")
    calls = [row for row in rows(ledger_path) if row[0] != LEASE_ACTION]
    assert sorted(calls) == sorted(
        [("dm.send", "committed", 4_000 if n % 2 else 10_000, 10_000) for n in range(10)]
    )
    assert [(s, c) for a, s, c, _ in rows(ledger_path) if a == LEASE_ACTION] == [("released", 0)]
    async with opened(SqliteLedgerStore(ledger_path)) as reopened:
        snapshot = await reopened.snapshot()
    assert (snapshot["spent_usd"], snapshot["reserved_usd"]) == ("0.07", "0.00")


async def test_a_burst_takes_one_lease_sized_for_all_its_calls(ledger_path: Path) -> None:
    async with opened(SqliteLedgerStore(ledger_path)) as guard:
        await asyncio.gather(*(call(guard, n) for n in range(50)))
        await guard.refresh()
        leases = [row for row in rows(ledger_path) if row[0] == LEASE_ACTION]
        # One lease for the burst, not one per 16 calls (then the renewal, taken in the
        # background once a quarter was left).
        assert leases[0][3] == 50 * 10_000 and len(leases) <= 2, leases
    assert len([row for row in rows(ledger_path) if row[0] != LEASE_ACTION]) == 50


async def test_a_call_that_never_ran_goes_back_to_the_lease_and_writes_nothing(
    ledger_path: Path,
) -> None:
    async with opened(SqliteLedgerStore(ledger_path)) as guard:
        await call(guard, 0)
        with pytest.raises(CloudUnavailable):
            async with guard.spend("dm.send", CENT, "never", commit_behind=True):
                raise CloudUnavailable("refused", never_ran=True)
        await guard.refresh()
        assert guard.current_totals().reserved_usd == Decimal("0.15")
        assert len(rows(ledger_path)) == 2  # the lease and the one call that ran
        snapshot = await guard.snapshot()  # gives the lease back first
    assert (snapshot["spent_usd"], snapshot["reserved_usd"]) == ("0.01", "0.00")


async def test_an_idle_lease_is_given_back_by_the_refresh(ledger_path: Path) -> None:
    clock = FakeClock()
    async with opened(SqliteLedgerStore(ledger_path), clock=clock) as guard:
        await call(guard, 0)
        await guard.refresh()
        assert guard.current_totals().reserved_usd == Decimal("0.15")
        clock.advance(11)
        await guard.refresh()
        assert guard.current_totals().reserved_usd == 0
        await call(guard, 1)  # a new lease
        await guard.refresh()
        assert guard.current_totals().committed_usd == Decimal("0.02")


async def test_a_call_in_flight_across_a_clock_jump_keeps_its_lease_out_of_the_sweep(
    ledger_path: Path,
) -> None:
    clock = FakeClock()
    asked: list[str] = []

    async def never_saw_it(request_id: str) -> str:
        asked.append(request_id)
        return "unknown"

    store = SqliteLedgerStore(ledger_path)
    async with opened(store, clock=clock, reservation_ttl_s=60, request_state=never_saw_it) as g:
        async with g.spend("dm.send", CENT, "slow", commit_behind=True) as spend:
            clock.advance(61)
            await g.refresh()  # the lease is retired, its unused part given back, not swept
            assert g.current_totals().reserved_usd == CENT
            spend.ran()
        await g.refresh()
        assert (g.current_totals().committed_usd, g.current_totals().reserved_usd) == (CENT, 0)
    assert asked == []


async def test_the_cap_holds_to_the_last_cent_with_two_guards_on_one_ledger(
    ledger_path: Path,
) -> None:
    # Cap $1.00, calls of $0.01 in 2 x 20 concurrent loops: leases of up to 8 calls while a
    # quarter of what remains allows, then calls one by one. Every 7th call never runs.
    cap = Decimal("1.00")
    settings: dict[str, Any] = {
        "monthly_cap_usd": cap,
        "soft_cap_usd": cap,
        "lease_calls": 8,
        "lease_share": Decimal("0.25"),
    }
    ran = 0

    async def loop(guard: CostGuard, worker: int) -> None:
        nonlocal ran
        for n in range(1000):
            try:
                async with guard.spend("dm.send", CENT, f"{worker}-{n}", commit_behind=True):
                    if n % 7 == 3:
                        raise CloudUnavailable("refused", never_ran=True)
                    await asyncio.sleep(0)
                    ran += 1
            except CloudUnavailable:
                continue
            except CostCapReached:
                return

    async with (
        opened(SqliteLedgerStore(ledger_path), **settings) as one,
        opened(SqliteLedgerStore(ledger_path), **settings) as two,
    ):
        await asyncio.gather(*(loop(g, w) for g in (one, two) for w in range(20)))
        snapshots = [await one.snapshot(), await two.snapshot()]
    assert ran == 100
    for snapshot in snapshots:
        assert (snapshot["spent_usd"], snapshot["reserved_usd"]) == ("1.00", "0.00")
    assert any(action == LEASE_ACTION for action, *_ in rows(ledger_path))
    committed = [c for a, s, c, _ in rows(ledger_path) if s == "committed" and a != LEASE_ACTION]
    assert len(committed) == 100 and sum(committed) == 1_000_000


# -- real processes --------------------------------------------------------------------------

# A process with its own CostGuard built from configuration (default lease settings), calling
# through spend(commit_behind=True) as the router does. "burst": N concurrent calls after "go";
# "hang": one call, its commit written, then wait to be killed with the lease held.
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
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    amount = Decimal(spec["amount"])

    async def one(i: int) -> bool:
        try:
            async with guard.spend("dm.send", amount, f"w{i}", commit_behind=True):
                await asyncio.sleep(0)
        except CostCapReached:
            return False
        return True

    if spec["mode"] == "hang":
        await one(0)
        await guard.refresh()
        print(json.dumps({"reserved": str(guard.current_totals().reserved_usd)}), flush=True)
        await asyncio.sleep(3600)
    ran = sum(await asyncio.gather(*(one(i) for i in range(spec["calls"]))))
    await guard.close()
    print(json.dumps({"ran": ran}), flush=True)

asyncio.run(main())
"""


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def start(
    started: list[subprocess.Popen[str]], data_dir: Path, mode: str, calls: int = 0
) -> subprocess.Popen[str]:
    config = {"DATA_DIR": str(data_dir), "EVERREACH_TZ": "UTC"}
    spec = {"config": config, "mode": mode, "calls": calls, "amount": "0.01"}
    proc = spawn_worker(WORKER, spec)
    started.append(proc)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"worker did not start: {line!r}"
    return proc


def go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


@pytest.mark.process
async def test_two_processes_leasing_on_one_file_spend_the_cap_to_the_last_cent(
    tmp_path: Path, workers: list[subprocess.Popen[str]]
) -> None:
    # $2.00 left under the $400 cap: leases (16 calls, 1 % of what remains) while they fit,
    # then one by one; 2 x 150 calls of $0.01 want $3.00, so exactly 200 run.
    data_dir = tmp_path / "data"
    async with opened(SqliteLedgerStore(data_dir / "cost_ledger.sqlite3")) as guard:
        reservation = await guard.reserve("claude.complete", Decimal("398.00"), "setup")
        await guard.commit(reservation)
        procs = [start(workers, data_dir, "burst", calls=150) for _ in range(2)]
        for proc in procs:
            go(proc)
        outs = [proc.communicate(timeout=120) for proc in procs]
        snapshot = await guard.snapshot()
    ran = sum(json.loads(out.splitlines()[-1])["ran"] for out, _ in outs)
    assert ran == 200
    assert (snapshot["spent_usd"], snapshot["reserved_usd"]) == ("400.00", "0.00")
    assert any(action == LEASE_ACTION for action, *_ in rows(data_dir / "cost_ledger.sqlite3"))


@pytest.mark.process
async def test_a_killed_holders_lease_is_counted_as_spent_by_the_sweep(
    tmp_path: Path, workers: list[subprocess.Popen[str]]
) -> None:
    data_dir = tmp_path / "data"
    path = data_dir / "cost_ledger.sqlite3"
    proc = start(workers, data_dir, "hang")
    go(proc)
    assert proc.stdout is not None
    held = json.loads(proc.stdout.readline())
    assert Decimal(held["reserved"]) == Decimal("0.15")  # a lease of 16 calls, one committed
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    clock = FakeClock()
    asked: list[str] = []

    async def never_saw_it(request_id: str) -> str:
        asked.append(request_id)
        return "unknown"  # must not release a lease: its calls are not in the ledger

    async with opened(SqliteLedgerStore(path), clock=clock, request_state=never_saw_it) as guard:
        assert guard.current_totals().reserved_usd == Decimal("0.15")
        with pytest.raises(CostCapReached):  # the lease's money is held until the sweep
            await guard.reserve("dm.send", Decimal("399.86"), "r")
        clock.advance(900 + 1)
        await guard.refresh()
        totals = guard.current_totals()
        # Over-counted: the lease's unused $0.15, at most one lease's worth.
        assert (totals.committed_usd, totals.reserved_usd) == (Decimal("0.16"), 0)
        await guard.reserve("dm.send", Decimal("399.84"), "r")
        with pytest.raises(CostCapReached):
            await guard.reserve("dm.send", CENT, "r2")
    assert asked == []
    assert ("dm.send", "committed", 10_000, 10_000) in rows(path)


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "cost_ledger.sqlite3"
