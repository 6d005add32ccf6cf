"""Benchmark the Pacer: one acquire on SQLite and Redis against a bare INSERT / INCR.

    python -m bench.bench_pacing [--quick] [--dir PATH] [--redis REDIS_URL]

Each row times ``Pacer.acquire()`` one call after another on a realistic limit (20 runs per
second, a clock moved 60 ms per call so every call is allowed and books its slot), and in the
same run, through the same access path, the cheapest write the store can do: SQLite a one-row
``INSERT`` in ``BEGIN IMMEDIATE`` on a file with the same settings and worker thread; Redis an
``INCR`` on the same kind of client, in alternating blocks (A/B/A/B…, 3 rounds quick, 5 full).
``ratio`` is how many times the bare write's time the Pacer costs (p50 against p50 in each
round), as the median (min..max) over rounds.

Redis: ``--redis``, else REDIS_URL from the configuration, else the local server's db 15; keys
go under a throwaway prefix that is deleted afterwards. If it is unreachable its row is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import common
from pacing import Pacer, PaceStore
from pacing_stores import RedisPaceStore, SqlitePaceStore
from rate_limits import RateLimits
from sqlite_file import SqliteFile, Synchronous, transaction

LOCAL_REDIS = "redis://127.0.0.1:6379/15"
LIMITS = {"dm.send": {"max": 20, "per_sec": 1}}
STEP = timedelta(milliseconds=60)  # > 1 s / 20: every acquire is allowed
BARE_TABLE = "CREATE TABLE IF NOT EXISTS bench_bare (id TEXT PRIMARY KEY, at_s REAL NOT NULL)"


@contextlib.asynccontextmanager
async def _pacer_call(store: PaceStore) -> AsyncIterator[Callable[[int], Awaitable[None]]]:
    """One ``Pacer.acquire()`` call on ``store``, every call allowed (the clock moves 60 ms)."""
    now = [datetime(2026, 1, 1, tzinfo=UTC)]

    def clock() -> datetime:
        now[0] += STEP
        return now[0]

    pacer = Pacer(RateLimits.from_dict(LIMITS), store, clock=clock)
    await store.open()
    try:

        async def call(_: int) -> None:
            if not (await pacer.acquire("dm.send")).allowed:
                raise RuntimeError("the bench limit refused a call; its clock step is wrong")

        yield call
    finally:
        await pacer.aclose()


async def _alternate(
    n: int,
    rounds: int,
    paced: Callable[[int], Awaitable[Any]],
    bare: Callable[[int], Awaitable[Any]],
) -> tuple[list[list[float]], list[list[float]]]:
    """Time ``n`` calls of each in ``rounds`` alternating blocks (A/B/A/B…), per round."""
    paced_s: list[list[float]] = []
    bare_s: list[list[float]] = []
    for index in range(rounds):
        warmup = 50 if index == 0 else 0
        paced_s.append(await common.time_calls(n // rounds, paced, warmup=warmup))
        bare_s.append(await common.time_calls(n // rounds, bare, warmup=warmup))
    return paced_s, bare_s


async def _sqlite(folder: Path, n: int, rounds: int) -> dict[str, Any]:
    bare_file = SqliteFile(folder / "bare.sqlite3", synchronous=Synchronous.NORMAL, name="bare")
    await bare_file.open(BARE_TABLE)

    async def insert(i: int) -> None:
        row = (uuid.uuid4().hex, float(i))

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO bench_bare VALUES (?, ?)", row)

        await bare_file.run(lambda conn: transaction(conn, work))

    try:
        async with _pacer_call(SqlitePaceStore(folder / "pacing.sqlite3")) as acquire:
            paced, bare = await _alternate(n, rounds, acquire, insert)
    finally:
        await bare_file.close()
    return _row("sqlite", "INSERT", paced, bare)


async def _redis(url: str, n: int, rounds: int) -> dict[str, Any]:
    import redis.asyncio as aioredis

    prefix = f"bench:pace:{uuid.uuid4().hex[:8]}:"
    client = aioredis.Redis.from_url(
        url, socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=True
    )
    try:
        async with _pacer_call(RedisPaceStore(url, prefix=prefix)) as acquire:
            paced, bare = await _alternate(
                n, rounds, acquire, lambda _: client.incr(prefix + "bare")
            )
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
    return _row("redis", "INCR", paced, bare)


def _row(
    store: str, bare_name: str, paced: list[list[float]], bare: list[list[float]]
) -> dict[str, Any]:
    paced_all = [sample for samples in paced for sample in samples]
    bare_all = [sample for samples in bare for sample in samples]
    ratios = [
        common.percentile(p, 0.5) / common.percentile(b, 0.5)
        for p, b in zip(paced, bare, strict=True)
    ]
    return {
        "name": f"pacing {store}",
        "store": store,
        "bare": bare_name,
        "calls": len(paced_all),
        "rounds": len(paced),
        "acquire_p50_us": common.percentile(paced_all, 0.5) * 1e6,
        "acquire_p99_us": common.percentile(paced_all, 0.99) * 1e6,
        "bare_p50_us": common.percentile(bare_all, 0.5) * 1e6,
        "bare_p99_us": common.percentile(bare_all, 0.99) * 1e6,
        **common.summary("ratio", ratios),
    }


def _default_redis() -> str:
    from config.hybrid_config import HybridConfig
    from errors import ConfigError

    try:
        return HybridConfig.load(env_file=None).redis_url or LOCAL_REDIS
    except ConfigError:
        return LOCAL_REDIS


async def _bench(quick: bool, folder: Path, redis_url: str | None) -> list[dict[str, Any]]:
    n, rounds = (300, 3) if quick else (6000, 5)
    rows = [await _sqlite(folder, n, rounds)]
    try:
        rows.append(await _redis(redis_url or _default_redis(), n, rounds))
    except Exception as exc:  # no Redis here: report it, keep the SQLite row
        rows.append({"name": "pacing redis", "skipped": f"{type(exc).__name__}: {exc}"})
    return rows


def run(
    quick: bool = False, *, folder: Path | None = None, redis_url: str | None = None
) -> list[dict]:
    """Run the benchmark and return one row per store."""
    with tempfile.TemporaryDirectory(prefix="bench-pacing-", dir=folder) as tmp:
        return asyncio.run(_bench(quick, Path(tmp), redis_url))


def markdown(rows: list[dict[str, Any]]) -> str:
    """Render rows as a markdown table."""
    cells = []
    for r in rows:
        if "skipped" in r:
            cells.append([r["name"], f"skipped: {r['skipped']}", *[""] * 6])
            continue
        cells.append(
            [
                r["store"], r["calls"], f"{r['acquire_p50_us']:.0f}", f"{r['acquire_p99_us']:.0f}",
                r["bare"], f"{r['bare_p50_us']:.0f}", f"{r['bare_p99_us']:.0f}",
                common.spread(r, "ratio", "{:.1f}x"),
            ]
        )  # fmt: skip
    return common.table(
        [
            "store",
            "calls",
            "acquire p50 µs",
            "p99 µs",
            "bare write",
            "p50 µs",
            "p99 µs",
            "ratio of p50s, median (min..max) over rounds",
        ],
        cells,
    )


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__)  # --quick: fewer calls
    parser.add_argument("--dir", type=Path, default=Path("data"), help="where the SQLite files go")
    parser.add_argument("--redis", default=None, help="Redis URL (default: see module doc)")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    print(markdown(run(args.quick, folder=args.dir, redis_url=args.redis)))


if __name__ == "__main__":
    main()
