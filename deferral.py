"""Deferral: pacing and scheduling at the edge of a call, and the loop that sends due items.

``Deferral.gate()`` runs before a call walks its routing ladder:

    scheduled (not_before ahead)   kept in the outbox until then (pacing applies when it runs)
    not limited                    runs now
    read-only, over its limit      ``RateLimited`` (429 with Retry-After), nothing booked
    side effect, over its limit    kept in the outbox with the pacing slot booked for it and
                                   ``not_before`` = that slot (202 ``deferred_until``)

The outbox replay asks ``admit(item)`` before sending a due item: it claims the item's slot
(or books one), and an item that must wait longer is rescheduled, never failed. ``DueLoop``
wakes the replay when the next item falls due. ``cancel()`` drops a queued item and gives its
slot back. The cloud role paces with ``serve_gate()`` in buckets of its own (``serve:``), so a
terminal and its cloud sharing a store do not count one call twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from background_task import BackgroundTask
from envelope import Envelope, rfc3339
from errors import Indeterminate, InvalidParams, KeyBusy, RateLimited
from pacing import Decision, Op, Outcome, Pacer, PaceReason, PaceStore, Slot
from params_digest import params_hash
from rate_limits import RateLimits
from service_registry import idempotency_key_scope

if TYPE_CHECKING:
    from config.hybrid_config import HybridConfig
    from local_executor import LocalExecutor
    from outbox import Outbox
    from outbox_rows import OutboxItem

log = logging.getLogger("everreach.pacing")

# How far ahead an action may be scheduled (not_before / delay_sec).
SCHEDULE_HORIZON_S = 366 * 86400.0


def _utc_now() -> datetime:
    return datetime.now(UTC)


def open_pace_store(config: HybridConfig, redis: Any) -> PaceStore:
    """The store shared like the other state: Redis, else PostgreSQL, else SQLite in DATA_DIR."""
    from pacing_stores import PostgresPaceStore, RedisPaceStore, SqlitePaceStore

    if redis is not None:
        return RedisPaceStore(config.redis_url, redis=redis)
    if config.postgres_dsn:
        return PostgresPaceStore(config.postgres_dsn)
    return SqlitePaceStore(config.data_dir / "pacing.sqlite3")


def open_pacer(config: HybridConfig, redis: Any) -> Pacer:
    """The Pacer of ``RATE_LIMITS_PATH`` (``ConfigError`` if malformed; missing: no limits)."""
    limits = RateLimits.load(config.rate_limits_path)
    return Pacer(limits, open_pace_store(config, redis), tz=config.timezone())


class PrefixedStore:
    """A store whose bucket names get ``prefix``: the cloud role's own buckets."""

    def __init__(self, store: PaceStore, prefix: str) -> None:
        self._store = store
        self._prefix = prefix
        self.name = store.name

    async def open(self) -> None:
        """The wrapped store is opened (and closed) by its owner."""

    async def aclose(self) -> None:
        """See ``open``."""

    async def decide(self, bucket: str, op: Op, rule: Any, now_s: float, slot_id: str) -> Outcome:
        return await self._store.decide(self._prefix + bucket, op, rule, now_s, slot_id)

    async def release(self, bucket: str, slot_id: str) -> None:
        await self._store.release(self._prefix + bucket, slot_id)

    async def slots(self, bucket: str, since_s: float) -> list[Slot]:
        return await self._store.slots(self._prefix + bucket, since_s)


def deferred_envelope(item: OutboxItem, request_id: str, started: float, why: str) -> Envelope:
    """The 202 answer of a call kept in the outbox until ``item.not_before``, saying ``why``."""
    assert item.not_before is not None
    return Envelope.deferred(
        item.action,
        outbox_id=item.id,
        request_id=request_id,
        deferred_until=item.not_before,
        detail=f"{why}: kept in the outbox, to be sent at {rfc3339(item.not_before)}",
        duration_ms=(time.perf_counter() - started) * 1000,
    )


def _rate_limited(action: str, decision: Decision) -> RateLimited:
    assert decision.not_before is not None
    why = (
        "the pacing store is not answering (fail closed)"
        if decision.reason is PaceReason.STORE_UNAVAILABLE
        else f"over the rate limit {decision.limit}"
    )
    return RateLimited(
        f"{action}: {why}; nothing ran; ask again after {decision.not_before.isoformat()}",
        not_before=decision.not_before,
    )


class Deferral:
    """Apply pacing and schedules to calls, through ``pacer`` and ``outbox``."""

    def __init__(
        self,
        pacer: Pacer,
        outbox: Outbox | None,
        *,
        clock: Callable[[], datetime] = _utc_now,
        horizon_s: float = SCHEDULE_HORIZON_S,
    ) -> None:
        self.pacer = pacer
        self.outbox = outbox
        self._clock = clock
        self.horizon_s = horizon_s
        self._served = Pacer(pacer.limits, PrefixedStore(pacer.store, "serve:"))
        self.on_deferred: Callable[[], None] = lambda: None  # DueLoop.poke

    def schedule_time(self, not_before: datetime | None, delay_s: float | None) -> datetime | None:
        """When a scheduled call runs (None: now); ``InvalidParams`` past the horizon."""
        if not_before is None and delay_s is None:  # most calls: no clock read
            return None
        now = self._clock()
        ahead_s = delay_s if delay_s is not None else 0.0
        if not_before is not None:
            ahead_s = (not_before - now).total_seconds()
        if ahead_s > self.horizon_s:
            when = not_before or f"{delay_s:g} s from now"
            raise InvalidParams(
                f"an action may be scheduled at most {self.horizon_s / 86400:g} days ahead; "
                f"{when} is further"
            )
        return None if ahead_s <= 0 else now + timedelta(seconds=ahead_s)

    async def gate(
        self,
        action: str,
        params: dict[str, Any],
        key: str,
        *,
        side_effect: bool,
        not_before: datetime | None = None,
    ) -> OutboxItem | None:
        """None: run now. An outbox item: kept until its ``not_before``. Raises
        ``RateLimited`` for a read-only action over its limit."""
        if not_before is not None:
            return await self._keep(action, params, key, not_before, None)
        if self.pacer.limits.limit_for(action) is None:
            return None
        if not side_effect or self.outbox is None:
            decision = await self.pacer.acquire(action)
            if decision.allowed:
                return None
            raise _rate_limited(action, decision)
        decision = await self.pacer.reserve_slot(action)
        if decision.allowed:
            return None
        assert decision.not_before is not None
        log.info("deferred %s until %s (%s)", action, decision.not_before, decision.reason)
        return await self._keep(action, params, key, decision.not_before, decision.slot_id)

    async def answer(
        self,
        action: str,
        params: dict[str, Any],
        key: str,
        side_effect: bool,
        not_before: datetime | None,
        *,
        started: float,
    ) -> Envelope | None:
        """``gate()`` as the router needs it: None to run now, else the 202 envelope."""
        if not_before is None and self.pacer.limits.limit_for(action) is None:
            return None  # what gate() answers for most calls, without its coroutine (~0.5 µs)
        item = await self.gate(action, params, key, side_effect=side_effect, not_before=not_before)
        if item is None:
            return None
        limit = self.pacer.limits.limit_for(action)
        why = (
            f"over its rate limit {limit.key!r} ({limit.max} per {limit.per_sec:g} s)"
            if item.pace_slot is not None and limit is not None
            else "scheduled"
        )
        return deferred_envelope(item, key, started, why)

    async def keep_until(
        self, action: str, params: dict[str, Any], key: str, not_before: datetime, *, started: float
    ) -> Envelope:
        """Keep a side effect the cloud refused as over its own limit until the time it gave."""
        item = await self._keep(action, params, key, not_before, None)
        return deferred_envelope(item, key, started, "over the cloud's rate limit")

    async def _keep(
        self,
        action: str,
        params: dict[str, Any],
        key: str,
        not_before: datetime,
        slot_id: str | None,
    ) -> OutboxItem:
        if self.outbox is None:
            raise InvalidParams("deferring an action needs the outbox, which is not open")
        item = await self.outbox.enqueue(
            action, params, key, not_before=not_before, pace_slot=slot_id
        )
        if slot_id is not None and item.pace_slot != slot_id:
            await self.pacer.release(action, slot_id)  # the key was already queued
        self.on_deferred()
        return item

    async def serve_gate(self, action: str) -> None:
        """The cloud role: run now, or ``RateLimited`` with the time a slot frees."""
        if self.pacer.limits.limit_for(action) is None:
            return
        decision = await self._served.acquire(action)
        if not decision.allowed:
            raise _rate_limited(action, decision)

    async def admit(self, item: OutboxItem) -> bool:
        """Before the replay sends ``item``: True to send now; False if it was rescheduled."""
        if self.pacer.limits.limit_for(item.action) is None:
            return True
        decision = await self.pacer.claim(item.action, item.pace_slot)
        if decision.allowed:
            return True
        await self.reschedule(item, decision.not_before, decision.slot_id)
        return False

    async def reschedule(
        self, item: OutboxItem, not_before: datetime | None, slot_id: str | None
    ) -> None:
        """Keep ``item`` until ``not_before`` (a later slot, or the cloud's 429)."""
        assert self.outbox is not None
        await self.outbox.reschedule(item.id, not_before, slot_id)
        log.info("outbox item %s (%s) waits until %s", item.id, item.action, not_before)
        self.on_deferred()

    async def cancel(self, item_id: str) -> OutboxItem:
        """Drop a queued item (``KeyError`` if none) and give its pacing slot back."""
        assert self.outbox is not None
        item = await self.outbox.drop(item_id)
        if item.pace_slot is not None:
            await self.pacer.release(item.action, item.pace_slot)
        return item

    async def snapshot(self) -> dict[str, Any]:
        """``/status`` ``rate_limits``: the file, the store, and each limit's window."""
        return {
            "file": self.pacer.limits.source,
            "store": self.pacer.store.name,
            "limits": [limit.as_json() for limit in await self.pacer.snapshot()],
        }


class DueLoop:
    """Run ``replay`` whenever an outbox item falls due (or after ``poke()``)."""

    def __init__(
        self,
        outbox: Outbox,
        replay: Callable[[], Awaitable[Any]],
        *,
        is_online: Callable[[], bool],
        idle_s: float = 5.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self._outbox = outbox
        self._replay = replay
        self._is_online = is_online
        self._idle_s = idle_s
        self._max_backoff_s = max_backoff_s
        self._wake = asyncio.Event()
        self._task = BackgroundTask("outbox-due")

    def poke(self) -> None:
        self._wake.set()

    async def _has_due(self) -> bool:
        return bool(await self._outbox.pending(limit=1))

    def start(self) -> None:
        self._task.start(self._run)

    async def close(self) -> None:
        await self._task.close()

    async def _run(self) -> None:
        backoff_s = 0.0
        while True:
            self._wake.clear()
            if self._is_online() and await self._has_due():
                try:
                    await self._replay()
                except Exception:
                    log.exception("sending due outbox items failed")
                # Still due: the cloud refused or is down; do not spin on it.
                blocked = await self._has_due()
                backoff_s = min(max(1.0, backoff_s * 2), self._max_backoff_s) if blocked else 0.0
            nxt = await self._outbox.next_due()
            wait_s = self._idle_s
            if nxt is not None:
                wait_s = min(wait_s, max(0.01, (nxt - _utc_now()).total_seconds()))
            wait_s = max(wait_s, backoff_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait_s)


async def run_here_once(
    store: Any,  # an idempotency store (SQLite, Redis or PostgreSQL)
    local: LocalExecutor,
    action: str,
    params: dict[str, Any],
    key: str,
    *,
    rerun_if_dead: bool,
    timeout_s: float = 2.0,
) -> Any:
    """Run a due item on this instance (it has no cloud), at most once per ``key``."""
    from idempotency import ClaimState

    scoped = f"outbox:{key}"
    claim = await store.wait(
        scoped, action, params_hash(params), timeout_s=timeout_s, rerun_if_dead=rerun_if_dead
    )
    if claim.state is ClaimState.DONE:
        return claim.body
    if claim.state is ClaimState.RUNNING:
        raise KeyBusy(f"outbox item {key} is still running here", never_ran=False)
    if claim.state is ClaimState.MISMATCH:
        raise InvalidParams(f"key {key} was already used for another action or other params")
    if claim.state is ClaimState.INDETERMINATE:
        raise Indeterminate(f"the process that ran {action} under {key} died mid-handler")
    try:
        with idempotency_key_scope(key):
            result = await local.run(action, params)
    except BaseException as exc:
        await store.release(scoped, ran=not getattr(exc, "never_ran", False))
        raise
    await store.complete(scoped, 200, result)
    return result
