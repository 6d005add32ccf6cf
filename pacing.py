"""Pacer: global rate limits that defer instead of dropping, shared by every replica.

Each limit (``rate_limits.py``) is a *bucket* of slot times, one per run, past and booked:

    acquire(action)        run now if a slot is free now (and record it); else say when
    reserve_slot(action)   always book: now if free, else the next free slot after every
                           booked one, so N deferred items get N distinct slots in order
    claim(action, slot_id) at (or after) a booked slot: confirm it, or re-book if running
                           late would break the limit
    release(action, slot)  give back a booked slot (the item was cancelled)

A new slot goes after every booked one (first come, first served): deferred items never lose
their place to later requests. The slot math is in pure functions (``next_slot``, ``fits``,
``decide``) that the stores (``pacing_stores.py``) apply atomically: SQLite inside
``BEGIN IMMEDIATE``, Redis in one Lua script over a sorted set. When a store does not answer,
the Pacer fails closed: the action is deferred, never run over the limit.
"""

from __future__ import annotations

import logging
import random
import uuid
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, tzinfo
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from errors import EverReachError
from rate_limits import RateLimit, RateLimits

log = logging.getLogger(__name__)

# Quiet hours are handed to the stores as concrete spans up to this far ahead; a slot that would
# land beyond it is not booked (the caller retries when the horizon has moved on).
QUIET_HORIZON_S = 14 * 86400.0
# Far beyond any real slot time; stands for "no horizon" (also in Lua, which has no inf literal).
NO_HORIZON_S = 1e300
# How long an overdue slot is kept for its claim (a restart after an outage): claimed within this
# it keeps its place in the queue; later it is booked anew at the end.
OVERDUE_GRACE_S = 3600.0
# A hold claimed this late (at most, and at most a tenth of the window) runs as booked: its run
# is recorded at the slot time, so the holds booked after it stay valid. Later than that, the
# claim is checked against the runs and holds around "now" (after an outage).
LATE_GRACE_S = 2.0


class PacingUnavailable(EverReachError):
    """The pacing store could not be reached; the Pacer turns this into a deferral."""


class Op(StrEnum):
    ACQUIRE = "acquire"
    RESERVE = "reserve"
    CLAIM = "claim"


class SlotStatus(StrEnum):
    """What a store did with one request."""

    OK = "ok"  # runs now; a slot at ``now`` is recorded
    BOOKED = "booked"  # a future slot is booked under the slot id
    BUSY = "busy"  # not now, nothing booked (acquire)
    EARLY = "early"  # claimed before its slot; the slot stays booked
    FAR = "far"  # the next slot is past the quiet-hours horizon; nothing booked


class PaceReason(StrEnum):
    """Why a Decision came out as it did."""

    UNLIMITED = "unlimited"
    FREE = "free"
    PACED = "paced"
    STORE_UNAVAILABLE = "store_unavailable"


@dataclass(frozen=True, slots=True)
class Rule:
    """The numbers a store applies to one request: a limit, made concrete for ``now``."""

    max: int
    per_s: float
    min_interval_s: float = 0.0
    jitter_s: float = 0.0  # drawn for this request, 0..jitter_sec
    keep_s: float = 0.0  # slots older than now - keep_s no longer change any decision
    trim_s: float = 0.0  # ... and are deleted past now - trim_s (a late claim finds its own)
    quiet: tuple[tuple[float, float], ...] = ()  # sorted, disjoint quiet spans in Unix seconds
    horizon_s: float = NO_HORIZON_S
    late_s: float = 0.0  # a hold claimed at most this late runs at its own slot time


class Slot(NamedTuple):
    """One slot of a bucket: a run (taken at ``at_s``) or a hold (booked for a deferred item)."""

    at_s: float
    slot_id: str
    hold: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    """A store's answer; ``at_s`` is the slot time (None for FAR)."""

    status: SlotStatus
    at_s: float | None
    remove: str | None = None  # the id whose hold is removed
    add: Slot | None = None


# -- the slot math -----------------------------------------------------------------------------


def leave_quiet(t: float, rule: Rule) -> float | None:
    """Move ``t`` to the end of the quiet span it falls in; None if past the horizon."""
    for start, end in rule.quiet:
        if start <= t < end:
            t = end
    return t if t < rule.horizon_s else None


def next_slot(times: Sequence[float], rule: Rule, now_s: float) -> float | None:
    """The earliest slot at or after ``now_s`` and after every slot in ``times`` (sorted).

    At most ``max`` slots in any window ``[s, s + per_s)``: the new slot is at least ``per_s``
    after the ``max``-th latest; and ``min_interval_s + jitter_s`` after the latest.
    """
    t = now_s
    if times:
        t = max(t, times[-1] + rule.min_interval_s + rule.jitter_s)
        if len(times) >= rule.max:
            t = max(t, times[-rule.max] + rule.per_s)
    return leave_quiet(t, rule)


def fits(times: Sequence[float], x: float, rule: Rule) -> bool:
    """Whether a slot at ``x`` can join ``times`` (sorted) without breaking the limit."""
    if leave_quiet(x, rule) != x:
        return False
    after = bisect_right(times, x)
    if rule.min_interval_s > 0:
        before = bisect_left(times, x)
        if before > 0 and x - times[before - 1] < rule.min_interval_s:
            return False
        if before < len(times) and times[before] - x < rule.min_interval_s:
            return False
    # The fullest window holding x starts at x or at a slot in (x - per_s, x].
    starts = [x, *times[bisect_right(times, x - rule.per_s) : after]]
    for s in starts:
        inside = bisect_left(times, s + rule.per_s) - bisect_left(times, s)
        if inside + 1 > rule.max:
            return False
    return True


def decide(entries: Sequence[Slot], op: Op, rule: Rule, now_s: float, slot_id: str) -> Outcome:
    """Apply one request to a bucket's slots, sorted by time (pure).

    A claimed hold runs now if a run now fits among the runs so far and the holds still ahead;
    overdue holds (items not yet run, e.g. after an outage) do not count against it, they are
    checked in turn when claimed. Otherwise it is booked again after every other slot.
    """
    if op is Op.CLAIM:
        held = next((e.at_s for e in entries if e.slot_id == slot_id and e.hold), None)
        if held is not None:
            if held > now_s:
                return Outcome(SlotStatus.EARLY, held)
            if now_s - held <= rule.late_s:  # on time (give or take a timer's delay)
                return Outcome(SlotStatus.OK, held, remove=slot_id, add=Slot(held, slot_id))
            others = [e for e in entries if not (e.slot_id == slot_id and e.hold)]
            counted = [e.at_s for e in others if not (e.hold and e.at_s <= now_s)]
            if fits(counted, now_s, rule):
                return Outcome(SlotStatus.OK, now_s, remove=slot_id, add=Slot(now_s, slot_id))
            t = next_slot([e.at_s for e in others], rule, now_s)
            if t is None:
                return Outcome(SlotStatus.FAR, None, remove=slot_id)
            return Outcome(SlotStatus.BOOKED, t, remove=slot_id, add=Slot(t, slot_id, True))
        op = Op.RESERVE  # its hold is gone (trimmed, or the store restarted empty): book anew
    t = next_slot([e.at_s for e in entries], rule, now_s)
    if t is None:
        return Outcome(SlotStatus.FAR, None)
    if t <= now_s:
        return Outcome(SlotStatus.OK, now_s, add=Slot(now_s, slot_id))
    if op is Op.ACQUIRE:
        return Outcome(SlotStatus.BUSY, t)
    return Outcome(SlotStatus.BOOKED, t, add=Slot(t, slot_id, True))


# -- stores ------------------------------------------------------------------------------------


class PaceStore(Protocol):
    """Where buckets live. Every method raises ``PacingUnavailable`` when the store is down."""

    name: str

    async def open(self) -> None: ...
    async def aclose(self) -> None: ...
    async def decide(
        self, bucket: str, op: Op, rule: Rule, now_s: float, slot_id: str
    ) -> Outcome: ...
    async def release(self, bucket: str, slot_id: str) -> None: ...
    async def slots(self, bucket: str, since_s: float) -> list[Slot]: ...


# -- the Pacer ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether an action may run now; if not, the earliest time it may (``not_before``).

    ``slot_id`` is set when a slot is booked (or taken now): keep it with a deferred item and
    pass it to ``claim()`` when ``not_before`` comes, or to ``release()`` on cancel.
    """

    allowed: bool
    not_before: datetime | None
    reason: PaceReason
    limit: str | None = None
    slot_id: str | None = None


@dataclass(frozen=True, slots=True)
class LimitSnapshot:
    """One limit as ``/status`` shows it."""

    key: str
    max: int
    per_sec: float
    used: int  # runs in the current window (now - per_sec, now]
    deferred: int  # slots booked for deferred items, not run yet
    next_free_at: datetime | None  # None: free now, or the store did not answer
    available: bool = True
    backlog_s: float = 0.0  # how far ahead the last deferred item's slot is (the queue's depth)

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "max": self.max,
            "per_sec": self.per_sec,
            "used": self.used,
            "deferred": self.deferred,
            "next_free_at": self.next_free_at.isoformat() if self.next_free_at else None,
            "available": self.available,
            "backlog_s": round(self.backlog_s, 3),
        }


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Pacer:
    """Apply ``limits`` to actions through ``store``; clock and randomness are injectable."""

    def __init__(
        self,
        limits: RateLimits,
        store: PaceStore,
        *,
        tz: tzinfo = UTC,
        clock: Callable[[], datetime] = _utc_now,
        rng: random.Random | None = None,
        unavailable_retry_s: float = 5.0,
        quiet_horizon_s: float = QUIET_HORIZON_S,
    ) -> None:
        self.limits = limits
        self.store = store
        self._tz = tz
        self._clock = clock
        self._rng = rng or random.Random()
        self._unavailable_retry_s = unavailable_retry_s
        self._quiet_horizon_s = quiet_horizon_s

    async def open(self) -> None:
        """Open the store; a store that is down now is not fatal (decisions fail closed)."""
        try:
            await self.store.open()
        except PacingUnavailable as exc:
            log.warning("pacing: %s; limited actions are deferred until it answers", exc)

    async def aclose(self) -> None:
        await self.store.aclose()

    def _rule(self, limit: RateLimit, now_s: float) -> Rule:
        quiet: tuple[tuple[float, float], ...] = ()
        horizon_s = NO_HORIZON_S
        if limit.quiet_hours is not None:
            horizon_s = now_s + self._quiet_horizon_s
            quiet = tuple(limit.quiet_hours.spans(now_s - limit.per_sec, horizon_s, self._tz))
        keep_s = limit.per_sec + limit.min_interval_sec + limit.jitter_sec
        return Rule(
            max=limit.max,
            per_s=limit.per_sec,
            min_interval_s=limit.min_interval_sec,
            jitter_s=self._rng.uniform(0, limit.jitter_sec) if limit.jitter_sec else 0.0,
            keep_s=keep_s,
            trim_s=keep_s + OVERDUE_GRACE_S,
            quiet=quiet,
            horizon_s=horizon_s,
            late_s=min(LATE_GRACE_S, limit.per_sec / 10),
        )

    async def _decide(
        self, action: str, op: Op, now: datetime | None, slot_id: str | None
    ) -> Decision:
        limit = self.limits.limit_for(action)
        if limit is None:
            return Decision(True, None, PaceReason.UNLIMITED)
        now = now or self._clock()
        now_s = now.timestamp()
        slot_id = slot_id or uuid.uuid4().hex
        rule = self._rule(limit, now_s)
        try:
            outcome = await self.store.decide(limit.key, op, rule, now_s, slot_id)
        except PacingUnavailable as exc:
            log.warning("pacing %s: %s; deferring (fail closed)", action, exc)
            later = now + timedelta(seconds=self._unavailable_retry_s)
            # A slot booked in the store keeps its id: the caller claims it again later.
            keep_id = slot_id if op is Op.CLAIM else None
            return Decision(False, later, PaceReason.STORE_UNAVAILABLE, limit.key, keep_id)
        if outcome.status is SlotStatus.OK:
            return Decision(True, None, PaceReason.FREE, limit.key, slot_id)
        if outcome.status is SlotStatus.FAR:
            later = datetime.fromtimestamp(rule.horizon_s, UTC)
            return Decision(False, later, PaceReason.PACED, limit.key, None)
        assert outcome.at_s is not None
        booked = outcome.status in (SlotStatus.BOOKED, SlotStatus.EARLY)
        when = datetime.fromtimestamp(outcome.at_s, UTC)
        return Decision(False, when, PaceReason.PACED, limit.key, slot_id if booked else None)

    async def acquire(self, action: str, now: datetime | None = None) -> Decision:
        """Take a slot now if one is free; otherwise book nothing and say when one frees."""
        return await self._decide(action, Op.ACQUIRE, now, None)

    async def reserve_slot(
        self, action: str, now: datetime | None = None, *, slot_id: str | None = None
    ) -> Decision:
        """Take a slot now if free, else book the next free one (after every booked slot)."""
        return await self._decide(action, Op.RESERVE, now, slot_id)

    async def claim(
        self, action: str, slot_id: str | None, now: datetime | None = None
    ) -> Decision:
        """At a booked slot's time: run (allowed), or a new ``not_before`` if it must wait.

        A slot claimed late is moved to now only if that keeps the limit; otherwise it is
        re-booked at the end of the queue. An unknown (or None) id books a new slot.
        """
        return await self._decide(action, Op.CLAIM, now, slot_id)

    async def release(self, action: str, slot_id: str) -> None:
        """Give a booked slot back (its item was cancelled); a down store keeps it (safe)."""
        limit = self.limits.limit_for(action)
        if limit is None:
            return
        try:
            await self.store.release(limit.key, slot_id)
        except PacingUnavailable as exc:
            log.warning("pacing %s: could not release slot %s: %s", action, slot_id, exc)

    async def snapshot(self, now: datetime | None = None) -> list[LimitSnapshot]:
        """Each limit: used/max in the current window, booked slots ahead, next free slot."""
        now = now or self._clock()
        now_s = now.timestamp()
        result = []
        for limit in self.limits:
            rule = self._rule(limit, now_s)
            try:
                slots = await self.store.slots(limit.key, now_s - rule.trim_s)
            except PacingUnavailable:
                result.append(LimitSnapshot(limit.key, limit.max, limit.per_sec, 0, 0, None, False))
                continue
            used = sum(1 for e in slots if not e.hold and now_s - limit.per_sec < e.at_s <= now_s)
            holds = [e.at_s for e in slots if e.hold]
            times = [e.at_s for e in slots]
            free_s = next_slot(times, replace(rule, jitter_s=0.0), now_s)
            next_free = None if free_s is None or free_s <= now_s else free_s
            result.append(
                LimitSnapshot(
                    limit.key,
                    limit.max,
                    limit.per_sec,
                    used,
                    len(holds),
                    datetime.fromtimestamp(next_free, UTC) if next_free is not None else None,
                    backlog_s=max([0.0, *(t - now_s for t in holds)]),
                )
            )
        return result
