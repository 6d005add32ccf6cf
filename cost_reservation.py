"""One cloud call's money: amounts, months, the reservation, its bracket and its refusals.

``CostGuard.spend`` hands out a ``Spend``, the reservation of one call::

    async with guard.spend(action, rates.rate(action), request_id) as spend:  # or CostCapReached
        ... the cloud call, sent with Cost-Limit: spend.limit_usd ...
        spend.ran(actual_usd)        # it ran and cost this much

On leaving the bracket the reservation is committed (at the cost given to ``ran``, else the
amount reserved), or released when an ``ActionError`` that proves the call never ran leaves it.
``spend.reprice(price_usd)`` swaps the reservation for one at the serving side's price when it
refused the call as dearer than its ``Cost-Limit``. The refusals (``cap_reached``,
``budget_closed``, ``ledger_unreachable``) say why no money could be set aside, and until when.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING

from cost_ledger import LEASE_ACTION, MICRO_USD, LoggedCall, MonthTotals, from_micro, to_micro
from errors import ActionError, CostCapReached, CostLimitExceeded, InvalidParams

if TYPE_CHECKING:
    from cost_guard import CostGuard

log = logging.getLogger("cost_guard")

NEVER_RAN_STATE = "unknown"

RequestState = Callable[[str], Awaitable[str | None]]
"""Ask the cloud what became of an idempotency key: 'unknown' (never ran), 'running', 'done',
'indeterminate', or None when it cannot tell."""

# The largest amount the ledger holds exactly (numeric(18, 6) in PostgreSQL).
MAX_LEDGER_USD = Decimal("999999999999.999999")


def usd(amount: Decimal) -> str:
    """Format money exactly, with at least two decimals: 0.1 -> '0.10', 0.002 -> '0.002'."""
    text = format(amount.quantize(MICRO_USD), "f")
    whole, _, cents = text.partition(".")
    cents = cents.rstrip("0")
    return f"{whole}.{cents.ljust(2, '0')}"


def money(amount: Decimal | int | float | str, name: str) -> Decimal:
    """Return ``amount`` as an exact Decimal in whole micro-dollars (rounded up), >= 0.

    A float (a cloud response's ``cost_usd`` parsed from JSON) goes through its shortest
    repr, so 0.01 stays 0.01 and not 0.01000000000000000020816681711721685.
    """
    if isinstance(amount, bool):
        raise TypeError(f"{name} must be an amount of US dollars, got {amount!r}")
    value = Decimal(repr(amount)) if isinstance(amount, float) else Decimal(amount)
    if not value.is_finite() or not 0 <= value <= MAX_LEDGER_USD:
        raise ValueError(
            f"{name} must be a finite amount from 0 to {MAX_LEDGER_USD}, got {amount!r}"
        )
    return from_micro(to_micro(value))


def month_of(moment: datetime, tz: tzinfo) -> str:
    """Return 'YYYY-MM' of ``moment`` in ``tz``: months roll over at local midnight of the 1st."""
    local = moment.astimezone(tz)
    return f"{local.year:04d}-{local.month:02d}"


def next_month(month: str) -> str:
    """Return the 'YYYY-MM' after ``month``."""
    year, mon = (int(part) for part in month.split("-"))
    return f"{year + mon // 12:04d}-{mon % 12 + 1:02d}"


class LedgerMonth:
    """``month_of(now, tz)``, kept while ``now`` stays within the month found last.

    The cost guard asks for the month several times per call (the cap checks, the
    reservation, the lease): two comparisons instead of a time zone conversion each time.
    """

    __slots__ = ("_span", "_tz")

    def __init__(self, tz: tzinfo) -> None:
        self._tz = tz
        self._span: tuple[datetime, datetime, str] | None = None

    def __call__(self, now: datetime) -> str:
        span = self._span
        if span is not None and now.tzinfo is not None and span[0] <= now < span[1]:
            return span[2]
        month = month_of(now, self._tz)
        if now.tzinfo is not None:
            self._span = month_span(month, self._tz)
        return month


def month_span(month: str, tz: tzinfo) -> tuple[datetime, datetime, str] | None:
    """The instants ``month`` starts and ends at in ``tz`` (UTC), and the month; ``None``
    where local midnight of the 1st is not one instant (a zone that skips or repeats it)."""
    year, mon = (int(part) for part in month.split("-"))
    later = next_month(month)
    start = datetime(year, mon, 1, tzinfo=tz).astimezone(UTC)
    end = datetime(int(later[:4]), int(later[5:]), 1, tzinfo=tz).astimezone(UTC)
    tick = timedelta(microseconds=1)
    exact = month_of(start, tz) == month != month_of(start - tick, tz) and month_of(
        end - tick, tz
    ) == month != month_of(end, tz)
    return (start, end, month) if exact else None


@dataclass(frozen=True)
class Reservation:
    """Money set aside for one cloud call until it is committed, released or expires."""

    id: str
    action: str
    amount_usd: Decimal
    request_id: str
    month: str
    lease_id: str | None = None  # carved from this budget lease, in memory (no row of its own)

    @classmethod
    def of(cls, call: LoggedCall) -> Reservation:
        """The reservation a ledger row stands for."""
        return cls(call.id, call.action, call.reserved_usd, call.request_id, call.month)

    def logged(self, cost_usd: Decimal) -> LoggedCall:
        """The ledger row of this reservation once it cost ``cost_usd``."""
        return LoggedCall(
            self.id, self.month, self.action, self.request_id, self.amount_usd, cost_usd
        )


@dataclass(slots=True)
class BudgetLease:
    """A block of the month's budget held in the ledger as one reservation row (``LEASE_ACTION``).

    Calls are carved from it in memory; each call's commit takes its reservation off the row
    (``LeasingStore.settle_leased``). ``held_usd`` is what the row holds once the commits queued
    for it are written; ``in_flight_usd`` of that is carved by calls not settled yet.
    """

    id: str
    month: str
    taken_at: datetime
    size_usd: Decimal
    held_usd: Decimal
    in_flight_usd: Decimal = Decimal(0)
    calls: int = 0  # carved, not settled yet
    used_at: datetime | None = None
    retired: bool = False  # no new calls: its unused part was given back

    @property
    def unused_usd(self) -> Decimal:
        return self.held_usd - self.in_flight_usd

    def fits(self, amount: Decimal, month: str, now: datetime, max_age: timedelta) -> bool:
        """Whether a call of ``amount`` in ``month`` may be carved from it now."""
        return (
            not self.retired
            and self.month == month
            and self.held_usd > 0
            and amount <= self.unused_usd
            and now - self.taken_at < max_age
        )

    def carve(self, amount: Decimal, now: datetime) -> None:
        self.in_flight_usd += amount
        self.calls += 1
        self.used_at = now

    def drop(self, amount: Decimal, *, spent: bool) -> None:
        """A carved call is settled: its money leaves the lease if ``spent`` (committed)."""
        self.in_flight_usd -= amount
        self.calls -= 1
        if spent:
            self.held_usd -= amount


class Spend:
    """The reservation of one call inside ``CostGuard.spend``; see the module docstring."""

    def __init__(self, guard: CostGuard, reservation: Reservation) -> None:
        self._guard = guard
        self.reservation: Reservation | None = reservation
        self.cost_usd: Decimal | None = None

    @property
    def limit_usd(self) -> Decimal:
        """What the call may cost: the amount reserved, sent as the ``Cost-Limit`` header."""
        assert self.reservation is not None
        return self.reservation.amount_usd

    def ran(self, cost_usd: Decimal | None = None) -> None:
        """Record that the call ran, costing ``cost_usd`` (None: the amount reserved)."""
        self.cost_usd = self.limit_usd if cost_usd is None else cost_usd

    async def reprice(self, price_usd: Decimal) -> None:
        """Reserve ``price_usd`` instead: the serving side refused the call as dearer.

        The old reservation is released first (the refused call never ran), so calls refused
        together compete for the room they free. Raises ``CostCapReached`` if the cap does not
        allow the new price; nothing is held then.
        """
        old = self.reservation
        assert old is not None
        self.reservation = None
        await self._guard.release(old)
        self.reservation = await self._guard.reserve(old.action, price_usd, old.request_id)

    def take(self, *, never_ran: bool) -> tuple[Reservation, Decimal | None] | None:
        """What settles the reservation, once: (it, the cost to commit or None to release it).

        The cost given to ``ran()``; else None (release) if the call provably never ran; else
        the amount reserved (it may have run). None when it was settled already.
        """
        reservation, self.reservation = self.reservation, None
        if reservation is None:
            return None
        if self.cost_usd is not None:
            return reservation, self.cost_usd
        return reservation, None if never_ran else reservation.amount_usd

    async def settle(self, *, never_ran: bool) -> None:
        """Commit or release the reservation now (once), before the bracket is left."""
        settlement = self.take(never_ran=never_ran)
        if settlement is None:
            return
        reservation, cost = settlement
        await (
            self._guard.release(reservation)
            if cost is None
            else self._guard.commit(reservation, cost)
        )


def left_without_running(spend: Spend, exc: BaseException) -> bool:
    """Whether ``exc``, leaving the bracket, proves the call never ran (``CostGuard.spend``).

    Only an ``ActionError`` saying so does; any other exception counts as "it may have run",
    and leaving with a reservation and no cost is logged.
    """
    if isinstance(exc, ActionError):
        return exc.never_ran
    if spend.reservation is not None and spend.cost_usd is None:
        log.warning(
            "a %s call left its cost bracket with %s; its reservation of $%s counts "
            "as spent (it may have run)",
            spend.reservation.action,
            type(exc).__name__,
            usd(spend.reservation.amount_usd),
        )
    return False


async def overdue_verdicts(
    overdue: list[LoggedCall], ask: RequestState | None, ttl_s: float
) -> list[tuple[Reservation, Decimal | None]]:
    """What to settle each unsettled reservation at: released (None) only if it never ran.

    The cloud is asked about all of them together, so one that hangs costs one timeout per
    pass, not one per call; no answer counts as "it may have run".
    """

    async def state_of(call: LoggedCall) -> str | None:
        if ask is None or call.action == LEASE_ACTION:  # a lease has no request to ask about
            return None
        try:
            return await ask(call.request_id)
        except Exception as exc:  # no answer: the safe side is "it may have run"
            log.warning("could not ask the cloud about request %s: %r", call.request_id, exc)
            return None

    states = await asyncio.gather(*(state_of(call) for call in overdue))
    verdicts: list[tuple[Reservation, Decimal | None]] = []
    for call, state in zip(overdue, states, strict=True):
        if call.action == LEASE_ACTION:
            # Its holder died: the calls carved from it may have run, and none of them is in
            # the ledger, so what it still holds counts as spent (at most one lease's worth).
            log.warning(
                "budget lease %s was not given back within %.0f s (its instance stopped); "
                "the $%s it still held is counted as spent",
                call.id,
                ttl_s,
                usd(call.cost_usd),
            )
            verdicts.append((Reservation.of(call), call.cost_usd))
            continue
        never_ran = state == NEVER_RAN_STATE
        log.warning(
            "reservation %s of %s (request %s) was not settled within %.0f s; the cloud "
            "says %s, so it is %s",
            call.id,
            call.action,
            call.request_id,
            ttl_s,
            state or "nothing",
            "released" if never_ran else f"counted as spent (${usd(call.reserved_usd)})",
        )
        verdicts.append((Reservation.of(call), None if never_ran else call.cost_usd))
    return verdicts


def log_overrun(call: LoggedCall) -> None:
    """Say loudly that a call cost more than it reserved, which closes the month's budget."""
    log.warning(
        "%s (request %s) cost $%s but reserved only $%s; recorded as it is, and the "
        "cloud budget of %s is closed: no further cloud calls this month",
        call.action,
        call.request_id,
        usd(call.cost_usd),
        usd(call.reserved_usd),
        call.month,
    )


def overrun_report(call: LoggedCall) -> dict[str, str]:
    """A call that cost more than it reserved, as ``/status`` shows it."""
    return {
        "action": call.action,
        "request_id": call.request_id,
        "reserved_usd": usd(call.reserved_usd),
        "cost_usd": usd(call.cost_usd),
    }


# -- refusals --------------------------------------------------------------------------------


def cap_reached(
    totals: MonthTotals,
    cap_usd: Decimal,
    tz: tzinfo,
    action: str | None = None,
    amount: Decimal | None = None,
) -> CostCapReached:
    """The refusal of a reservation (of ``amount`` for ``action``) that would pass the cap."""
    asked = f" + ${usd(amount)} for {action}" if amount is not None else ""
    detail = (
        f"monthly cloud spend cap reached for {totals.month} ({tz}): "
        f"${usd(totals.committed_usd)} spent + ${usd(totals.reserved_usd)} reserved{asked} "
        f"would pass MONTHLY_COST_CAP ${usd(cap_usd)}; raise MONTHLY_COST_CAP "
        f"or wait for the month to roll over on {next_month(totals.month)}-01"
    )
    return CostCapReached(
        detail,
        month=totals.month,
        spent_usd=usd(totals.committed_usd),
        reserved_usd=usd(totals.reserved_usd),
        cap_usd=usd(cap_usd),
    )


def budget_closed(
    totals: MonthTotals, overruns: list[LoggedCall], cap_usd: Decimal
) -> CostCapReached:
    """The refusal while a call of the month cost more than it reserved."""
    worst = max(overruns, key=lambda call: call.cost_usd - call.reserved_usd)
    return CostCapReached(
        f"the cloud budget of {totals.month} is closed: {worst.action} (request "
        f"{worst.request_id}) cost ${usd(worst.cost_usd)} but reserved only "
        f"${usd(worst.reserved_usd)}, so the reservations no longer bound the spend; check "
        f"COST_RATES_FILE against the cloud's prices, then wait for "
        f"{next_month(totals.month)}-01 (the ledger keeps the month closed across restarts)",
        month=totals.month,
        spent_usd=usd(totals.committed_usd),
        reserved_usd=usd(totals.reserved_usd),
        cap_usd=usd(cap_usd),
    )


def ledger_unreachable(ledger: str, reason: str | None) -> CostCapReached:
    """The refusal while the ledger cannot be reached: cloud spend fails closed."""
    return CostCapReached(
        f"the cost ledger ({ledger}) is unreachable, so cloud spend fails "
        f"closed until it is back ({reason}); actions with a local handler still "
        f"run locally",
        ledger_healthy=False,
    )


def check_cost_limit(action: str, header: str, price_usd: Decimal) -> None:
    """Refuse a served call whose price here is above the caller's ``Cost-Limit`` header.

    The caller reserved ``Cost-Limit`` against its monthly cap; running a dearer call would
    pass it. The refusal (``CostLimitExceeded``) carries our price so the caller can reserve
    that and ask again; a header that is no non-negative decimal is ``InvalidParams``.
    """
    try:
        limit = Decimal(header.strip())
    except InvalidOperation:
        limit = Decimal("NaN")
    if not limit.is_finite() or limit < 0:
        raise InvalidParams(
            f"Cost-Limit must be a non-negative decimal of US dollars; got {header[:40]!r}"
        )
    if price_usd > limit:
        raise CostLimitExceeded(
            f"{action} costs ${format(price_usd, 'f')} here, above the Cost-Limit of "
            f"${format(limit, 'f')} the caller reserved; nothing ran",
            price_usd=price_usd,
        )
