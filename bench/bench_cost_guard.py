"""Benchmark the cost guard: reserve+commit on SQLite and PostgreSQL against a bare INSERT.

    python -m bench.bench_cost_guard [--quick] [--dir PATH] [--dsn POSTGRES_DSN]

For each store and 1, 32 and 256 concurrent callers, measures reservations per second and the
p50/p99 latency of one ``reserve()`` + ``commit()`` pair (two atomic round trips to the ledger),
and, in the same run on the same database, a bare one-row ``INSERT`` through the same access
path (SQLite: the same WAL file settings and worker thread; PostgreSQL: a pool of the same size,
autocommit).
``ratio`` is how many times slower reserve+commit is than the bare INSERT by throughput.

PostgreSQL: ``--dsn``, else DATABASE_URL / SUPABASE_DB_URL from the configuration, else the
local test server; the run uses a throwaway schema. If it is unreachable its rows are skipped.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench import common
from cost_guard import CostGuard
from cost_ledger import LedgerStore, SqliteLedgerStore
from cost_ledger_pg import PostgresLedgerStore
from sqlite_file import SqliteFile, Synchronous, transaction

LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/test"
CALLERS = (1, 32, 256)
BARE_TABLE = """
CREATE TABLE IF NOT EXISTS bench_bare_insert (
    id TEXT PRIMARY KEY, created_at TEXT NOT NULL, month TEXT NOT NULL, action TEXT NOT NULL,
    cost_usd NUMERIC NOT NULL, request_id TEXT NOT NULL, status TEXT NOT NULL
)
"""


async def _measure(
    total: int, callers: int, op: Callable[[int], Awaitable[None]]
) -> dict[str, float]:
    """Run ``total`` ops split over ``callers`` concurrent tasks; ops/s, p50 and p99 in ms."""
    for i in range(min(20, total)):  # warm-up: connections, page cache, plans
        await op(-1 - i)
    samples: list[float] = []
    per_caller = max(1, total // callers)

    async def caller(c: int) -> None:
        for i in range(per_caller):
            start = time.perf_counter()
            await op(c * per_caller + i)
            samples.append(time.perf_counter() - start)

    wall_start = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(callers)))
    wall_s = time.perf_counter() - wall_start
    return {
        "ops": len(samples),
        "ops_per_s": len(samples) / wall_s,
        "p50_ms": common.percentile(samples, 0.5) * 1e3,
        "p99_ms": common.percentile(samples, 0.99) * 1e3,
    }


async def _guarded(store: LedgerStore, total: int, callers: int) -> dict[str, float]:
    # A cap no run can reach: every reservation is accepted, so the cost measured is the
    # reservation itself, never a refusal.
    guard = CostGuard(store, monthly_cap_usd=Decimal(10**9), soft_cap_usd=Decimal(10**9), tz=UTC)
    await guard.open()
    if not guard.healthy:
        raise RuntimeError(f"cost ledger unreachable: {guard._last_error}")
    try:

        async def op(i: int) -> None:
            reservation = await guard.reserve("dm.send", Decimal("0.001"), f"bench-{i}")
            await guard.commit(reservation)

        return await _measure(total, callers, op)
    finally:
        await guard.close()


def _row(
    store: str, callers: int, guarded: dict[str, float], bare: dict[str, float]
) -> dict[str, Any]:
    return {
        "name": f"cost_guard {store} x{callers}",
        "store": store,
        "callers": callers,
        "reserve_commit_per_s": guarded["ops_per_s"],
        "reserve_commit_p50_ms": guarded["p50_ms"],
        "reserve_commit_p99_ms": guarded["p99_ms"],
        "insert_per_s": bare["ops_per_s"],
        "insert_p50_ms": bare["p50_ms"],
        "insert_p99_ms": bare["p99_ms"],
        "ratio": bare["ops_per_s"] / guarded["ops_per_s"],
        "ops": guarded["ops"],
    }


async def _bench_sqlite(folder: Path, total: int) -> list[dict[str, Any]]:
    rows = []
    for callers in CALLERS:
        run_dir = Path(tempfile.mkdtemp(prefix="bench-cost-", dir=folder))
        guarded = await _guarded(SqliteLedgerStore(run_dir / "cost_ledger.sqlite3"), total, callers)
        bare_file = SqliteFile(run_dir / "bare.sqlite3", synchronous=Synchronous.FULL, name="bare")
        await bare_file.open(BARE_TABLE)

        async def insert(i: int, bare_file: SqliteFile = bare_file) -> None:
            row = (uuid.uuid4().hex, "2026-01-01T00:00:00Z", "2026-01", "dm.send", "0.001", f"b{i}")

            def work(conn: sqlite3.Connection) -> None:
                conn.execute(
                    "INSERT INTO bench_bare_insert VALUES (?, ?, ?, ?, ?, ?, 'committed')", row
                )

            await bare_file.run(lambda conn: transaction(conn, work))

        try:
            bare = await _measure(total, callers, insert)
        finally:
            await bare_file.close()
        rows.append(_row("sqlite", callers, guarded, bare))
    return rows


async def _bench_postgres(dsn: str, total: int) -> list[dict[str, Any]]:
    import psycopg
    from psycopg_pool import AsyncConnectionPool

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=3) as c:
        await c.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in dsn else "?"
    scoped = f"{dsn}{sep}options=-csearch_path%3D{schema}"
    rows = []
    try:
        for callers in CALLERS:
            guarded = await _guarded(PostgresLedgerStore(scoped), total, callers)
            # The same pool shape as PostgresLedgerStore: 10 connections, autocommit, unprepared.
            pool = AsyncConnectionPool(
                scoped,
                min_size=1,
                max_size=10,
                open=False,
                kwargs={"autocommit": True, "prepare_threshold": None},
            )
            await pool.open(wait=True, timeout=10)

            async def insert(i: int, pool: AsyncConnectionPool[Any] = pool) -> None:
                async with pool.connection() as conn:
                    await conn.execute(
                        "INSERT INTO bench_bare_insert VALUES "
                        "(%s, now()::text, '2026-01', 'dm.send', 0.001, %s, 'committed')",
                        (uuid.uuid4().hex, f"b{i}"),
                    )

            try:
                async with pool.connection() as conn:
                    await conn.execute(BARE_TABLE)
                bare = await _measure(total, callers, insert)
            finally:
                await pool.close()
            rows.append(_row("postgres", callers, guarded, bare))
    finally:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
            await c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return rows


def _default_dsn() -> str:
    from config.hybrid_config import HybridConfig
    from errors import ConfigError

    try:
        return HybridConfig.load(env_file=None).postgres_dsn or LOCAL_DSN
    except ConfigError:
        return LOCAL_DSN


async def _bench(quick: bool, folder: Path, dsn: str | None) -> list[dict[str, Any]]:
    total = 320 if quick else 3200
    rows = await _bench_sqlite(folder, total)
    try:
        rows += await _bench_postgres(dsn or _default_dsn(), total)
    except Exception as exc:  # no PostgreSQL here: report it, keep the SQLite rows
        rows.append({"name": "cost_guard postgres", "skipped": f"{type(exc).__name__}: {exc}"})
    return rows


def run(quick: bool = False, *, folder: Path | None = None, dsn: str | None = None) -> list[dict]:
    """Run the benchmark and return one row per store and caller count."""
    with tempfile.TemporaryDirectory(prefix="bench-cost-guard-", dir=folder) as tmp:
        return asyncio.run(_bench(quick, Path(tmp), dsn))


def markdown(rows: list[dict[str, Any]]) -> str:
    """Render rows as a markdown table."""
    cells = []
    for r in rows:
        if "skipped" in r:
            cells.append([r["name"], f"skipped: {r['skipped']}", *[""] * 7])
            continue
        cells.append(
            [
                r["store"], r["callers"], f"{r['reserve_commit_per_s']:,.0f}",
                f"{r['reserve_commit_p50_ms']:.2f}", f"{r['reserve_commit_p99_ms']:.2f}",
                f"{r['insert_per_s']:,.0f}", f"{r['insert_p50_ms']:.2f}",
                f"{r['insert_p99_ms']:.2f}", f"{r['ratio']:.1f}x",
            ]
        )  # fmt: skip
    return common.table(
        ["store", "callers", "reserve+commit /s", "p50 ms", "p99 ms", "bare INSERT /s", "p50 ms",
         "p99 ms", "ratio"],
        cells,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__)  # --quick: 10x fewer operations
    parser.add_argument("--dir", type=Path, default=Path("data"), help="where the SQLite files go")
    parser.add_argument("--dsn", default=None, help="PostgreSQL DSN (default: see module doc)")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    print(markdown(run(args.quick, folder=args.dir, dsn=args.dsn)))


if __name__ == "__main__":
    main()
