"""FireTimeLock: one replica runs a job at a given fire time (``SET NX PX`` in Redis).

Without Redis every instance is alone and always runs. When Redis fails, the lock fails open:
a terminal whose Redis is down still runs its routine; replicas sharing that Redis may then
both run this one fire time (logged).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from redis_client import RedisRef, raise_if_cancelling, redis_failed

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger("local_cron")

LOCK_PREFIX = "everreach:cron:"


def lock_key(job_id: str, fire_time: datetime) -> str:
    """Redis key that one replica takes to run ``job_id`` at ``fire_time``."""
    return f"{LOCK_PREFIX}{job_id}:{fire_time.astimezone(UTC).isoformat()}"


class FireTimeLock:
    """Take ``(job, fire time)`` for this instance, through the shared Redis client or its own."""

    def __init__(
        self, *, instance_id: str, redis_url: str | None, redis: aioredis.Redis | None = None
    ) -> None:
        self.instance_id = instance_id
        # ``redis``: the process's shared client (borrowed); else one of ``redis_url``, owned.
        self._ref = RedisRef(redis_url, redis, socket_timeout_s=1.0, block_s=0)
        self.client: aioredis.Redis | None = None

    @property
    def kind(self) -> str:
        return "redis" if self._ref.configured else "none (single instance)"

    def open(self) -> None:
        self.client = self._ref.open()

    async def close(self) -> None:
        await self._ref.close()

    async def take(self, job_id: str, fire_time: datetime, *, ttl_s: float) -> bool:
        """Whether this instance runs ``job_id`` at ``fire_time`` (True also when Redis fails)."""
        if self.client is None:
            return True
        try:
            taken = await self.client.set(
                lock_key(job_id, fire_time), self.instance_id, nx=True, px=int(ttl_s * 1000)
            )
            raise_if_cancelling()  # a cancel redis-py swallowed must not start the job
        except redis_failed() as exc:
            log.warning("LocalCron: no replica lock for %s (%s); running anyway", job_id, exc)
            return True
        return bool(taken)
