"""Benchmark SyncBus publish->handler throughput and latency, against bare redis-py Streams.

    python -m bench.bench_sync_bus [--quick] [--redis-url URL] [--dir PATH]

Prints a markdown table. In each case one task publishes N small messages one after another
(each awaited) while a handler in the same process records how long every message took from
just before ``publish`` to the handler; throughput is N over the time from the first publish
to the last handler call. Cases:

- bare redis-py: ``XADD`` (``MAXLEN ~``) and a ``XREADGROUP COUNT 100 BLOCK`` + ``XACK`` per
  message loop — the baseline, nothing but the protocol;
- ``SyncBus`` on Redis (the same server, same process, in the same run): ratio against bare;
- ``SyncBus`` on the SQLite fallback (no Redis): every publish is a committed, fsync'd row
  (WAL, synchronous=FULL) and the subscriber is woken in-process. A subscriber in another
  process sharing the file sees rows at its next poll (``BUS_POLL_INTERVAL_SEC``, 5 s).

Without ``--redis-url`` a throwaway ``redis-server`` (no persistence) is started on a free
loopback port, so the numbers never touch a shared database; the Redis rows are left out when
there is no redis-server on PATH.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from bench import common
from sync_bus import SyncBus, stream_key

WARMUP = 50
Publish = Callable[[dict[str, Any]], Awaitable[Any]]


class _Sink:
    """A handler that timestamps each message and wakes whoever waits for it."""

    def __init__(self) -> None:
        self.received: dict[int, float] = {}
        self.arrived = asyncio.Event()

    async def __call__(self, payload: dict[str, Any]) -> None:
        self.received[payload["n"]] = time.perf_counter()
        self.arrived.set()

    async def wait_for(self, count: int) -> None:
        while len(self.received) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), timeout=120)


def _percentile_ms(samples_s: list[float], fraction: float) -> float:
    return common.percentile(samples_s, fraction) * 1000


async def _measure(name: str, publish: Publish, sink: _Sink, n: int) -> dict[str, Any]:
    """Idle latency (one message at a time), then throughput and latency of a burst of n."""
    body = "x" * 64
    for i in range(WARMUP):
        await publish({"n": -1 - i, "body": body})
    await sink.wait_for(WARMUP)
    idle: list[float] = []
    for i in range(n // 5):
        sink.received.clear()
        sent = time.perf_counter()
        await publish({"n": i, "body": body})
        await sink.wait_for(1)
        idle.append(sink.received[i] - sent)
    sink.received.clear()
    sent_at: dict[int, float] = {}
    start = time.perf_counter()
    for i in range(n):
        sent_at[i] = time.perf_counter()
        await publish({"n": i, "body": body})
    await sink.wait_for(n)
    burst = [sink.received[i] - sent_at[i] for i in range(n)]
    return {
        "name": name,
        "n": n,
        "per_s": n / (max(sink.received.values()) - start),
        "idle_p50_ms": common.median(idle) * 1000,
        "idle_p99_ms": _percentile_ms(idle, 0.99),
        "load_p50_ms": common.median(burst) * 1000,
        "load_p99_ms": _percentile_ms(burst, 0.99),
        "vs_baseline": None,
    }


async def _bare_redis(url: str, n: int) -> dict[str, Any]:
    client = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=5)
    stream = f"bench:bare:{uuid.uuid4().hex[:8]}"
    await client.xgroup_create(stream, "bench", id="$", mkstream=True)
    sink = _Sink()

    async def consume() -> None:
        while True:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # redis/redis-py#2028, as in SyncBus
                raise asyncio.CancelledError
            reply: Any = await client.xreadgroup(
                "bench", "c1", {stream: ">"}, count=100, block=1000
            )
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    await sink(json.loads(fields["payload"]))
                    await client.xack(stream, "bench", entry_id)

    async def publish(payload: dict[str, Any]) -> None:
        await client.xadd(stream, {"payload": json.dumps(payload)}, maxlen=10_000)

    reader = asyncio.create_task(consume())
    try:
        return await _measure("bare redis-py XADD / XREADGROUP+XACK", publish, sink, n)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await client.delete(stream)
        await client.aclose()


async def _sync_bus(name: str, url: str | None, folder: Path, n: int) -> dict[str, Any]:
    bus = SyncBus(
        redis_url=url,
        sqlite_path=folder / f"bus-{uuid.uuid4().hex[:6]}.sqlite3",
        consumer_name="bench",
    )
    topic = f"bench.{uuid.uuid4().hex[:8]}"
    sink = _Sink()
    bus.subscribe(topic, sink, group="bench")
    await bus.start()
    try:
        return await _measure(name, lambda payload: bus.publish(topic, payload), sink, n)
    finally:
        await bus.close()
        if url is not None:
            redis.Redis.from_url(url).delete(stream_key(topic))


@contextmanager
def _throwaway_redis() -> Iterator[str | None]:
    """A private redis-server on a free loopback port, or None if there is none to start."""
    if shutil.which("redis-server") is None:
        yield None
        return
    port = common.free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port, socket_connect_timeout=0.2)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _bench(redis_url: str | None, folder: Path, quick: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if redis_url is not None:
        n = 500 if quick else 5000
        bare = await _bare_redis(redis_url, n)
        bus = await _sync_bus("SyncBus on Redis (Streams, group, XACK)", redis_url, folder, n)
        bus["vs_baseline"] = bare["per_s"] / bus["per_s"]
        rows += [bare, bus]
    n = 200 if quick else 2000
    rows.append(await _sync_bus("SyncBus on SQLite fallback (fsync'd rows)", None, folder, n))
    return rows


def run(
    quick: bool = False, *, redis_url: str | None = None, directory: Path | None = None
) -> list[dict[str, Any]]:
    """Run the benchmark; one dict per case (latencies in ms, throughput in messages/s)."""
    with common.temp_folder("bench-bus-", directory) as folder:
        if redis_url is not None:
            return asyncio.run(_bench(redis_url, folder, quick))
        with _throwaway_redis() as url:
            return asyncio.run(_bench(url, folder, quick))


def markdown(rows: list[dict[str, Any]]) -> str:
    """Render rows as a markdown table."""

    def ratio(row: dict[str, Any]) -> str:
        if row["name"].startswith("bare"):
            return "baseline"
        return "—" if row["vs_baseline"] is None else f"{row['vs_baseline']:.2f}"

    return common.table(
        ["path", "messages", "msg/s", "idle p50 ms", "idle p99 ms", "burst p50 ms",
         "burst p99 ms", "bare/this msg/s"],
        [
            [
                row["name"], row["n"], f"{row['per_s']:,.0f}", f"{row['idle_p50_ms']:.2f}",
                f"{row['idle_p99_ms']:.2f}", f"{row['load_p50_ms']:.2f}",
                f"{row['load_p99_ms']:.2f}", ratio(row),
            ]
            for row in rows
        ],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--redis-url", default=None, help="use this Redis, not a throwaway one")
    parser.add_argument("--dir", type=Path, default=None, help="folder for SQLite files (./data)")
    args = parser.parse_args(argv)
    print(markdown(run(args.quick, redis_url=args.redis_url, directory=args.dir)))


if __name__ == "__main__":
    main()
