"""RedisStreamsBackend: the bus on Redis Streams, at-least-once with consumer groups.

One stream per topic (``everreach:bus:<topic>``), one consumer group per subscriber identity,
``XACK`` after the handler returned. A message whose handler raised stays pending and is claimed
again (``XPENDING`` + ``XCLAIM``) after ``retry_delay_s``; a consumer that died holding messages
loses them to a live member of its group after ``claim_idle_s`` (or at once to a restarted
process with the same consumer name). After ``max_deliveries`` deliveries a message is parked in
``<stream>:dead``. Streams are trimmed with ``MAXLEN ~ stream_maxlen``.

Every Redis failure propagates: the ``SyncBus`` facade decides what "Redis is down" means.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from bus_store import BacklogRow
from bus_subscription import READ_COUNT, Subscription, log, short
from redis_client import response_error

if TYPE_CHECKING:
    import redis.asyncio as aioredis

STREAM_PREFIX = "everreach:bus:"
DEAD_SUFFIX = ":dead"


def stream_key(topic: str) -> str:
    """Return the Redis stream that carries ``topic``."""
    return f"{STREAM_PREFIX}{topic}"


class RedisStreamsBackend:
    """Publish to and consume from Redis Streams through one (shared) client."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        consumer_name: str,
        max_deliveries: int,
        stream_maxlen: int,
        retry_delay_s: float,
        claim_idle_s: float,
        block_s: float,
    ) -> None:
        self._redis = client
        self.consumer_name = consumer_name
        self.max_deliveries = max_deliveries
        self.stream_maxlen = stream_maxlen
        self.retry_delay_s = retry_delay_s
        self.claim_idle_s = claim_idle_s
        self.block_s = block_s

    async def ping(self) -> None:
        await self._redis.ping()

    async def publish(self, topic: str, data: str) -> str:
        entry_id = await self._redis.xadd(
            stream_key(topic),
            {"payload": data, "origin": self.consumer_name},
            maxlen=self.stream_maxlen,
            approximate=True,
        )
        return str(entry_id)

    async def forward(self, rows: Sequence[BacklogRow]) -> None:
        """Append SQLite backlog rows in order, marked with the groups that handled them."""
        pipe = self._redis.pipeline(transaction=False)
        for row in rows:
            fields: dict[Any, Any] = {"payload": row.payload_json, "origin": self.consumer_name}
            if row.handled:
                fields["handled"] = json.dumps(row.handled)
            if row.attempts:
                fields["attempts"] = json.dumps(row.attempts)
            pipe.xadd(stream_key(row.topic), fields, maxlen=self.stream_maxlen, approximate=True)
        await pipe.execute()

    async def destroy_group(self, sub: Subscription) -> None:
        await self._redis.xgroup_destroy(sub.stream, sub.group)

    async def group_info(self, sub: Subscription) -> dict[str, Any]:
        """Pending and lag of ``sub``'s group, and the length of its dead-letter stream."""
        info: dict[str, Any] = {}
        for grp in await self._redis.xinfo_groups(sub.stream):
            if grp["name"] == sub.group:
                info["pending"] = grp["pending"]
                info["lag"] = grp.get("lag")
        info["dead"] = await self._redis.xlen(sub.stream + DEAD_SUFFIX)
        return info

    async def ensure_group(self, sub: Subscription) -> None:
        try:
            await self._redis.xgroup_create(sub.stream, sub.group, id="$", mkstream=True)
        except response_error() as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        sub.group_ready = True

    async def step(self, sub: Subscription) -> None:
        if not sub.group_ready:
            await self.ensure_group(sub)
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
            count=READ_COUNT,
            block=max(1, int(block_s * 1000)),
        )
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                await self._deliver(sub, entry_id, fields, delivered_before=0)

    async def _sweep(self, sub: Subscription, *, own_idle_ms: int | None) -> None:
        """Claim pending messages due again: ours after a failure, a dead consumer's after idle."""
        own_ms = int(self.retry_delay_s * 1000) if own_idle_ms is None else own_idle_ms
        other_ms = int(self.claim_idle_s * 1000)
        pending: Any = await self._redis.xpending_range(sub.stream, sub.group, "-", "+", READ_COUNT)
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
                await self._deliver(
                    sub, entry_id, fields, delivered_before=int(entry["times_delivered"])
                )

    async def _deliver(
        self, sub: Subscription, entry_id: str, fields: dict[str, str], *, delivered_before: int
    ) -> None:
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
            await self._park(sub, entry_id, fields, attempt, f"undecodable: {short(exc)}")
            return
        if attempt > self.max_deliveries:
            error = sub.errors.pop(entry_id, "handler failed (or its process died) earlier")
            await self._park(sub, entry_id, fields, attempt - 1, error)
            return
        try:
            await sub.handler(payload)
        except Exception as exc:
            sub.handler_failed(str(entry_id), attempt, exc)
            if attempt >= self.max_deliveries:
                await self._park(sub, entry_id, fields, attempt, sub.errors.pop(entry_id))
            else:
                sub.retry_pending = True
            return
        sub.errors.pop(entry_id, None)
        sub.delivered += 1
        await self._redis.xack(sub.stream, sub.group, entry_id)

    async def _park(
        self, sub: Subscription, entry_id: str, fields: dict[str, str], attempts: int, error: str
    ) -> None:
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


__all__ = ["DEAD_SUFFIX", "STREAM_PREFIX", "RedisStreamsBackend", "stream_key"]
