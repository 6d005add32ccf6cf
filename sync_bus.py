"""SyncBus: publish/subscribe between instances on Redis Streams, with a SQLite fallback.

Redis (``REDIS_URL``): one stream per topic (``everreach:bus:<topic>``), one consumer group per
subscriber identity, ``XACK`` after the handler returned. Delivery is at-least-once: a message
whose handler raised stays pending and is claimed again (``XPENDING`` + ``XCLAIM``) after
``retry_delay_s``; a consumer that died holding messages loses them to a live member of its
group after ``claim_idle_s`` (or at once to a restarted process with the same
``consumer_name``). After ``max_deliveries`` deliveries a message is parked in
``<stream>:dead``. Streams are trimmed with ``MAXLEN ~ stream_maxlen``.

SQLite (``hybrid_messages``): used when Redis is not configured, and as the fallback while it
is unreachable. Publishing commits a row; each subscription polls its group's cursor every
``poll_interval_s`` (and is woken at once by publishes of this process). While Redis is
configured but down, this process's subscribers get this process's messages from SQLite; when
Redis answers again the backlog is forwarded in id order, each entry marked with the groups
that already handled it here (they acknowledge it without running the handler), and the rows
are marked consumed. Only then do publishes go to Redis again, so order is kept.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

import bus_store
from config.hybrid_config import redact_url
from redis_client import REDIS_DOWN as _REDIS_DOWN
from redis_client import RedisRef, raise_if_cancelling
from sqlite_file import SqliteFile, Synchronous, utc_iso

if TYPE_CHECKING:
    from config.hybrid_config import HybridConfig

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[None]]
T = TypeVar("T")

STREAM_PREFIX = "everreach:bus:"
DEAD_SUFFIX = ":dead"
_READ_COUNT = 100
_FORWARD_BATCH = 200


class BusBackend(StrEnum):
    """Where publishes go right now."""

    REDIS = "redis"
    SQLITE = "sqlite"


def stream_key(topic: str) -> str:
    """Return the Redis stream that carries ``topic``."""
    return f"{STREAM_PREFIX}{topic}"


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


# -- the bus -------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Subscription:
    topic: str
    group: str
    durable: bool
    handler: Handler
    stream: str
    step_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    group_ready: bool = False
    first_sweep: bool = True
    retry_pending: bool = False
    last_sweep: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)
    delivered: int = 0
    failures: int = 0
    parked: int = 0


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
        self._lease_s = max(30.0, 3 * poll_interval_s)
        # FULL: a publish that returned survives a power cut too, not only a killed process.
        self._db = SqliteFile(self.sqlite_path, synchronous=Synchronous.FULL, name="sync-bus")
        self._redis_ref = RedisRef(
            redis_url, redis, socket_timeout_s=socket_timeout_s, block_s=block_s
        )
        self._redis: aioredis.Redis | None = None
        self._redis_up = False
        self._backlog = False
        self._subs: dict[tuple[str, str], _Subscription] = {}
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
        await self._db.open(bus_store.SCHEMA)
        for sub in self._subs.values():
            await self._sql(bus_store.ensure_cursor, sub.topic, sub.group, sub.durable)
        if self._redis_ref.configured:
            self._backlog = await self._sql(bus_store.count_backlog) > 0
            self._redis = self._redis_ref.open()
            try:
                await self._switch_to_redis(initial=True)
            except _REDIS_DOWN as exc:
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
            if self._redis is not None and self._redis_up:
                with contextlib.suppress(*_REDIS_DOWN, ResponseError):
                    await self._redis.xgroup_destroy(sub.stream, sub.group)
            await self._sql(bus_store.drop_cursor, sub.topic, sub.group)
        await self._sql(bus_store.release_leases, self.consumer_name)
        await self._redis_ref.close()
        await self._db.close()

    # -- publish / subscribe --------------------------------------------------------------------

    async def publish(self, topic: str, payload: dict[str, Any]) -> str:
        """Publish ``payload`` on ``topic``; durable in Redis or SQLite when this returns."""
        if not self._started or self._closed:
            raise RuntimeError("SyncBus.publish() needs a started, open bus")
        _check_name("topic", topic)
        if not isinstance(payload, dict):
            raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
        data = json.dumps(payload, separators=(",", ":"))
        if self._redis is not None and self._redis_up and not self._backlog:
            try:
                entry_id = await self._redis.xadd(
                    stream_key(topic),
                    {"payload": data, "origin": self.consumer_name},
                    maxlen=self.stream_maxlen,
                    approximate=True,
                )
                self._published += 1
                return str(entry_id)
            except _REDIS_DOWN as exc:
                self._redis_failed(exc)
        async with self._publish_lock:  # the forwarder's final "backlog empty" check waits here
            row_id = await self._sql(bus_store.insert, topic, data)
            if self._redis_ref.configured:
                self._backlog = True
        self._published += 1
        for sub in self._subs.values():
            if sub.topic == topic:
                sub.wake.set()
        return f"sqlite:{row_id}"

    def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> None:
        """Call ``handler(payload)`` for every message on ``topic`` published from now on.

        ``group`` is a durable subscriber identity (a consumer group): instances sharing it
        split the messages, and a restarted one resumes what it had not acknowledged. Without
        a group the subscription lives as long as this bus object. Subscribe before
        ``start()`` to be sure of the messages published right after it.
        """
        _check_name("topic", topic)
        durable = group is not None
        if group is None:
            group = f"~{self.consumer_name}:{uuid.uuid4().hex[:8]}"
        _check_name("group", group)
        if (topic, group) in self._subs:
            raise ValueError(f"topic {topic!r} already has a handler for group {group!r}")
        sub = _Subscription(topic, group, durable, handler, stream_key(topic))
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
            info: dict[str, Any] = {
                "topic": sub.topic,
                "group": sub.group,
                "durable": sub.durable,
                "delivered": sub.delivered,
                "failures": sub.failures,
                "parked": sub.parked,
            }
            if self._redis is not None and self._redis_up and not self._closed:
                with contextlib.suppress(*_REDIS_DOWN, ResponseError):
                    for grp in await self._redis.xinfo_groups(sub.stream):
                        if grp["name"] == sub.group:
                            info["pending"] = grp["pending"]
                            info["lag"] = grp.get("lag")
                    info["dead"] = await self._redis.xlen(sub.stream + DEAD_SUFFIX)
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

    async def _sql(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``bus_store.fn(connection, *args)`` on the database thread."""
        return await self._db.run(lambda conn: fn(conn, *args))

    def _spawn(self, sub: _Subscription, *, new: bool = False) -> None:
        sub.task = asyncio.create_task(self._consume(sub, new), name=f"sync-bus:{sub.topic}")

    def _redis_failed(self, exc: BaseException) -> None:
        self._redis_errors += 1
        self._last_error = _short(exc)
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
            except _REDIS_DOWN as exc:
                self._redis_failed(exc)
            except ResponseError as exc:  # e.g. a wrong password; keep probing, say why
                self._last_error = _short(exc)
                log.error("SyncBus: Redis refused the switch back: %s", self._last_error)

    async def _switch_to_redis(self, *, initial: bool = False) -> None:
        assert self._redis is not None
        await self._redis.ping()
        for sub in list(self._subs.values()):
            await self._ensure_group(sub)
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

    async def _ensure_group(self, sub: _Subscription) -> None:
        assert self._redis is not None
        try:
            await self._redis.xgroup_create(sub.stream, sub.group, id="$", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        sub.group_ready = True

    async def _forward_backlog(self) -> int:
        assert self._redis is not None
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
            pipe = self._redis.pipeline(transaction=False)
            for row in rows:
                fields: dict[Any, Any] = {"payload": row.payload_json, "origin": self.consumer_name}
                if row.handled:
                    fields["handled"] = json.dumps(row.handled)
                if row.attempts:
                    fields["attempts"] = json.dumps(row.attempts)
                pipe.xadd(
                    stream_key(row.topic), fields, maxlen=self.stream_maxlen, approximate=True
                )
            await pipe.execute()
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

    async def _consume(self, sub: _Subscription, new: bool) -> None:
        if new:
            await self._sql(bus_store.ensure_cursor, sub.topic, sub.group, sub.durable)
        while True:
            raise_if_cancelling()
            try:
                if self._redis_up and self._redis is not None:
                    await self._redis_step(sub)
                else:
                    await self._sqlite_step(sub)
            except _REDIS_DOWN as exc:
                self._redis_failed(exc)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):  # Redis restarted empty: make the group again
                    log.exception("SyncBus: Redis refused a command for %s", sub.topic)
                    await asyncio.sleep(self.poll_interval_s)
                sub.group_ready = False
            except (sqlite3.Error, RuntimeError) as exc:
                log.warning("SyncBus: consumer of %s/%s: %s", sub.topic, sub.group, exc)
                await asyncio.sleep(self.poll_interval_s)

    async def _redis_step(self, sub: _Subscription) -> None:
        assert self._redis is not None
        if not sub.group_ready:
            await self._ensure_group(sub)
        now = time.monotonic()
        if sub.first_sweep or now - sub.last_sweep >= self.retry_delay_s:
            await self._sweep(sub, own_idle_ms=0 if sub.first_sweep else None)
            sub.first_sweep = False
            sub.last_sweep = time.monotonic()
        block_s = min(self.block_s, self.retry_delay_s) if sub.retry_pending else self.block_s
        reply: Any = await self._redis.xreadgroup(
            sub.group,
            self.consumer_name,
            {sub.stream: ">"},
            count=_READ_COUNT,
            block=max(1, int(block_s * 1000)),
        )
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                await self._deliver_redis(sub, entry_id, fields, delivered_before=0)

    async def _sweep(self, sub: _Subscription, *, own_idle_ms: int | None) -> None:
        """Claim pending messages due again: ours after a failure, a dead consumer's after idle."""
        assert self._redis is not None
        own_ms = int(self.retry_delay_s * 1000) if own_idle_ms is None else own_idle_ms
        other_ms = int(self.claim_idle_s * 1000)
        pending: Any = await self._redis.xpending_range(
            sub.stream, sub.group, "-", "+", _READ_COUNT
        )
        sub.retry_pending = False
        for entry in pending:
            mine = entry["consumer"] == self.consumer_name
            min_idle = own_ms if mine else other_ms
            if entry["time_since_delivered"] < min_idle:
                sub.retry_pending = sub.retry_pending or mine
                continue
            claimed: Any = await self._redis.xclaim(
                sub.stream, sub.group, self.consumer_name, min_idle, [entry["message_id"]]
            )
            for entry_id, fields in claimed:
                if fields is None:
                    continue
                await self._deliver_redis(
                    sub, entry_id, fields, delivered_before=int(entry["times_delivered"])
                )

    async def _deliver_redis(
        self, sub: _Subscription, entry_id: str, fields: dict[str, str], *, delivered_before: int
    ) -> None:
        assert self._redis is not None
        if sub.group in json.loads(fields.get("handled", "[]")):
            await self._redis.xack(sub.stream, sub.group, entry_id)  # handled here during outage
            return
        prior = int(json.loads(fields.get("attempts", "{}")).get(sub.group, 0))
        attempt = delivered_before + 1 + prior
        try:
            payload = json.loads(fields["payload"])
            if not isinstance(payload, dict):
                raise TypeError("payload is not a JSON object")
        except (KeyError, TypeError, ValueError) as exc:
            await self._park_redis(sub, entry_id, fields, attempt, f"undecodable: {_short(exc)}")
            return
        if attempt > self.max_deliveries:
            error = sub.errors.pop(entry_id, "handler failed (or its process died) earlier")
            await self._park_redis(sub, entry_id, fields, attempt - 1, error)
            return
        try:
            await sub.handler(payload)
        except Exception as exc:
            self._handler_failed(sub, str(entry_id), attempt, exc)
            if attempt >= self.max_deliveries:
                await self._park_redis(sub, entry_id, fields, attempt, sub.errors.pop(entry_id))
            else:
                sub.retry_pending = True
            return
        sub.errors.pop(entry_id, None)
        sub.delivered += 1
        await self._redis.xack(sub.stream, sub.group, entry_id)

    def _handler_failed(self, sub: _Subscription, key: str, attempt: int, exc: Exception) -> None:
        sub.failures += 1
        sub.errors[key] = _short(exc)
        log.warning(
            "SyncBus: handler for %s (group %s) failed on message %s, attempt %d/%d: %s",
            sub.topic,
            sub.group,
            key,
            attempt,
            self.max_deliveries,
            sub.errors[key],
        )

    async def _park_redis(
        self, sub: _Subscription, entry_id: str, fields: dict[str, str], attempts: int, error: str
    ) -> None:
        assert self._redis is not None
        pipe = self._redis.pipeline(transaction=True)
        pipe.xadd(
            sub.stream + DEAD_SUFFIX,
            {
                "payload": fields.get("payload", ""),
                "topic": sub.topic,
                "group": sub.group,
                "original_id": entry_id,
                "attempts": str(attempts),
                "error": error,
                "parked_at": datetime.now(UTC).isoformat(),
            },
            maxlen=self.stream_maxlen,
            approximate=True,
        )
        pipe.xack(sub.stream, sub.group, entry_id)
        await pipe.execute()
        sub.parked += 1
        log.error(
            "SyncBus: parked message %s of %s (group %s) after %d attempt(s): %s",
            entry_id,
            sub.topic,
            sub.group,
            attempts,
            error,
        )

    async def _sqlite_step(self, sub: _Subscription) -> None:
        progressed = False
        sub.wake.clear()  # before reading: a publish during this step wakes the next wait
        async with sub.step_lock:
            if self._redis_up:
                return
            rows = await self._sql(
                bus_store.next_for_group,
                sub.topic,
                sub.group,
                sub.durable,
                self.consumer_name,
                self._lease_s,
                _READ_COUNT,
            )
            for message_id, payload_json in rows or []:
                if self._redis_up:
                    return  # the forwarder takes the rest to Redis
                if not await self._deliver_sqlite(sub, message_id, payload_json):
                    break
                progressed = True
        if progressed and rows is not None and len(rows) == _READ_COUNT:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sub.wake.wait(), timeout=self.poll_interval_s)

    async def _deliver_sqlite(self, sub: _Subscription, message_id: int, payload_json: str) -> bool:
        """Deliver one row; False stops the batch (a failure is retried at the next poll)."""
        attempt = await self._sql(bus_store.begin_attempt, sub.group, message_id)
        key = f"sqlite:{message_id}"
        if attempt > self.max_deliveries:
            error = sub.errors.pop(key, "handler failed (or its process died) earlier")
            await self._park_sqlite(sub, message_id, payload_json, attempt - 1, error)
            return True
        try:
            payload = json.loads(payload_json)
            await sub.handler(payload)
        except Exception as exc:
            self._handler_failed(sub, key, attempt, exc)
            await self._sql(bus_store.record_failure, sub.group, message_id, sub.errors[key])
            if attempt >= self.max_deliveries:
                await self._park_sqlite(sub, message_id, payload_json, attempt, sub.errors.pop(key))
                return True
            return False
        sub.errors.pop(key, None)
        sub.delivered += 1
        await self._sql(bus_store.ack, sub.topic, sub.group, message_id)
        return True

    async def _park_sqlite(
        self, sub: _Subscription, message_id: int, payload_json: str, attempts: int, error: str
    ) -> None:
        await self._sql(
            bus_store.park, sub.topic, sub.group, message_id, payload_json, attempts, error
        )
        sub.parked += 1
        log.error(
            "SyncBus: parked SQLite message %d of %s (group %s) after %d attempt(s): %s",
            message_id,
            sub.topic,
            sub.group,
            attempts,
            error,
        )


def _check_name(kind: str, value: object) -> None:
    if (
        not isinstance(value, str)
        or not value
        or len(value) > 200
        or any(ch.isspace() for ch in value)
    ):
        raise ValueError(f"{kind} must be a non-empty string without spaces, got {value!r}")
