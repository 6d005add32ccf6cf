"""CostGuard: the monthly cloud spend cap, enforced by atomic reservations in a shared ledger.

Every cloud call runs inside one bracket, ``async with guard.spend(action, estimate_usd, key)
as spend:``, which settles the reservation on every way out (``cost_reservation.Spend``). The
bare ``reserve``/``commit``/``release`` remain for the ledger's own tests and tools.

A reservation nobody settled (the process died between the call and its commit) is not simply
given back: after ``reservation_ttl_s`` the background sweep asks the cloud, by idempotency key,
whether the request ever ran (``request_state``); only "unknown" releases it, anything else, or
no answer, commits it as spent. A call that cost more than it reserved is recorded as it is and
closes the month's budget: no further reservation is accepted until the month rolls over.

The router's calls (``spend(..., commit_behind=True)``) on a store that can lease (SQLite,
``LeasingStore``) are carved in memory from a budget lease: a block of at most ``lease_calls``
calls' worth reserved in the ledger as one row, renewed before it runs out and given back when
idle, on ``snapshot`` and on ``close``; near the cap they reserve one by one again. A lease whose
process died is counted as spent by the sweep (its calls are not in the ledger to ask about).

``reserve`` succeeds only if the month's committed + reserved + amount stays within the hard
cap, decided atomically by the database (``cost_ledger``), so several instances sharing one
PostgreSQL ledger never pass the cap together. ``is_soft_cap_reached`` / ``is_hard_cap_reached``
read in-memory totals (no I/O, cheap on every route) refreshed from each reserve/commit answer
and by a background task every few seconds. If the ledger cannot be reached the guard fails
closed: the flags say "cap reached" (route local) and ``reserve`` raises ``CostCapReached``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import ROUND_FLOOR, Decimal
from typing import TYPE_CHECKING, Any

from cost_ledger import (
    LEASE_ACTION,
    MICRO_USD,
    LeasingStore,
    LedgerStore,
    LedgerUnavailable,
    LoggedCall,
    MonthTotals,
    ReserveRequest,
    SettleResult,
)
from cost_ledger_pg import ledger_store_for
from cost_report import read_report
from cost_reservation import (
    BudgetLease,
    LedgerMonth,
    RequestState,
    Reservation,
    Spend,
    budget_closed,
    cap_reached,
    ledger_unreachable,
    left_without_running,
    log_overrun,
    money,
    month_of,
    overdue_verdicts,
    overrun_report,
    usd,
)
from envelope import new_request_id
from errors import ConfigError, CostCapReached

__all__ = ["CostGuard", "Reservation", "Spend", "month_of", "usd"]

if TYPE_CHECKING:
    import httpx

    from config.hybrid_config import HybridConfig

log = logging.getLogger(__name__)

_NOT_OPENED = "not opened yet"
# The store's own expiry (which releases) is only a backstop past any month's end: within the
# month an unsettled reservation is resolved by the guard's sweep, which asks the cloud first.
STORE_EXPIRY_S = 40 * 86400.0
SWEEP_BATCH = 20  # asked of the cloud together, once per refresh pass
# Budget leases (``spend(commit_behind=True)`` on a ``LeasingStore``): a lease is this many
# calls' worth (or as many as wait for it and are in flight, if more), and at most this share
# of what remains under the cap; below two calls' worth the calls reserve one by one, so the
# last cents are shared exactly.
LEASE_CALLS = 16
LEASE_SHARE = Decimal("0.01")
LEASE_IDLE_S = 10.0  # unused this long: given back by the refresh task
LEASE_MAX_AGE_S = 60.0  # then the next one is taken: a live lease is never old enough to sweep
LEASE_TRIES = 4  # leases a call waits for (others may carve each first) before reserving alone


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
        lease_calls: int = LEASE_CALLS,
        lease_share: Decimal = LEASE_SHARE,
        lease_idle_s: float = LEASE_IDLE_S,
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
        self._month_of = LedgerMonth(tz)
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
        self.on_totals: Callable[[MonthTotals], None] | None = None  # each fresh total (no I/O)
        self._behind: set[asyncio.Future[Any]] = set()  # commits queued, not yet written
        # Budget leases: only on a store that can hold them, and only with lease_calls >= 2.
        self._lease_store = store if lease_calls >= 2 and isinstance(store, LeasingStore) else None
        self._lease_calls = lease_calls
        self._lease_share = Decimal(lease_share)
        self._lease_idle = timedelta(seconds=lease_idle_s)
        self._lease_max_age = timedelta(seconds=min(LEASE_MAX_AGE_S, reservation_ttl_s / 4))
        self._lease: BudgetLease | None = None  # the one new calls are carved from
        self._leases: dict[str, BudgetLease] = {}  # held: that one and retired ones in use
        self._leasing: asyncio.Future[BudgetLease | None] | None = None  # a lease being taken
        self._lease_waiters = 0  # calls waiting for the lease being taken
        self._owed: list[tuple[str, Decimal]] = []  # give-backs the ledger could not take yet

    @classmethod
    def from_config(
        cls, config: HybridConfig, *, http_client: httpx.AsyncClient | None = None
    ) -> CostGuard:
        """Build the guard the configuration asks for (not opened yet).

        Store: PostgreSQL if DATABASE_URL or SUPABASE_DB_URL is set; else Supabase REST if
        SUPABASE_URL and SUPABASE_SERVICE_KEY are; else SQLite at DATA_DIR/cost_ledger.sqlite3.
        ``http_client`` (the app's shared client) carries Supabase REST calls if given.
        """
        store = ledger_store_for(config, http_client=http_client)
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
        if self._leasing is not None:
            await asyncio.wait([self._leasing])
        for lease in list(self._leases.values()):
            self._retire(lease)  # the unused part goes back to the month
        await self._behind_written()
        if self._store_open:
            await self._drain_before_close()
            self._store_open = False
            await self._store.close()
        self._healthy = False
        self._last_error = _NOT_OPENED

    async def _drain_before_close(self) -> None:
        """Last try at commits/releases the ledger could not take; say loudly what is lost."""
        try:
            await self._pay_back()
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
            await self._behind_written()
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
            await self._pay_back()
            while self._pending:
                await self._settle(self._pending[0])
                self._pending.pop(0)
            if sweep:
                self._retire_stale()
                await self._sweep_overdue()
            now = self._clock()
            month = self._month_of(now)
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
        """Settle reservations older than the TTL: their process died before settling them."""
        before = self._clock() - timedelta(seconds=self._ttl_s)
        overdue = [  # our own leases are live (a fake clock may jump past their TTL)
            call
            for call in await self._store.overdue(before, SWEEP_BATCH)
            if call.id not in self._leases
        ]
        for reservation, cost in await overdue_verdicts(overdue, self.request_state, self._ttl_s):
            await self._settle(_Pending(reservation, cost))

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
        return self._month_of(self._clock())

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
        if not self._overruns:
            return False
        month = self.month()
        return any(call.month == month for call in self._overruns.values())

    def overruns(self) -> list[LoggedCall]:
        """This month's calls that cost more than they reserved."""
        month = self.month()
        return [call for call in self._overruns.values() if call.month == month]

    def cap_error(self) -> CostCapReached | None:
        """The error to answer with when no cloud spend is possible now, else None; no I/O."""
        if not self._healthy:
            return ledger_unreachable(self._store.describe(), self._last_error)
        if self.budget_closed():
            return budget_closed(self.current_totals(), self.overruns(), self._hard_cap_usd)
        totals = self.current_totals()
        if totals.total_usd >= self._hard_cap_usd:
            return cap_reached(totals, self._hard_cap_usd, self._tz)
        return None

    # -- reservations ---------------------------------------------------------------------------

    async def reserve(self, action: str, amount_usd: Decimal, request_id: str) -> Reservation:
        """Set ``amount_usd`` aside for one cloud call of ``action``, atomically in the ledger.

        Raises ``CostCapReached`` if it would pass MONTHLY_COST_CAP this month, or if the ledger
        is unreachable (fail closed). Amounts finer than a micro-dollar are rounded up.
        """
        amount = money(amount_usd, "amount_usd")
        if not self._healthy:
            raise ledger_unreachable(self._store.describe(), self._last_error)
        if self.budget_closed():
            raise budget_closed(self.current_totals(), self.overruns(), self._hard_cap_usd)
        now = self._clock()
        month = self._month_of(now)
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
            raise ledger_unreachable(self._store.describe(), self._last_error) from exc
        self._apply(result.totals)
        if not result.accepted:
            raise cap_reached(result.totals, self._hard_cap_usd, self._tz, action, amount)
        return reservation

    async def commit(self, reservation: Reservation, actual_usd: Decimal | None = None) -> None:
        """Record that the call ran, costing ``actual_usd`` (else the amount reserved).

        Never raises for an unreachable ledger: the commit is kept and retried by the refresh
        task, and the guard stays closed for new spend until it lands.
        """
        actual = reservation.amount_usd if actual_usd is None else money(actual_usd, "actual_usd")
        if reservation.lease_id is not None:
            self._lease_done(reservation, spent=True)
        await self._settle_or_queue(_Pending(reservation, actual))

    @asynccontextmanager
    async def spend(
        self, action: str, estimate_usd: Decimal, request_id: str, *, commit_behind: bool = False
    ) -> AsyncIterator[Spend]:
        """Reserve ``estimate_usd`` for one call and settle it however the block is left.

        Raises ``CostCapReached`` (nothing reserved) if the cap does not allow it; see
        ``Spend.take`` for what the reservation is settled at on the way out.
        ``commit_behind``: a commit within the amount reserved is queued in the ledger on the
        way out but not waited for (``_commit_behind``); releases and overruns are waited for.
        """
        reserve = self._reserve_leased if commit_behind and self._lease_store else self.reserve
        spend = Spend(self, await reserve(action, estimate_usd, request_id))
        never_ran = False
        try:
            yield spend
        except BaseException as exc:
            never_ran = left_without_running(spend, exc)
            raise
        finally:
            settlement = spend.take(never_ran=never_ran)
            if settlement is not None:
                reservation, cost = settlement  # cost None: released
                if cost is None:
                    await self.release(reservation)
                elif commit_behind:
                    await self._commit_behind(reservation, money(cost, "actual_usd"))
                else:
                    await self.commit(reservation, cost)

    # -- budget leases ---------------------------------------------------------------------

    async def _reserve_leased(
        self, action: str, amount_usd: Decimal, request_id: str
    ) -> Reservation:
        """``reserve``, carved in memory from this instance's budget lease where one fits.

        Without one, a lease is taken (one reservation in the ledger, shared by the callers
        that wait for it); when none can be (the cap is near, the ledger refuses or fails), the
        unused part of the current lease is given back and the call reserves on its own.
        """
        amount = money(amount_usd, "amount_usd")
        for _ in range(LEASE_TRIES):
            if not self._healthy or self.budget_closed():
                break
            now = self._clock()
            month = self._month_of(now)
            lease = self._lease
            if lease is not None and lease.fits(amount, month, now, self._lease_max_age):
                lease.carve(amount, now)
                if lease.unused_usd * 4 < lease.size_usd:  # renewed before it runs out
                    self._next_lease(amount)
                return Reservation(new_request_id(), action, amount, request_id, month, lease.id)
            # Another caller may carve the new lease first: then wait for the next one.
            self._lease_waiters += 1  # the lease taken next is sized for all who wait
            try:
                taken = await asyncio.shield(self._next_lease(amount))
            finally:
                self._lease_waiters -= 1
            if taken is None:
                if self._lease is not None:  # queued before the reservation: its money is free
                    self._retire(self._lease)
                break
        return await self.reserve(action, amount, request_id)

    def _next_lease(self, amount: Decimal) -> asyncio.Future[BudgetLease | None]:
        """The lease being taken, or a new one taken for calls of ``amount``."""
        if self._leasing is None:
            task = asyncio.ensure_future(self._take_lease(amount))
            self._leasing = task

            def taken(_: asyncio.Future[BudgetLease | None]) -> None:
                if self._leasing is task:
                    self._leasing = None

            task.add_done_callback(taken)
        return self._leasing

    def _lease_size(self, amount: Decimal) -> Decimal | None:
        """``lease_calls`` calls' worth, or as many as wait for it and are in flight if more
        (a burst of a /batch takes one lease, not one after another), at most ``lease_share``
        of what remains; None: too little remains for two calls' worth (or they cost nothing)."""
        remaining = self._hard_cap_usd - self.current_totals().total_usd
        share = (remaining * self._lease_share).quantize(MICRO_USD, rounding=ROUND_FLOOR)
        in_flight = sum(lease.calls for lease in self._leases.values())
        calls = max(self._lease_calls, self._lease_waiters + in_flight)
        size = min(amount * calls, share)
        return size if amount > 0 and size >= 2 * amount else None

    async def _take_lease(self, amount: Decimal) -> BudgetLease | None:
        size = self._lease_size(amount)
        if size is None or self._closed:
            return None
        now = self._clock()
        month = self._month_of(now)
        lease_id = uuid.uuid4().hex
        request = ReserveRequest(
            reservation_id=lease_id,
            month=month,
            action=LEASE_ACTION,
            amount_usd=size,
            request_id=f"lease-{lease_id}",
            cap_usd=self._hard_cap_usd,
            now=now,
            ttl_s=max(self._ttl_s, STORE_EXPIRY_S),
        )
        try:
            result = await self._store.reserve(request)
        except LedgerUnavailable as exc:
            self._mark_unhealthy(str(exc))
            return None
        self._apply(result.totals)
        if not result.accepted:
            return None
        lease = BudgetLease(lease_id, month, now, size, size)
        self._leases[lease_id] = lease
        if self._closed:  # closed while it was being taken
            self._retire(lease)
            return None
        old, self._lease = self._lease, lease
        if old is not None:
            self._retire(old)
        return lease

    def _retire(self, lease: BudgetLease) -> None:
        """No new calls from ``lease``; give back its unused part (all of it once no call of
        it is in flight). Queued behind, in the ledger's write order."""
        if self._lease is lease:
            self._lease = None
        lease.retired = True
        given = lease.unused_usd
        lease.held_usd -= given
        if lease.calls == 0:
            self._leases.pop(lease.id, None)
        if given > 0:
            self._give_back(lease.id, given)

    def _lease_done(self, reservation: Reservation, *, spent: bool) -> None:
        """A call carved from a lease is settled (committed if ``spent``, else released)."""
        lease = self._leases.get(reservation.lease_id or "")
        if lease is None:
            log.error("no budget lease %s for %s", reservation.lease_id, reservation.id)
            return
        lease.drop(reservation.amount_usd, spent=spent)
        if lease.retired and lease.calls == 0:
            self._retire(lease)

    def _retire_stale(self) -> None:
        """The refresh task's turn: give back a lease idle, too old, or of a past month."""
        lease, now = self._lease, self._clock()
        if lease is not None and (
            now - (lease.used_at or lease.taken_at) >= self._lease_idle
            or now - lease.taken_at >= self._lease_max_age
            or lease.month != self._month_of(now)
        ):
            self._retire(lease)

    def _give_back(self, lease_id: str, amount: Decimal) -> None:
        if self._lease_store is None or not self._store_open:
            self._owed.append((lease_id, amount))
            return
        self._written_behind(
            self._lease_store.give_back(lease_id, amount, self._clock(), behind=True),
            done=self._applied,
            again=functools.partial(self._owed.append, (lease_id, amount)),
        )

    def _applied(self, result: SettleResult) -> None:
        if result.totals is not None:
            self._apply(result.totals)

    async def _pay_back(self) -> None:
        """Give-backs the ledger could not take before (a lease holds that money meanwhile)."""
        while self._owed and self._lease_store is not None:
            lease_id, amount = self._owed[0]
            result = await self._lease_store.give_back(
                lease_id, amount, self._clock(), behind=False
            )
            if result.totals is not None:
                self._apply(result.totals)
            self._owed.pop(0)

    def _note_overrun(self, call: LoggedCall) -> None:
        if call.id in self._overruns:
            return
        self._overruns[call.id] = call
        if call.month != self.month():
            return
        log_overrun(call)
        if self.on_overrun is not None:
            self.on_overrun()

    async def release(self, reservation: Reservation) -> None:
        """Give the money back: the call provably did not run. Retried later like commit."""
        if reservation.lease_id is not None:  # back to its lease, in memory
            self._lease_done(reservation, spent=False)
            return
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

    async def _commit_behind(self, reservation: Reservation, actual: Decimal) -> None:
        """Commit ``actual`` without waiting for the ledger, where that cannot pass the cap.

        The reservation keeps its money until the commit is written (a few ms, or with the
        next call's reservation: ``SqliteLedgerStore.settle_behind``), and every later write
        and read of the ledger comes after it. An overrun (it closes the budget), an unhealthy
        ledger or a store that cannot queue the commit take the waited path.
        """
        pending = _Pending(reservation, actual)
        if reservation.lease_id is not None:
            self._lease_done(reservation, spent=True)
        if not self._healthy or actual > reservation.amount_usd:
            written = None
        elif reservation.lease_id is not None and self._lease_store is not None:
            written = self._lease_store.settle_leased(
                reservation.lease_id, reservation.logged(actual), self._clock(), behind=True
            )
        else:
            written = self._store.settle_behind(reservation.id, actual, self._clock())
        if written is None:  # SQLite queues a commit; PostgreSQL and Supabase do not
            await self._settle_or_queue(pending)
            return
        self._written_behind(
            written,
            done=functools.partial(self._settled, pending),
            again=functools.partial(self._pending.append, pending),  # then as a waited commit
        )

    def _written_behind(
        self,
        written: Awaitable[SettleResult],
        *,
        done: Callable[[SettleResult], None],
        again: Callable[[], None],
    ) -> None:
        """Follow a write queued in the ledger without waiting for it: ``done`` with its
        result; if the ledger could not take it, ``again`` (the refresh task retries it)."""
        future = asyncio.ensure_future(written)  # the ledger's own future: no task is made
        self._behind.add(future)

        def finish(_: asyncio.Future[SettleResult]) -> None:
            self._behind.discard(future)
            if future.cancelled():
                return
            exc = future.exception()
            if isinstance(exc, LedgerUnavailable):
                self._mark_unhealthy(str(exc))
                again()
            elif exc is not None:
                log.error("a write queued behind in the cost ledger failed: %r", exc, exc_info=exc)
            else:
                done(future.result())

        future.add_done_callback(finish)

    async def _behind_written(self) -> None:
        """Wait for the commits queued behind (before reading totals, reports or closing)."""
        while self._behind:
            await asyncio.wait(list(self._behind))

    async def _settle(self, pending: _Pending) -> None:
        reservation, now, actual = pending.reservation, self._clock(), pending.actual_usd
        if reservation.lease_id is None:
            result = await self._store.settle(reservation.id, actual, now)
        elif actual is None or self._lease_store is None:  # released in memory already
            return
        else:
            call = reservation.logged(actual)
            result = await self._lease_store.settle_leased(
                reservation.lease_id, call, now, behind=False
            )
        self._settled(pending, result)

    def _settled(self, pending: _Pending, result: SettleResult) -> None:
        reservation = pending.reservation
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
            self._note_overrun(reservation.logged(actual))

    def _apply(self, totals: MonthTotals) -> None:
        if totals.month == self.month():
            self._totals = totals
            if self.on_totals is not None:
                self.on_totals(totals)

    # -- reporting ----------------------------------------------------------------------------

    async def snapshot(self) -> dict[str, Any]:
        """Month-to-date spend for /status and /health; money as exact decimal strings.

        This instance's lease is given back first, so ``reserved_usd`` is the money of calls
        in flight (and other instances' leases), not budget merely set aside here.
        """
        if self._lease is not None:
            self._retire(self._lease)
        await self._behind_written()
        now = self._clock()
        month = self._month_of(now)
        ledger = None  # by action and the forecast: none while the ledger is unreachable
        if self._healthy:
            try:
                self._apply(await self._store.totals(month, now))
                ledger = await read_report(
                    self._store,
                    month,
                    now,
                    self._tz,
                    soft_cap_usd=self._soft_cap_usd,
                    hard_cap_usd=self._hard_cap_usd,
                )
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
            "by_action": ledger.by_action if ledger else {},
            "reserved_by_action": ledger.reserved_by_action if ledger else {},
            "store": self._store.kind.value,
            "ledger": self._store.describe(),
            "healthy": self._healthy,
            "error": self._last_error,
            "pending_settlements": len(self._pending),
            "reservation_ttl_s": self._ttl_s,
            "budget_closed": self.budget_closed(),
            "overruns": [overrun_report(call) for call in self.overruns()],
            "forecast": ledger.forecast if ledger else None,
        }
