"""What the bus's two backends share: a subscription, its counters and the backend protocol.

``SyncBus`` (the facade) owns the subscriptions and decides which backend serves them; a
backend (``bus_redis.RedisStreamsBackend``, ``bus_store.SqliteQueue``) stores what is
published and runs one consuming step of a subscription at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("sync_bus")

Handler = Callable[[dict[str, Any]], Awaitable[None]]

READ_COUNT = 100  # messages one consuming step takes at most


class MessageBackend(Protocol):
    """Where messages are kept, and how a subscription reads them."""

    async def publish(self, topic: str, data: str) -> str:
        """Store one JSON payload on ``topic``; return its id once it is durable."""
        ...

    async def step(self, sub: Subscription) -> None:
        """Deliver what is due to ``sub`` (or wait a little for it); then return."""
        ...


@dataclass(eq=False)
class Subscription:
    """One handler of one topic for one group, and what it did so far."""

    topic: str
    group: str
    durable: bool
    handler: Handler
    stream: str
    max_deliveries: int
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

    def handler_failed(self, key: str, attempt: int, exc: Exception) -> None:
        """Count and log a failed delivery of message ``key``; keep its error for parking."""
        self.failures += 1
        self.errors[key] = short(exc)
        log.warning(
            "SyncBus: handler for %s (group %s) failed on message %s, attempt %d/%d: %s",
            self.topic,
            self.group,
            key,
            attempt,
            self.max_deliveries,
            self.errors[key],
        )

    def view(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "group": self.group,
            "durable": self.durable,
            "delivered": self.delivered,
            "failures": self.failures,
            "parked": self.parked,
        }


def short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def check_name(kind: str, value: object) -> None:
    if (
        not isinstance(value, str)
        or not value
        or len(value) > 200
        or any(ch.isspace() for ch in value)
    ):
        raise ValueError(f"{kind} must be a non-empty string without spaces, got {value!r}")
