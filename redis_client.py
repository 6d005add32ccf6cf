"""The one Redis client of a process, and the one way of saying "Redis is down".

The lifespan opens one client (one connection pool) from ``REDIS_URL`` and hands it to the
bus, the idempotency store and the cron locks, as it hands the HTTP client to the cloud
callers. A part built on its own (a test, a CLI command) opens one from a URL instead; a
``RedisRef`` remembers which, so a part closes only the client it opened.

Failures (functions, so that redis-py is imported only where Redis is used: it costs a server
that has no ``REDIS_URL`` 5.6 MiB and ~30 ms of start-up; ``REDIS_DOWN`` and ``REDIS_FAILED``
are the same tuples as names, importing redis-py when they are asked for)::

    redis_down()      no answer: connection refused or dropped, a timeout — fall back or fail open
    redis_failed()    any Redis failure, also an answer refusing the command (a wrong password)
    response_error()  an answer refusing the command
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis.asyncio as aioredis

CONNECT_TIMEOUT_S = 2.0
# The bus blocks up to BLOCK_S on XREADGROUP: a read on the shared pool must outlast that.
BLOCK_S = 1.0


@functools.cache
def redis_down() -> tuple[type[Exception], ...]:
    """The exceptions of a Redis that does not answer (``except redis_down():``)."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (RedisConnectionError, RedisTimeoutError, OSError)


@functools.cache
def redis_failed() -> tuple[type[Exception], ...]:
    """The exceptions of any Redis failure, a refused command included."""
    from redis.exceptions import RedisError

    return (RedisError, OSError)


def response_error() -> type[Exception]:
    """The exception of an answer that refuses the command (a wrong password, BUSYGROUP)."""
    from redis.exceptions import ResponseError

    return ResponseError


def __getattr__(name: str) -> Any:
    if name == "REDIS_DOWN":
        return redis_down()
    if name == "REDIS_FAILED":
        return redis_failed()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_redis(
    url: str, *, socket_timeout_s: float = CONNECT_TIMEOUT_S, block_s: float = BLOCK_S
) -> aioredis.Redis:
    """A client of ``url`` (no I/O until the first command); replies decoded as str."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=socket_timeout_s,
        socket_timeout=socket_timeout_s + block_s,
        # One immediate retry heals a pooled connection that died with a Redis restart; more
        # would only delay the switch to a fallback.
        retry=Retry(NoBackoff(), 1),
    )


async def close_redis(client: aioredis.Redis) -> None:
    """Close ``client``'s pool; a Redis that is down does not make this fail."""
    with contextlib.suppress(*redis_down()):
        await client.aclose()


class RedisRef:
    """A Redis client handed over (borrowed) or opened here from a URL (owned)."""

    def __init__(
        self,
        url: str | None,
        client: aioredis.Redis | None = None,
        *,
        socket_timeout_s: float = CONNECT_TIMEOUT_S,
        block_s: float = BLOCK_S,
    ) -> None:
        self.url = url or None
        self.client = client
        self._socket_timeout_s = socket_timeout_s
        self._block_s = block_s
        self._owned = False

    @property
    def configured(self) -> bool:
        return self.client is not None or self.url is not None

    def open(self) -> aioredis.Redis | None:
        """The client: the one handed over, else one opened from the URL; None without both."""
        if self.client is None and self.url is not None:
            self.client = open_redis(
                self.url, socket_timeout_s=self._socket_timeout_s, block_s=self._block_s
            )
            self._owned = True
        return self.client

    async def close(self) -> None:
        """Close the client if it was opened here; a borrowed one is its owner's to close."""
        if self._owned and self.client is not None:
            await close_redis(self.client)
            self.client = None
            self._owned = False


def raise_if_cancelling() -> None:
    """Re-raise a cancellation redis-py swallowed.

    A task cancelled just as it sends a blocking command (XREADGROUP BLOCK) can get an empty
    reply instead of CancelledError (redis/redis-py#2028; reproduced with redis-py 8 on
    Python 3.11), and a consumer loop would then run on forever and hang close().
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
