"""CostGuard: the monthly cloud spend cap, enforced by atomic reservations in a shared ledger.

Every cloud call runs inside one bracket, which settles the reservation on every way out::

    async with guard.spend(action, rates.rate(action), request_id) as spend:  # or CostCapReached
        ... the cloud call, sent with Cost-Limit: spend.limit_usd ...
        spend.ran(actual_usd)        # it ran and cost this much

On leaving the bracket the reservation is committed (at the cost given to ``ran``, else the
amount reserved), or released when an ``ActionError`` that proves the call never ran leaves it.
``spend.reprice(price_usd)`` swaps the reservation for one at the serving side's price when it
refused the call as dearer than its ``Cost-Limit``. The bare ``reserve``/``commit``/``release``
remain for the ledger's own tests and tools.

A reservation nobody settled (the process died between the call and its commit) is not simply
given back: after ``reservation_ttl_s`` the background sweep asks the cloud, by idempotency key,
whether the request ever ran (``request_state``); only "unknown" releases it, anything else, or
no answer, commits it as spent. A call that cost more than it reserved is recorded as it is and
closes the month's budget: no further reservation is accepted until the month rolls over.

``reserve`` succeeds only if the month's committed + reserved + amount stays within the hard
cap, decided atomically by the database (``cost_ledger``), so several instances sharing one
PostgreSQL ledger never pass the cap together. ``is_soft_cap_reached`` / ``is_hard_cap_reached``
read in-memory totals (no I/O, cheap on every route) refreshed from each reserve/commit answer
and by a background task every few seconds. If the ledger cannot be reached the guard fails
closed: the flags say "cap reached" (route local) and ``reserve`` raises ``CostCapReached``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from cost_ledger import (
    MICRO_USD,
    LedgerStore,
    LedgerUnavailable,
    LoggedCall,
    MonthTotals,
    ReserveRequest,
    SqliteLedgerStore,
    from_micro,
    to_micro,
)
from cost_ledger_pg import PostgresLedgerStore, SupabaseLedgerStore
from errors import ActionError, ConfigError, CostCapReached

if TYPE_CHECKING:
    import httpx

    from config.hybrid_config import HybridConfig

log = logging.getLogger(__name__)

LEDGER_FILENAME = "cost_ledger.sqlite3"
_NOT_OPENED = "not opened yet"
# The store's own expiry (which releases) is only a backstop past any month's end: within the
# month an unsettled reservation is resolved by the guard's sweep, which asks the cloud first.
STORE_EXPIRY_S = 40 * 86400.0
# The largest amount the ledger holds exactly (numeric(18, 6) in PostgreSQL).
MAX_LEDGER_USD = Decimal("999999999999.999999")
SWEEP_BATCH = 20  # asked of the cloud together, once per refresh pass
NEVER_RAN_STATE = "unknown"

RequestState = Callable[[str], Awaitable[str | None]]
"""Ask the cloud what became of an idempotency key: 'unknown' (never ran), 'running', 'done',
'indeterminate', or None when it cannot tell."""


def usd(amount: Decimal) -> str:
    """Format money exactly, with at least two decimals: 0.1 -> '0.10', 0.002 -> '0.002'."""
    text = format(amount.quantize(MICRO_USD), "f")
    whole, _, cents = text.partition(".")
    cents = cents.rstrip("0")
    return f"{whole}.{cents.ljust(2, '0')}"


def month_of(moment: datetime, tz: tzinfo) -> str:
    """Return 'YYYY-MM' of ``moment`` in ``tz``: months roll over at local midnight of the 1st."""
    local = moment.astimezone(tz)
    return f"{local.year:04d}-{local.month:02d}"


def _next_month(month: str) -> str:
    year, mon = (int(part) for part in month.split("-"))
    return f"{year + mon // 12:04d}-{mon % 12 + 1:02d}"


@dataclass(frozen=True)
class Reservation:
    """Money set aside for one cloud call until it is committed, released or expires."""

    id: str
    action: str
    amount_usd: Decimal
    request_id: str
    month: str


@dataclass(frozen=True, slots=True)
class _Pending:
    """A commit/release the ledger could not take yet; retried when it is reachable again."""

    reservation: Reservation
    actual_usd: Decimal | None  # None: a release


class CostGuard:
    """Monthly soft/hard cap over a ``LedgerStore``; see the module docstring."""

    def __init__(
        self,
        store: LedgerStore,
        *,
        monthly_cap_usd: Decimal,
        soft_cap_usd: Decimal,
        tz: tzinfo,
        reservation_ttl_s: float = 900.0,
        clock: Callable[[], datetime] | None = None,
        refresh_interval_s: float = 5.0,
        retry_interval_s: float = 1.0,
        request_state: RequestState | None = None,
    ) -> None:
        if soft_cap_usd > monthly_cap_usd:
            raise ConfigError(
                f"COST_SOFT_CAP ({soft_cap_usd}) must not exceed "
                f"MONTHLY_COST_CAP ({monthly_cap_usd})"
            )
        if reservation_ttl_s <= 0:
            raise ValueError("reservation_ttl_s must be positive")
        self._store = store
        self._hard_cap_usd = Decimal(monthly_cap_usd)
        self._soft_cap_usd = Decimal(soft_cap_usd)
        self._tz = tz
        self._ttl_s = reservation_ttl_s
        self._clock = clock or (lambda: datetime.now(UTC))
        self._refresh_interval_s = refresh_interval_s
        self._retry_interval_s = retry_interval_s
        self._totals: MonthTotals | None = None
        self._healthy = False
        self._store_open = False
        self._last_error: str | None = _NOT_OPENED
        self._pending: list[_Pending] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._refresh_lock = asyncio.Lock()
        self.request_state = request_state
        self._overruns: dict[str, LoggedCall] = {}  # this month's, by reservation id
        self.on_overrun: Callable[[], None] | None = None

    @classmethod
    def from_config(
        cls, config: HybridConfig, *, http_client: httpx.AsyncClient | None = None
    ) -> CostGuard:
        """Build the guard the configuration asks for (not opened yet).

        Store: PostgreSQL if DATABASE_URL or SUPABASE_DB_URL is set; else Supabase REST if
        SUPABASE_URL and SUPABASE_SERVICE_KEY are; else SQLite at DATA_DIR/cost_ledger.sqlite3.
        ``http_client`` (the app's shared client) carries Supabase REST calls if given.
        """
        store: LedgerStore
        key = config.secret("supabase_service_key")
        if config.postgres_dsn:
            store = PostgresLedgerStore(config.postgres_dsn)
        elif config.supabase_url and key:
            store = SupabaseLedgerStore(config.supabase_url, key, http_client=http_client)
        elif config.supabase_url or key:
            missing = "SUPABASE_SERVICE_KEY" if config.supabase_url else "SUPABASE_URL"
            raise ConfigError(
                f"the Supabase cost ledger needs both SUPABASE_URL and SUPABASE_SERVICE_KEY; "
                f"{missing} is not set (or set DATABASE_URL / SUPABASE_DB_URL instead)"
            )
        else:
            store = SqliteLedgerStore(config.data_dir / LEDGER_FILENAME)
        return cls(
            store,
            monthly_cap_usd=config.monthly_cost_cap,
            soft_cap_usd=config.cost_soft_cap,
            tz=config.timezone(),
        )

    # -- life cycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the store (creating the schema where it can), load the month, start refreshing.

        An unreachable database does not stop start-up: the guard is unhealthy and fails closed
        until the background task reaches it. A missing Supabase migration is a ``ConfigError``.
        """
        if self._task is not None:
            return
        self._closed = False
        async with self._refresh_lock:  # no sweep here: start-up must not wait on the cloud
            await self._refresh(sweep=False)
        self._task = asyncio.create_task(self._refresh_loop(), name="cost-guard-refresh")

    async def close(self) -> None:
        """Stop the refresh task and close the store; safe to call twice."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait() does not raise the task's CancelledError, but does raise our own.
            await asyncio.wait([task])
        if self._store_open:
            await self._drain_before_close()
            self._store_open = False
            await self._store.close()
        self._healthy = False
        self._last_error = _NOT_OPENED

    async def _drain_before_close(self) -> None:
        """Last try at commits/releases the ledger could not take; say loudly what is lost."""
        try:
            while self._pending:
                await self._settle(self._pending[0])
                self._pending.pop(0)
        except LedgerUnavailable as exc:
            log.error(
                "cost ledger unreachable at shutdown: %d commit/release(s) not recorded (%s); "
                "their reservations expire after %.0f s",
                len(self._pending),
                exc,
                self._ttl_s,
            )
            self._pending.clear()

    async def _refresh_loop(self) -> None:
        while True:
            delay_s = self._refresh_interval_s if self._healthy else self._retry_interval_s
            await asyncio.sleep(delay_s)
            try:
                await self.refresh()
            except ConfigError as exc:  # e.g. the Supabase migration vanished: stay closed
                self._mark_unhealthy(str(exc))
            except Exception:
                log.exception("cost guard refresh failed")

    async def refresh(self) -> None:
        """Re-read the month's totals (expiring stale reservations) and retry pending settles."""
        async with self._refresh_lock:  # the background task and a caller: one at a time
            await self._refresh()

    async def _refresh(self, *, sweep: bool = True) -> None:
        if self._closed:
            return
        try:
            if not self._store_open:
                await self._store.open()
                self._store_open = True
            elif not self._healthy:
                await self._store.heal()
            while self._pending:
                await self._settle(self._pending[0])
                self._pending.pop(0)
            if sweep:
                await self._sweep_overdue()
            now = self._clock()
            month = month_of(now, self._tz)
            totals = await self._store.totals(month, now)
            overruns = await self._store.overruns(month)
        except LedgerUnavailable as exc:
            self._mark_unhealthy(str(exc))
            return
        for call in overruns:  # also those of other instances sharing the ledger
            self._note_overrun(call)
        self._apply(totals)
        if not self._healthy and self._last_error != _NOT_OPENED:
            log.warning("cost ledger reachable again (%s)", self._store.describe())
        self._healthy = True
        self._last_error = None

    async def _sweep_overdue(self) -> None:
        """Settle reservations older than the TTL: their process died before settling them.

        Released only if the cloud confirms the request never ran; otherwise counted as spent.
        """
        before = self._clock() - timedelta(seconds=self._ttl_s)
        overdue = await self._store.overdue(before, SWEEP_BATCH)
        # Asked together: a cloud that hangs costs one timeout per pass, not one per call.
        states = await asyncio.gather(*(self._ask_request_state(c.request_id) for c in overdue))
        for call, state in zip(overdue, states, strict=True):
            never_ran = state == NEVER_RAN_STATE
            log.warning(
                "reservation %s of %s (request %s) was not settled within %.0f s; the cloud "
                "says %s, so it is %s",
                call.id,
                call.action,
                call.request_id,
                self._ttl_s,
                state or "nothing",
                "released" if never_ran else f"counted as spent (${usd(call.reserved_usd)})",
            )
            cost = None if never_ran else call.cost_usd
            await self._settle(_Pending(_reservation_of(call), cost))

    async def _ask_request_state(self, request_id: str) -> str | None:
        if self.request_state is None:
            return None
        try:
            return await self.request_state(request_id)
        except Exception as exc:  # no answer: the safe side is "it may have run"
            log.warning("could not ask the cloud about request %s: %r", request_id, exc)
            return None

    def _mark_unhealthy(self, reason: str) -> None:
        if self._healthy or reason != self._last_error:
            log.warning("cost ledger unreachable, cloud spend fails closed: %s", reason)
        self._healthy = False
        self._last_error = reason

    # -- the cheap flags (no I/O) ---------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def store_kind(self) -> str:
        return self._store.kind.value

    def month(self) -> str:
        """The current ledger month, 'YYYY-MM' in EVERREACH_TZ."""
        return month_of(self._clock(), self._tz)

    def current_totals(self) -> MonthTotals:
        """The last known totals of the current month (zero right after it rolled over)."""
        month = self.month()
        totals = self._totals
        return totals if totals is not None and totals.month == month else MonthTotals.empty(month)

    def is_soft_cap_reached(self) -> bool:
        """True at COST_SOFT_CAP (committed + reserved), or whenever the ledger is unhealthy."""
        return self.is_hard_cap_reached() or self.current_totals().total_usd >= self._soft_cap_usd

    def is_hard_cap_reached(self) -> bool:
        """True at MONTHLY_COST_CAP, with the budget closed, or with the ledger unhealthy."""
        return (
            not self._healthy
            or self.budget_closed()
            or self.current_totals().total_usd >= self._hard_cap_usd
        )

    def budget_closed(self) -> bool:
        """True once a call of this month cost more than it had reserved."""
        month = self.month()
        return any(call.month == month for call in self._overruns.values())

    def overruns(self) -> list[LoggedCall]:
        """This month's calls that cost more than they reserved."""
        month = self.month()
        return [call for call in self._overruns.values() if call.month == month]

    def cap_error(self) -> CostCapReached | None:
        """The error to answer with when no cloud spend is possible now, else None; no I/O."""
        if not self._healthy:
            return self._unreachable_error()
        if self.budget_closed():
            return self._closed_error()
        totals = self.current_totals()
        if totals.total_usd >= self._hard_cap_usd:
            return self._cap_error(totals, None, None)
        return None

    # -- reservations ---------------------------------------------------------------------------

    async def reserve(self, action: str, amount_usd: Decimal, request_id: str) -> Reservation:
        """Set ``amount_usd`` aside for one cloud call of ``action``, atomically in the ledger.

        Raises ``CostCapReached`` if it would pass MONTHLY_COST_CAP this month, or if the ledger
        is unreachable (fail closed). Amounts finer than a micro-dollar are rounded up.
        """
        amount = _money(amount_usd, "amount_usd")
        if not self._healthy:
            raise self._unreachable_error()
        if self.budget_closed():
            raise self._closed_error()
        now = self._clock()
        month = month_of(now, self._tz)
        reservation = Reservation(uuid.uuid4().hex, action, amount, request_id, month)
        try:
            result = await self._store.reserve(
                ReserveRequest(
                    reservation_id=reservation.id,
                    month=month,
                    action=action,
                    amount_usd=amount,
                    request_id=request_id,
                    cap_usd=self._hard_cap_usd,
                    now=now,
                    ttl_s=max(self._ttl_s, STORE_EXPIRY_S),
                )
            )
        except LedgerUnavailable as exc:
            self._mark_unhealthy(str(exc))
            raise self._unreachable_error() from exc
        self._apply(result.totals)
        if not result.accepted:
            raise self._cap_error(result.totals, action, amount)
        return reservation

    async def commit(self, reservation: Reservation, actual_usd: Decimal | None = None) -> None:
        """Record that the call ran, costing ``actual_usd`` (else the amount reserved).

        Never raises for an unreachable ledger: the commit is kept and retried by the refresh
        task, and the guard stays closed for new spend until it lands.
        """
        actual = reservation.amount_usd if actual_usd is None else _money(actual_usd, "actual_usd")
        await self._settle_or_queue(_Pending(reservation, actual))

    @asynccontextmanager
    async def spend(
        self, action: str, estimate_usd: Decimal, request_id: str
    ) -> AsyncIterator[Spend]:
        """Reserve ``estimate_usd`` for one call and settle it however the block is left.

        Raises ``CostCapReached`` (nothing reserved) if the cap does not allow it. On the way
        out: the cost given to ``spend.ran()``; else released for an ``ActionError`` proving
        the call never ran; else committed at the amount reserved (it may have run).
        """
        spend = Spend(self, await self.reserve(action, estimate_usd, request_id))
        try:
            yield spend
        except ActionError as exc:
            await spend.settle(never_ran=exc.never_ran)
            raise
        except BaseException as exc:
            if spend.reservation is not None and spend.cost_usd is None:
                log.warning(
                    "a %s call left its cost bracket with %s; its reservation of $%s counts "
                    "as spent (it may have run)",
                    action,
                    type(exc).__name__,
                    usd(spend.reservation.amount_usd),
                )
            await spend.settle(never_ran=False)
            raise
        await spend.settle(never_ran=False)

    def _note_overrun(self, call: LoggedCall) -> None:
        if call.id in self._overruns:
            return
        self._overruns[call.id] = call
        if call.month != self.month():
            return
        log.warning(
            "%s (request %s) cost $%s but reserved only $%s; recorded as it is, and the "
            "cloud budget of %s is closed: no further cloud calls this month",
            call.action,
            call.request_id,
            usd(call.cost_usd),
            usd(call.reserved_usd),
            call.month,
        )
        if self.on_overrun is not None:
            self.on_overrun()

    async def release(self, reservation: Reservation) -> None:
        """Give the money back: the call provably did not run. Retried later like commit."""
        await self._settle_or_queue(_Pending(reservation, None))

    async def _settle_or_queue(self, pending: _Pending) -> None:
        if not self._healthy:
            self._pending.append(pending)
            return
        try:
            await self._settle(pending)
        except LedgerUnavailable as exc:
            self._mark_unhealthy(str(exc))
            self._pending.append(pending)

    async def _settle(self, pending: _Pending) -> None:
        reservation, now = pending.reservation, self._clock()
        result = await self._store.settle(reservation.id, pending.actual_usd, now)
        if not result.found:
            log.error("cost ledger has no reservation %s (%s)", reservation.id, reservation.action)
        if result.late:
            log.warning(
                "reservation %s of %s expired before its commit; recorded anyway (a call took "
                "longer than the reservation TTL of %.0f s)",
                reservation.id,
                reservation.action,
                self._ttl_s,
            )
        if result.totals is not None:
            self._apply(result.totals)
        actual = pending.actual_usd
        if result.changed and actual is not None and actual > reservation.amount_usd:
            self._note_overrun(
                LoggedCall(
                    reservation.id,
                    reservation.month,
                    reservation.action,
                    reservation.request_id,
                    reservation.amount_usd,
                    actual,
                )
            )

    def _apply(self, totals: MonthTotals) -> None:
        if totals.month == self.month():
            self._totals = totals

    # -- reporting ----------------------------------------------------------------------------

    async def snapshot(self) -> dict[str, Any]:
        """Month-to-date spend for /status and /health; money as exact decimal strings."""
        by_action: dict[str, str] = {}
        reserved_by_action: dict[str, str] = {}
        month = self.month()
        if self._healthy:
            try:
                now = self._clock()
                self._apply(await self._store.totals(month, now))
                for action, spend in sorted((await self._store.by_action(month)).items()):
                    if spend.committed_usd:
                        by_action[action] = usd(spend.committed_usd)
                    if spend.reserved_usd:
                        reserved_by_action[action] = usd(spend.reserved_usd)
            except LedgerUnavailable as exc:
                self._mark_unhealthy(str(exc))
        totals = self.current_totals()
        remaining = max(self._hard_cap_usd - totals.total_usd, Decimal(0))
        return {
            "month": month,
            "timezone": str(self._tz),
            "spent_usd": usd(totals.committed_usd),
            "reserved_usd": usd(totals.reserved_usd),
            "remaining_usd": usd(remaining),
            "soft_cap_usd": usd(self._soft_cap_usd),
            "hard_cap_usd": usd(self._hard_cap_usd),
            "soft_cap_reached": self.is_soft_cap_reached(),
            "hard_cap_reached": self.is_hard_cap_reached(),
            "by_action": by_action,
            "reserved_by_action": reserved_by_action,
            "store": self._store.kind.value,
            "ledger": self._store.describe(),
            "healthy": self._healthy,
            "error": self._last_error,
            "pending_settlements": len(self._pending),
            "reservation_ttl_s": self._ttl_s,
            "budget_closed": self.budget_closed(),
            "overruns": [
                {
                    "action": call.action,
                    "request_id": call.request_id,
                    "reserved_usd": usd(call.reserved_usd),
                    "cost_usd": usd(call.cost_usd),
                }
                for call in self.overruns()
            ],
        }

    def _cap_error(
        self, totals: MonthTotals, action: str | None, amount: Decimal | None
    ) -> CostCapReached:
        asked = f" + ${usd(amount)} for {action}" if amount is not None else ""
        detail = (
            f"monthly cloud spend cap reached for {totals.month} ({self._tz}): "
            f"${usd(totals.committed_usd)} spent + ${usd(totals.reserved_usd)} reserved{asked} "
            f"would pass MONTHLY_COST_CAP ${usd(self._hard_cap_usd)}; raise MONTHLY_COST_CAP "
            f"or wait for the month to roll over on {_next_month(totals.month)}-01"
        )
        return CostCapReached(
            detail,
            month=totals.month,
            spent_usd=usd(totals.committed_usd),
            reserved_usd=usd(totals.reserved_usd),
            cap_usd=usd(self._hard_cap_usd),
        )

    def _closed_error(self) -> CostCapReached:
        totals = self.current_totals()
        worst = max(self.overruns(), key=lambda call: call.cost_usd - call.reserved_usd)
        return CostCapReached(
            f"the cloud budget of {totals.month} is closed: {worst.action} (request "
            f"{worst.request_id}) cost ${usd(worst.cost_usd)} but reserved only "
            f"${usd(worst.reserved_usd)}, so the reservations no longer bound the spend; check "
            f"COST_RATES_FILE against the cloud's prices, then wait for "
            f"{_next_month(totals.month)}-01 (the ledger keeps the month closed across restarts)",
            month=totals.month,
            spent_usd=usd(totals.committed_usd),
            reserved_usd=usd(totals.reserved_usd),
            cap_usd=usd(self._hard_cap_usd),
        )

    def _unreachable_error(self) -> CostCapReached:
        return CostCapReached(
            f"the cost ledger ({self._store.describe()}) is unreachable, so cloud spend fails "
            f"closed until it is back ({self._last_error}); actions with a local handler still "
            f"run locally",
            ledger_healthy=False,
        )


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

    async def settle(self, *, never_ran: bool) -> None:
        """Commit or release the reservation (once); ``CostGuard.spend`` calls this on exit."""
        reservation, self.reservation = self.reservation, None
        if reservation is None:
            return
        if self.cost_usd is not None:
            await self._guard.commit(reservation, self.cost_usd)
        elif never_ran:
            await self._guard.release(reservation)
        else:
            await self._guard.commit(reservation)


def _reservation_of(call: LoggedCall) -> Reservation:
    return Reservation(call.id, call.action, call.reserved_usd, call.request_id, call.month)


def _money(amount: Decimal | int | float | str, name: str) -> Decimal:
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
