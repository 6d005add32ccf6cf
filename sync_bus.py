"""SyncBus: publish/subscribe between instances, on Redis Streams with a SQLite fallback.

A small facade over two backends (``bus_subscription.MessageBackend``): Redis Streams in
``bus_redis`` when ``REDIS_URL`` is set, and the SQLite queue in ``bus_store``, used when Redis
is not configured and as the fallback while it is unreachable. This module decides which one
serves publishes and subscriptions, and switches between them.

While Redis is configured but down, this process's subscribers get this process's messages
from SQLite; when Redis answers again the backlog is forwarded in id order, each entry marked
with the groups that already handled it here (they acknowledge it without running the handler),
and the rows are marked consumed. Only then do publishes go to Redis again, so order is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sqlite3
import time
import uuid
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bus_store
from bus_redis import DEAD_SUFFIX, STREAM_PREFIX, RedisStreamsBackend, stream_key
from bus_store import SqliteQueue
from bus_subscription import Handler, Subscription, check_name, short
from config.hybrid_config import redact_url
from redis_client import RedisRef, raise_if_cancelling, redis_down, response_error
from sqlite_file import utc_iso

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from config.hybrid_config import HybridConfig

log = logging.getLogger(__name__)

__all__ = ["DEAD_SUFFIX", "STREAM_PREFIX", "BusBackend", "Handler", "SyncBus", "stream_key"]

_FORWARD_BATCH = 200


class BusBackend(StrEnum):
    """Where publishes go right now."""

    REDIS = "redis"
    SQLITE = "sqlite"


class SyncBus:
    """Publish/subscribe on Redis Streams, falling back to a SQLite queue while Redis is away.

    ``consumer_name`` must be unique among live instances (the default of ``from_config`` is
    ``host:port``); a restarted instance with the same name resumes its own unacknowledged
    messages at once.
    """

    def __init__(
        self,
        *,
        redis_url: str | None,
        sqlite_path: Path,
        consumer_name: str,
        poll_interval_s: float = 5.0,
        max_deliveries: int = 5,
        stream_maxlen: int = 10_000,
        retry_delay_s: float = 1.0,
        claim_idle_s: float = 60.0,
        socket_timeout_s: float = 2.0,
        block_s: float = 1.0,
        redis: aioredis.Redis | None = None,
    ) -> None:
        """``redis`` is the process's shared client (borrowed, never closed here); without
        it, ``start()`` opens one of ``redis_url``."""
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        self.redis_url = redis_url or None
        self.sqlite_path = Path(sqlite_path)
        self.consumer_name = consumer_name
        self.poll_interval_s = poll_interval_s
        self.max_deliveries = max_deliveries
        self.stream_maxlen = stream_maxlen
        self.retry_delay_s = retry_delay_s
        self.claim_idle_s = claim_idle_s
        self.socket_timeout_s = socket_timeout_s
        self.block_s = block_s
        self._sqlite = SqliteQueue(
            self.sqlite_path,
            consumer_name=consumer_name,
            max_deliveries=max_deliveries,
            poll_interval_s=poll_interval_s,
            paused=lambda: self._redis_up,
        )
        self._sql = self._sqlite.sql
        self._redis_ref = RedisRef(
            redis_url, redis, socket_timeout_s=socket_timeout_s, block_s=block_s
        )
        self._streams: RedisStreamsBackend | None = None
        self._redis_up = False
        self._backlog = False
        self._subs: dict[tuple[str, str], Subscription] = {}
        self._publish_lock = asyncio.Lock()
        self._recovery: asyncio.Task[None] | None = None
        self._housekeeper: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False
        self._published = 0
        self._redis_errors = 0
        self._switches = 0
        self._last_switch_at: float | None = None
        self._last_error: str | None = None

    @classmethod
    def from_config(
        cls,
        config: HybridConfig,
        *,
        consumer_name: str | None = None,
        redis: aioredis.Redis | None = None,
    ) -> SyncBus:
        """Build the bus of one instance: SQLite at ``DATA_DIR/bus.sqlite3``, ``redis`` shared."""
        return cls(
            redis_url=config.redis_url,
            redis=redis,
            sqlite_path=config.data_dir / "bus.sqlite3",
            consumer_name=consumer_name or f"{socket.gethostname()}:{config.port}",
            poll_interval_s=config.bus_poll_interval_sec,
        )

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """``"redis"`` while publishes go to Redis, else ``"sqlite"``."""
        ok = self._redis_up and not self._backlog
        return (BusBackend.REDIS if ok else BusBackend.SQLITE).value

    async def start(self) -> None:
        """Open SQLite, try Redis (unreachable is not an error), start the consumers."""
        if self._started:
            return
        self._started = True
        await self._sqlite.open()
        for sub in self._subs.values():
            await self._sql(bus_store.ensure_cursor, sub.topic, sub.group, sub.durable)
        if self._redis_ref.configured:
            self._backlog = await self._sql(bus_store.count_backlog) > 0
            client = self._redis_ref.open()
            assert client is not None
            self._streams = RedisStreamsBackend(
                client,
                consumer_name=self.consumer_name,
                max_deliveries=self.max_deliveries,
                stream_maxlen=self.stream_maxlen,
                retry_delay_s=self.retry_delay_s,
                claim_idle_s=self.claim_idle_s,
                block_s=self.block_s,
            )
            try:
                await self._switch_to_redis(initial=True)
            except redis_down() as exc:
                self._redis_failed(exc)
        self._housekeeper = asyncio.create_task(self._housekeep_loop(), name="sync-bus-housekeep")
        for sub in self._subs.values():
            self._spawn(sub)

    async def close(self) -> None:
        """Stop the consumers and close Redis and SQLite; safe to call twice."""
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        tasks = [t for t in (self._recovery, self._housekeeper) if t is not None]
        tasks += [sub.task for sub in self._subs.values() if sub.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sub in self._subs.values():
            if sub.durable:
                continue
            if self._streams is not None and self._redis_up:
                with contextlib.suppress(*redis_down(), response_error()):
                    await self._streams.destroy_group(sub)
            await self._sql(bus_store.drop_cursor, sub.topic, sub.group)
        await self._sql(bus_store.release_leases, self.consumer_name)
        await self._redis_ref.close()
        await self._sqlite.close()

    # -- publish / subscribe --------------------------------------------------------------------

    async def publish(self, topic: str, payload: dict[str, Any]) -> str:
        """Publish ``payload`` on ``topic``; durable in Redis or SQLite when this returns."""
        if not self._started or self._closed:
            raise RuntimeError("SyncBus.publish() needs a started, open bus")
        check_name("topic", topic)
        if not isinstance(payload, dict):
            raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
        data = json.dumps(payload, separators=(",", ":"))
        if self._streams is not None and self._redis_up and not self._backlog:
            try:
                entry_id = await self._streams.publish(topic, data)
                self._published += 1
                return entry_id
            except redis_down() as exc:
                self._redis_failed(exc)
        async with self._publish_lock:  # the forwarder's final "backlog empty" check waits here
            entry_id = await self._sqlite.publish(topic, data)
            if self._redis_ref.configured:
                self._backlog = True
        self._published += 1
        for sub in self._subs.values():
            if sub.topic == topic:
                sub.wake.set()
        return entry_id

    def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> None:
        """Call ``handler(payload)`` for every message on ``topic`` published from now on.

        ``group`` is a durable subscriber identity (a consumer group): instances sharing it
        split the messages, and a restarted one resumes what it had not acknowledged. Without
        a group the subscription lives as long as this bus object. Subscribe before
        ``start()`` to be sure of the messages published right after it.
        """
        check_name("topic", topic)
        durable = group is not None
        if group is None:
            group = f"~{self.consumer_name}:{uuid.uuid4().hex[:8]}"
        check_name("group", group)
        if (topic, group) in self._subs:
            raise ValueError(f"topic {topic!r} already has a handler for group {group!r}")
        sub = Subscription(topic, group, durable, handler, stream_key(topic), self.max_deliveries)
        self._subs[(topic, group)] = sub
        if self._started and not self._closed:
            self._spawn(sub, new=True)

    # -- status ---------------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """Backend, queue depths, parked messages and failures, for /health and /status."""
        store: dict[str, Any] = {"backlog": 0, "parked": 0, "recent_parked": []}
        if self._started and not self._closed:
            store = await self._sql(bus_store.stats)
        subs = []
        dead_by_stream: dict[str, int] = {}
        for sub in self._subs.values():
            info = sub.view()
            if self._streams is not None and self._redis_up and not self._closed:
                with contextlib.suppress(*redis_down(), response_error()):
                    info.update(await self._streams.group_info(sub))
                    dead_by_stream[sub.stream] = info["dead"]
            subs.append(info)
        return {
            "backend": self.backend,
            "redis_configured": self._redis_ref.configured,
            "redis_url": redact_url(self.redis_url),
            "redis_connected": self._redis_up,
            "forwarding": self._redis_up and self._backlog,
            "consumer_name": self.consumer_name,
            "sqlite_path": str(self.sqlite_path),
            "backlog": store["backlog"],
            "published": self._published,
            "delivered": sum(s.delivered for s in self._subs.values()),
            "failures": sum(s.failures for s in self._subs.values()),
            "parked": store["parked"] + sum(dead_by_stream.values()),
            "recent_parked": store["recent_parked"],
            "redis_errors": self._redis_errors,
            "switches": self._switches,
            "last_switch_at": utc_iso(self._last_switch_at) if self._last_switch_at else None,
            "last_error": self._last_error,
            "subscriptions": subs,
        }

    # -- internals: plumbing --------------------------------------------------------------------

    def _spawn(self, sub: Subscription, *, new: bool = False) -> None:
        sub.task = asyncio.create_task(self._consume(sub, new), name=f"sync-bus:{sub.topic}")

    def _redis_failed(self, exc: BaseException) -> None:
        self._redis_errors += 1
        self._last_error = short(exc)
        if self._redis_up:
            self._redis_up = False
            self._switches += 1
            self._last_switch_at = time.time()
            log.warning(
                "SyncBus: Redis at %s unreachable (%s); switching to the SQLite fallback",
                redact_url(self.redis_url),
                self._last_error,
            )
            for sub in self._subs.values():
                sub.group_ready = False
                sub.wake.set()
        current = asyncio.current_task()
        idle = self._recovery is None or self._recovery.done()
        if idle and current is not self._recovery and not self._closed:
            self._recovery = asyncio.create_task(self._recover(), name="sync-bus-recover")

    async def _recover(self) -> None:
        """Probe Redis every poll interval; once it answers, forward the backlog and switch."""
        while True:
            raise_if_cancelling()
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self._switch_to_redis()
                return
            except redis_down() as exc:
                self._redis_failed(exc)
            except response_error() as exc:  # e.g. a wrong password; keep probing, say why
                self._last_error = short(exc)
                log.error("SyncBus: Redis refused the switch back: %s", self._last_error)

    async def _switch_to_redis(self, *, initial: bool = False) -> None:
        assert self._streams is not None
        await self._streams.ping()
        for sub in list(self._subs.values()):
            await self._streams.ensure_group(sub)
        self._redis_up = True
        for sub in list(self._subs.values()):
            sub.first_sweep = True
            sub.wake.set()
            async with sub.step_lock:  # let a SQLite step in progress finish before forwarding
                pass
        forwarded = await self._forward_backlog()
        if not initial:
            self._switches += 1
            self._last_switch_at = time.time()
        log.info(
            "SyncBus: on Redis at %s (forwarded %d message(s) from SQLite)",
            redact_url(self.redis_url),
            forwarded,
        )

    async def _forward_backlog(self) -> int:
        assert self._streams is not None
        forwarded = 0
        while True:
            if not await self._sql(bus_store.take_lease, "forwarder", self.consumer_name, 60.0):
                await asyncio.sleep(self.poll_interval_s)  # another local process is forwarding
                if await self._sql(bus_store.count_backlog) == 0:
                    async with self._publish_lock:
                        self._backlog = await self._sql(bus_store.count_backlog) > 0
                    if not self._backlog:
                        return forwarded
                continue
            rows = await self._sql(bus_store.backlog, _FORWARD_BATCH)
            if not rows:
                async with self._publish_lock:
                    if await self._sql(bus_store.count_backlog) == 0:
                        self._backlog = False
                await self._sql(bus_store.release_leases, self.consumer_name, "forwarder")
                if not self._backlog:
                    return forwarded
                continue
            await self._streams.forward(rows)
            await self._sql(bus_store.mark_consumed, [row.id for row in rows])
            forwarded += len(rows)

    async def _housekeep_loop(self) -> None:
        interval_s = max(self.poll_interval_s, 5.0)
        while True:
            own = [(s.topic, s.group) for s in self._subs.values() if not s.durable]
            try:
                await self._sql(
                    bus_store.housekeep, own, self._redis_ref.configured, self.stream_maxlen
                )
            except sqlite3.Error as exc:
                log.warning("SyncBus: SQLite housekeeping failed: %s", exc)
            await asyncio.sleep(interval_s)

    # -- internals: consuming -------------------------------------------------------------------

    async def _consume(self, sub: Subscription, new: bool) -> None:
        if new:
            await self._sql(bus_store.ensure_cursor, sub.topic, sub.group, sub.durable)
        while True:
            raise_if_cancelling()
            try:
                if self._redis_up and self._streams is not None:
                    await self._streams.step(sub)
                else:
                    await self._sqlite.step(sub)
            except redis_down() as exc:
                self._redis_failed(exc)
            except response_error() as exc:
                if "NOGROUP" not in str(exc):  # Redis restarted empty: make the group again
                    log.exception("SyncBus: Redis refused a command for %s", sub.topic)
                    await asyncio.sleep(self.poll_interval_s)
                sub.group_ready = False
            except (sqlite3.Error, RuntimeError) as exc:
                log.warning("SyncBus: consumer of %s/%s: %s", sub.topic, sub.group, exc)
                await asyncio.sleep(self.poll_interval_s)
