"""Benchmark the offline paths: a read served from the cache, and the outbox's enqueue rate.

    python -m bench.bench_offline [--quick] [--dir PATH]

Prints a markdown table. Each measured path is paired with its baseline:

- ``OfflineCache.get`` (a fresh hit, the ``source: cache`` answer while offline) against a bare
  local no-op handler call through ``ServiceRegistry.dispatch`` (the cheapest ``local`` answer);
- ``Outbox.enqueue`` (committed and fsync'd before it returns: what a 202 waits for) against a
  bare ``INSERT`` + ``COMMIT`` on a WAL file with ``synchronous=FULL`` in the same folder.

The files go to a temporary folder under ``--dir`` (default ``./data``, the default DATA_DIR),
so both write paths hit the same disk the service uses.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from offline_cache import OfflineCache
from outbox import Outbox
from service_registry import ServiceRegistry

PARAMS = {"keyword": "hybrid orchestrator", "limit": 20, "platforms": ["x", "linkedin"]}
RESPONSE = {"results": [{"rank": i, "title": f"result {i}", "score": i / 20} for i in range(20)]}


async def _noop(params: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True}


async def _time_async(n: int, call: Callable[[int], Awaitable[Any]]) -> list[float]:
    for i in range(min(50, n)):  # warm up: thread start, page cache, first compiles
        await call(-1 - i)
    samples = []
    for i in range(n):
        start = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - start)
    return samples


def _time_sync(n: int, call: Callable[[int], Any]) -> list[float]:
    for i in range(min(50, n)):
        call(-1 - i)
    samples = []
    for i in range(n):
        start = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - start)
    return samples


def _row(name: str, samples: list[float], baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    ordered = sorted(samples)
    mean_s = statistics.fmean(samples)
    row = {
        "name": name,
        "n": len(samples),
        "mean_us": mean_s * 1e6,
        "p50_us": ordered[len(ordered) // 2] * 1e6,
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
        "per_s": 1.0 / mean_s,
        "vs_baseline": None,
    }
    if baseline is not None:
        row["vs_baseline"] = row["mean_us"] / baseline["mean_us"]
    return row


async def _bench(folder: Path, quick: bool) -> list[dict[str, Any]]:
    reads = 500 if quick else 5000
    writes = 50 if quick else 500

    registry = ServiceRegistry({"bench.noop": _noop}, builtins=False)
    local = _row(
        "local no-op handler (ServiceRegistry.dispatch)",
        await _time_async(reads, lambda i: registry.dispatch("bench.noop", PARAMS)),
    )

    cache = OfflineCache(folder / "cache.sqlite3")
    await cache.open()
    try:
        await cache.put("research.keyword", PARAMS, RESPONSE)
        cached = _row(
            "offline read: OfflineCache.get (fresh hit)",
            await _time_async(reads, lambda i: cache.get("research.keyword", PARAMS)),
            local,
        )
    finally:
        await cache.close()

    bare_path = folder / "bare.sqlite3"
    conn = sqlite3.connect(bare_path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")

        def insert(i: int) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (body) VALUES (?)", (f'{{"n":{i}}}',))
            conn.execute("COMMIT")

        bare = _row("bare sqlite INSERT+COMMIT (WAL, synchronous=FULL)", _time_sync(writes, insert))
    finally:
        conn.close()

    outbox = Outbox(folder / "outbox.sqlite3")
    await outbox.open()
    try:
        enqueued = _row(
            "Outbox.enqueue (fsync'd, acknowledged)",
            await _time_async(
                writes, lambda i: outbox.enqueue("dm.send", {**PARAMS, "n": i}, f"bench-{i}")
            ),
            bare,
        )
    finally:
        await outbox.close()
    return [local, cached, bare, enqueued]


def run(quick: bool = False, *, directory: Path | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; return one dict per measured path (times in microseconds)."""
    base = Path(directory) if directory is not None else Path("data")
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-offline-", dir=base) as folder:
        return asyncio.run(_bench(Path(folder), quick))


def markdown(rows: list[dict[str, Any]]) -> str:
    """Render rows as a markdown table."""
    lines = [
        "| path | n | mean µs | p50 µs | p99 µs | per second | vs baseline |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = "baseline" if row["vs_baseline"] is None else f"{row['vs_baseline']:.2f}"
        lines.append(
            f"| {row['name']} | {row['n']} | {row['mean_us']:.1f} | {row['p50_us']:.1f} | "
            f"{row['p99_us']:.1f} | {row['per_s']:,.0f} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    parser.add_argument("--dir", type=Path, default=None, help="folder for the files (./data)")
    args = parser.parse_args(argv)
    print(markdown(run(args.quick, directory=args.dir)))


if __name__ == "__main__":
    main()
