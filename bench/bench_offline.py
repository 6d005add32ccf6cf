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

import asyncio
import sqlite3
import statistics
from pathlib import Path
from typing import Any

from bench import common
from offline_cache import OfflineCache
from outbox import Outbox
from service_registry import ServiceRegistry

PARAMS = {"keyword": "hybrid orchestrator", "limit": 20, "platforms": ["x", "linkedin"]}
RESPONSE = {"results": [{"rank": i, "title": f"result {i}", "score": i / 20} for i in range(20)]}


async def _noop(params: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True}


def _row(name: str, samples: list[float], baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    mean_s = statistics.fmean(samples)
    row = {
        "name": name,
        "n": len(samples),
        "mean_us": mean_s * 1e6,
        "p50_us": common.percentile(samples, 0.5) * 1e6,
        "p99_us": common.percentile(samples, 0.99) * 1e6,
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
        await common.time_calls(reads, lambda i: registry.dispatch("bench.noop", PARAMS)),
    )

    cache = OfflineCache(folder / "cache.sqlite3")
    await cache.open()
    try:
        await cache.put("research.keyword", PARAMS, RESPONSE)
        cached = _row(
            "offline read: OfflineCache.get (fresh hit)",
            await common.time_calls(reads, lambda i: cache.get("research.keyword", PARAMS)),
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

        bare = _row(
            "bare sqlite INSERT+COMMIT (WAL, synchronous=FULL)",
            common.time_sync_calls(writes, insert),
        )
    finally:
        conn.close()

    outbox = Outbox(folder / "outbox.sqlite3")
    await outbox.open()
    try:
        enqueued = _row(
            "Outbox.enqueue (fsync'd, acknowledged)",
            await common.time_calls(
                writes, lambda i: outbox.enqueue("dm.send", {**PARAMS, "n": i}, f"bench-{i}")
            ),
            bare,
        )
    finally:
        await outbox.close()
    return [local, cached, bare, enqueued]


def run(quick: bool = False, *, directory: Path | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; return one dict per measured path (times in microseconds)."""
    with common.temp_folder("bench-offline-", directory) as folder:
        return asyncio.run(_bench(folder, quick))


def markdown(rows: list[dict[str, Any]]) -> str:
    """Render rows as a markdown table."""
    return common.table(
        ["path", "n", "mean µs", "p50 µs", "p99 µs", "per second", "vs baseline"],
        [
            [
                row["name"], row["n"], f"{row['mean_us']:.1f}", f"{row['p50_us']:.1f}",
                f"{row['p99_us']:.1f}", f"{row['per_s']:,.0f}",
                "baseline" if row["vs_baseline"] is None else f"{row['vs_baseline']:.2f}",
            ]
            for row in rows
        ],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--dir", type=Path, default=None, help="folder for the files (./data)")
    args = parser.parse_args(argv)
    print(markdown(run(args.quick, directory=args.dir)))


if __name__ == "__main__":
    main()
