"""The cost ledger's contract (``LedgerStore``, its value types) and the embedded SQLite store.

Three stores, one contract; each makes ``reserve`` atomic in the database itself:

- ``SqliteLedgerStore`` (here)     embedded default: ``BEGIN IMMEDIATE`` serialises writers, also
                                   several processes on one file; money as integer micro-dollars.
- ``PostgresLedgerStore``          ``DATABASE_URL`` / ``SUPABASE_DB_URL`` (cost_ledger_pg.py)
- ``SupabaseLedgerStore``          Supabase REST rpc (cost_ledger_pg.py)

SQLite is also a ``LeasingStore``: it settles calls carved from a budget lease (a reservation
row of ``LEASE_ACTION``) against that row; the other two keep one reservation per call.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from errors import EverReachError
from sqlite_file import GroupCommit, SqliteFile, Synchronous

if TYPE_CHECKING:
    pass

MICRO_USD = Decimal("0.000001")
# How long a settle queued behind (``settle_behind``) waits for another write to share its
# transaction: one request's round trip on loopback is ~2-3 ms, so the next call's reservation
# usually comes first. The reservation stays held meanwhile (the cap errs on the safe side).
SETTLE_LINGER_S = 0.005
# The same for a call carved from a budget lease: its money stays held by the lease row until
# the commit is written, and a process killed meanwhile leaves the lease to the sweep (counted
# as spent), so the commits of several calls can wait to share one transaction and one fsync.
LEASED_SETTLE_LINGER_S = 0.05

# The action of a budget lease's row in the log: no action name can take this form.
LEASE_ACTION = "(budget lease)"

_T = TypeVar("_T")


class StoreKind(StrEnum):
    """Which database holds the ledger."""

    SQLITE = "sqlite"
    POSTGRES = "postgres"
    SUPABASE = "supabase"


class LedgerUnavailable(EverReachError):
    """The ledger's database could not be reached or did not answer; spend fails closed.

    Never leaves CostGuard: it turns into an unhealthy guard and ``CostCapReached``.
    """


class LedgerSchemaMissing(LedgerUnavailable):
    """The database answers but lacks the ledger's tables or functions."""


class LedgerAccessDenied(LedgerUnavailable):
    """The database answers but refuses these credentials."""


def to_micro(amount_usd: Decimal) -> int:
    """Return whole micro-dollars, rounding a finer amount up (the cap errs on the safe side)."""
    return int(amount_usd.quantize(MICRO_USD, rounding=ROUND_CEILING) / MICRO_USD)


def from_micro(micro_usd: int) -> Decimal:
    return (Decimal(micro_usd) * MICRO_USD).quantize(MICRO_USD)


@dataclass(frozen=True, slots=True)
class MonthTotals:
    """Committed and reserved spend of one month ('YYYY-MM')."""

    month: str
    committed_usd: Decimal
    reserved_usd: Decimal

    @property
    def total_usd(self) -> Decimal:
        return self.committed_usd + self.reserved_usd

    @classmethod
    def empty(cls, month: str) -> MonthTotals:
        return cls(month, Decimal(0), Decimal(0))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MonthTotals:
        return cls(
            str(data["month"]), Decimal(data["committed_usd"]), Decimal(data["reserved_usd"])
        )


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    """One reservation to make: accepted only if the month stays within ``cap_usd``."""

    reservation_id: str
    month: str
    action: str
    amount_usd: Decimal
    request_id: str
    cap_usd: Decimal
    now: datetime
    ttl_s: float


@dataclass(frozen=True, slots=True)
class ReserveResult:
    accepted: bool
    totals: MonthTotals


@dataclass(frozen=True, slots=True)
class SettleResult:
    """Outcome of commit/release: ``late`` means the reservation had expired before commit."""

    found: bool
    changed: bool = False
    late: bool = False
    totals: MonthTotals | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SettleResult:
        if not data.get("found"):
            return cls(found=False)
        return cls(
            found=True,
            changed=bool(data.get("changed")),
            late=bool(data.get("late")),
            totals=MonthTotals.from_json(data),
        )


@dataclass(frozen=True, slots=True)
class LoggedCall:
    """One row of the ledger's log, as the guard's sweeps and reports see it."""

    id: str
    month: str
    action: str
    request_id: str
    reserved_usd: Decimal
    cost_usd: Decimal


@dataclass(frozen=True, slots=True)
class ActionSpend:
    committed_usd: Decimal
    reserved_usd: Decimal


class LedgerStore(Protocol):
    """What CostGuard needs from a database. Errors: ``LedgerUnavailable``, ``ConfigError``."""

    @property
    def kind(self) -> StoreKind: ...
    def describe(self) -> str: ...
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def heal(self) -> None: ...
    async def reserve(self, request: ReserveRequest) -> ReserveResult: ...
    async def settle(
        self, reservation_id: str, amount_usd: Decimal | None, now: datetime
    ) -> SettleResult: ...
    def settle_behind(
        self, reservation_id: str, amount_usd: Decimal | None, now: datetime
    ) -> Awaitable[SettleResult] | None:
        """``settle`` queued in the store's write order, to await later; None: not queueable."""
        ...

    async def totals(self, month: str, now: datetime) -> MonthTotals: ...
    async def by_action(self, month: str) -> dict[str, ActionSpend]: ...
    async def daily(self, month: str, day_starts: Sequence[datetime]) -> dict[int, Decimal]: ...
    async def overdue(self, created_before: datetime, limit: int) -> list[LoggedCall]: ...
    async def overruns(self, month: str) -> list[LoggedCall]: ...


@runtime_checkable
class LeasingStore(Protocol):
    """A ``LedgerStore`` that can hold budget leases (SQLite); others keep per-call reservations.

    A lease is a reservation row of ``LEASE_ACTION`` (``reserve``) that calls are carved from
    in memory. Both writes are queued in the store's write order; ``behind``: they may wait
    ``SETTLE_LINGER_S`` for another write to share the transaction.
    """

    def settle_leased(
        self, lease_id: str, call: LoggedCall, now: datetime, *, behind: bool
    ) -> Awaitable[SettleResult]:
        """Record ``call`` (carved from the lease) as committed at ``call.cost_usd``, and take
        ``call.reserved_usd`` off the lease's row: the month's reserved money shrinks by that,
        its committed grows by the cost, as a per-call commit does."""
        ...

    def give_back(
        self, lease_id: str, amount_usd: Decimal, now: datetime, *, behind: bool
    ) -> Awaitable[SettleResult]:
        """Release ``amount_usd`` of the lease's row (at most what it holds); a row left
        holding nothing is closed (released)."""
        ...


def _iso(moment: datetime) -> str:
    # One fixed UTC format, so SQLite can compare the text timestamps as strings.
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- SQLite ----------------------------------------------------------------------------------

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS actp_cost_log (
    id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    month TEXT NOT NULL,
    action TEXT NOT NULL,
    cost_micro_usd INTEGER NOT NULL CHECK (cost_micro_usd >= 0),
    cost_usd TEXT GENERATED ALWAYS AS
        (printf('%d.%06d', cost_micro_usd / 1000000, cost_micro_usd % 1000000)) VIRTUAL,
    reserved_micro_usd INTEGER NOT NULL CHECK (reserved_micro_usd >= 0),
    request_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('reserved', 'committed', 'released')),
    expires_at TEXT NOT NULL,
    expired INTEGER NOT NULL DEFAULT 0,
    settled_at TEXT
);
CREATE INDEX IF NOT EXISTS actp_cost_log_month_action ON actp_cost_log (month, action);
CREATE INDEX IF NOT EXISTS actp_cost_log_open
    ON actp_cost_log (month, expires_at) WHERE status = 'reserved';
CREATE TABLE IF NOT EXISTS actp_cost_month (
    month TEXT PRIMARY KEY,
    committed_micro_usd INTEGER NOT NULL DEFAULT 0,
    reserved_micro_usd INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT
);
"""


class SqliteLedgerStore:
    """The embedded ledger: one SQLite file in WAL mode, worked by one dedicated thread."""

    kind = StoreKind.SQLITE

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # FULL: a committed spend survives a power cut too, not only a killed process.
        self._file = SqliteFile(self.path, synchronous=Synchronous.FULL, name="cost-ledger")
        # Reservations and commits made at the same time share one transaction (one fsync).
        self._writes = GroupCommit(self._file)

    def describe(self) -> str:
        return f"SQLite file {self.path}"

    async def _run(self, fn: Callable[[sqlite3.Connection], _T], *, write: bool = False) -> _T:
        try:
            await self._writes.written()  # a settle that lingers is read as written
            return await (self._file.write(fn) if write else self._file.run(fn))
        except (sqlite3.Error, OSError, RuntimeError) as exc:  # RuntimeError: not open
            raise LedgerUnavailable(f"{self.describe()}: {exc}") from exc

    async def _write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` in a ``BEGIN IMMEDIATE`` transaction: one writer at a time, any process.

        The transaction is shared with the writes made at the same time (``GroupCommit``): each
        runs after the one before it, so every reservation checks the cap against all of them.
        """
        return await self._mapped(self._writes.submit(fn))

    async def _mapped(self, written: Awaitable[_T]) -> _T:
        try:
            return await written
        except (sqlite3.Error, OSError, RuntimeError) as exc:  # RuntimeError: not open
            raise LedgerUnavailable(f"{self.describe()}: {exc}") from exc

    async def open(self) -> None:
        try:
            await self._file.open(_SQLITE_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise LedgerUnavailable(f"{self.describe()}: {exc}") from exc

    async def close(self) -> None:
        await self._file.close()

    async def heal(self) -> None:
        return None

    @staticmethod
    def _month_row(conn: sqlite3.Connection, month: str) -> tuple[int, int]:
        row = conn.execute(
            "SELECT committed_micro_usd, reserved_micro_usd FROM actp_cost_month WHERE month = ?",
            (month,),
        ).fetchone()
        if row is None:
            conn.execute("INSERT INTO actp_cost_month (month) VALUES (?)", (month,))
            return 0, 0
        return int(row[0]), int(row[1])

    @staticmethod
    def _expire(conn: sqlite3.Connection, now_iso: str, month: str | None = None) -> None:
        where = "status = 'reserved' AND expires_at <= ?"
        args: tuple[str, ...] = (now_iso,)
        if month is not None:
            where, args = f"month = ? AND {where}", (month, now_iso)
        stale = conn.execute(
            f"SELECT month, SUM(cost_micro_usd) FROM actp_cost_log WHERE {where} GROUP BY month",
            args,
        ).fetchall()
        if not stale:
            return
        conn.execute(
            f"UPDATE actp_cost_log SET status = 'released', expired = 1, settled_at = ? "
            f"WHERE {where}",
            (now_iso, *args),
        )
        conn.executemany(
            "UPDATE actp_cost_month SET reserved_micro_usd = reserved_micro_usd - ?, "
            "updated_at = ? WHERE month = ?",
            [(int(total), now_iso, stale_month) for stale_month, total in stale],
        )

    @staticmethod
    def _totals(month: str, committed: int, reserved: int) -> MonthTotals:
        return MonthTotals(month, from_micro(committed), from_micro(reserved))

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        r = request
        amount, cap, now_iso = to_micro(r.amount_usd), to_micro(r.cap_usd), _iso(r.now)
        expires_iso = _iso(r.now + timedelta(seconds=r.ttl_s))
        month, reservation_id = r.month, r.reservation_id

        def work(conn: sqlite3.Connection) -> ReserveResult:
            self._month_row(conn, month)
            self._expire(conn, now_iso, month)
            committed, reserved = self._month_row(conn, month)
            row = conn.execute(
                "SELECT status FROM actp_cost_log WHERE id = ?", (reservation_id,)
            ).fetchone()
            if row is not None:
                return ReserveResult(row[0] != "released", self._totals(month, committed, reserved))
            if committed + reserved + amount > cap:
                return ReserveResult(False, self._totals(month, committed, reserved))
            conn.execute(
                "INSERT INTO actp_cost_log (id, created_at, month, action, cost_micro_usd, "
                "reserved_micro_usd, request_id, status, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'reserved', ?)",
                (
                    reservation_id,
                    now_iso,
                    month,
                    r.action,
                    amount,
                    amount,
                    r.request_id,
                    expires_iso,
                ),
            )
            reserved += amount
            conn.execute(
                "UPDATE actp_cost_month SET reserved_micro_usd = ?, updated_at = ? WHERE month = ?",
                (reserved, now_iso, month),
            )
            return ReserveResult(True, self._totals(month, committed, reserved))

        return await self._write(work)

    async def settle(
        self, reservation_id: str, amount_usd: Decimal | None, now: datetime
    ) -> SettleResult:
        """Commit (``amount_usd`` given) or release (None) one reservation."""
        return await self._write(self._settle_work(reservation_id, amount_usd, now))

    def settle_behind(
        self, reservation_id: str, amount_usd: Decimal | None, now: datetime
    ) -> Awaitable[SettleResult]:
        """``settle``, queued now (every later write and read comes after it), written with
        the next write of this instance or within ``SETTLE_LINGER_S``; await it for the result.

        At one call at a time, a call's commit then shares the next call's reservation
        transaction: one fsync and one thread hop fewer per call.
        """
        work = self._settle_work(reservation_id, amount_usd, now)
        return self._mapped(self._writes.submit(work, linger_s=SETTLE_LINGER_S))

    def _settle_work(
        self, reservation_id: str, amount_usd: Decimal | None, now: datetime
    ) -> Callable[[sqlite3.Connection], SettleResult]:
        now_iso = _iso(now)

        def work(conn: sqlite3.Connection) -> SettleResult:
            row = conn.execute(
                "SELECT month, status, cost_micro_usd FROM actp_cost_log WHERE id = ?",
                (reservation_id,),
            ).fetchone()
            if row is None:
                return SettleResult(found=False)
            month, status, cost = str(row[0]), str(row[1]), int(row[2])
            committed, reserved = self._month_row(conn, month)
            if status == "committed" or (amount_usd is None and status != "reserved"):
                return SettleResult(True, totals=self._totals(month, committed, reserved))
            if status == "reserved":
                reserved -= cost
            if amount_usd is None:
                conn.execute(
                    "UPDATE actp_cost_log SET status = 'released', settled_at = ? WHERE id = ?",
                    (now_iso, reservation_id),
                )
            else:
                actual = to_micro(amount_usd)
                committed += actual
                conn.execute(
                    "UPDATE actp_cost_log SET status = 'committed', cost_micro_usd = ?, "
                    "settled_at = ? WHERE id = ?",
                    (actual, now_iso, reservation_id),
                )
            conn.execute(
                "UPDATE actp_cost_month SET committed_micro_usd = ?, reserved_micro_usd = ?, "
                "updated_at = ? WHERE month = ?",
                (committed, reserved, now_iso, month),
            )
            late = amount_usd is not None and status == "released"
            return SettleResult(True, True, late, self._totals(month, committed, reserved))

        return work

    def settle_leased(
        self, lease_id: str, call: LoggedCall, now: datetime, *, behind: bool
    ) -> Awaitable[SettleResult]:
        """``LeasingStore.settle_leased``: one row inserted, the lease's row and the month's
        totals updated, in one transaction (shared with the writes made at the same time)."""
        now_iso, held, cost = _iso(now), to_micro(call.reserved_usd), to_micro(call.cost_usd)

        def work(conn: sqlite3.Connection) -> SettleResult:
            row = conn.execute(
                "SELECT month, status, cost_micro_usd FROM actp_cost_log WHERE id = ?", (lease_id,)
            ).fetchone()
            month = str(row[0]) if row is not None else call.month
            committed, reserved = self._month_row(conn, month)
            if conn.execute("SELECT 1 FROM actp_cost_log WHERE id = ?", (call.id,)).fetchone():
                return SettleResult(True, totals=self._totals(month, committed, reserved))
            # A lease swept as spent while its holder lived on (stalled past the TTL): the
            # call is recorded on top, the safe side, and said to be late.
            late = row is None or row[1] != "reserved"
            if not late:
                left = int(row[2]) - min(held, int(row[2]))
                reserved -= int(row[2]) - left
                self._set_lease(conn, lease_id, left, now_iso)
            committed += cost
            conn.execute(
                "INSERT INTO actp_cost_log (id, created_at, month, action, cost_micro_usd, "
                "reserved_micro_usd, request_id, status, expires_at, settled_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'committed', ?, ?)",
                (
                    call.id,
                    now_iso,
                    month,
                    call.action,
                    cost,
                    held,
                    call.request_id,
                    now_iso,
                    now_iso,
                ),
            )
            self._set_month(conn, month, committed, reserved, now_iso)
            return SettleResult(True, True, late, self._totals(month, committed, reserved))

        return self._queued(work, LEASED_SETTLE_LINGER_S if behind else 0.0)

    def give_back(
        self, lease_id: str, amount_usd: Decimal, now: datetime, *, behind: bool
    ) -> Awaitable[SettleResult]:
        """``LeasingStore.give_back``."""
        now_iso, amount = _iso(now), to_micro(amount_usd)

        def work(conn: sqlite3.Connection) -> SettleResult:
            row = conn.execute(
                "SELECT month, status, cost_micro_usd FROM actp_cost_log WHERE id = ?", (lease_id,)
            ).fetchone()
            if row is None:
                return SettleResult(found=False)
            month, status, holds = str(row[0]), str(row[1]), int(row[2])
            committed, reserved = self._month_row(conn, month)
            if status != "reserved":  # swept meanwhile: nothing left to give back
                return SettleResult(True, totals=self._totals(month, committed, reserved))
            given = min(amount, holds)
            reserved -= given
            self._set_lease(conn, lease_id, holds - given, now_iso)
            self._set_month(conn, month, committed, reserved, now_iso)
            return SettleResult(True, given > 0, False, self._totals(month, committed, reserved))

        return self._queued(work, SETTLE_LINGER_S if behind else 0.0)

    def _queued(
        self, work: Callable[[sqlite3.Connection], SettleResult], linger_s: float
    ) -> Awaitable[SettleResult]:
        return self._mapped(self._writes.submit(work, linger_s=linger_s))

    @staticmethod
    def _set_lease(conn: sqlite3.Connection, lease_id: str, holds: int, now_iso: str) -> None:
        # A lease row holding nothing is closed: released, so reports and sweeps pass it by.
        conn.execute(
            "UPDATE actp_cost_log SET cost_micro_usd = ?, "
            "status = CASE WHEN ? = 0 THEN 'released' ELSE status END, "
            "settled_at = CASE WHEN ? = 0 THEN ? ELSE settled_at END WHERE id = ?",
            (holds, holds, holds, now_iso, lease_id),
        )

    @staticmethod
    def _set_month(
        conn: sqlite3.Connection, month: str, committed: int, reserved: int, now_iso: str
    ) -> None:
        conn.execute(
            "UPDATE actp_cost_month SET committed_micro_usd = ?, reserved_micro_usd = ?, "
            "updated_at = ? WHERE month = ?",
            (committed, reserved, now_iso, month),
        )

    async def totals(self, month: str, now: datetime) -> MonthTotals:
        now_iso = _iso(now)

        def work(conn: sqlite3.Connection) -> MonthTotals:
            self._expire(conn, now_iso)
            row = conn.execute(
                "SELECT committed_micro_usd, reserved_micro_usd FROM actp_cost_month "
                "WHERE month = ?",
                (month,),
            ).fetchone()
            return self._totals(month, *(row if row else (0, 0)))

        return await self._write(work)

    async def by_action(self, month: str) -> dict[str, ActionSpend]:
        def work(conn: sqlite3.Connection) -> dict[str, ActionSpend]:
            rows = conn.execute(
                "SELECT action, "
                "SUM(CASE WHEN status = 'committed' THEN cost_micro_usd ELSE 0 END), "
                "SUM(CASE WHEN status = 'reserved' THEN cost_micro_usd ELSE 0 END) "
                "FROM actp_cost_log WHERE month = ? AND status <> 'released' GROUP BY action",
                (month,),
            ).fetchall()
            return {
                str(action): ActionSpend(from_micro(int(c)), from_micro(int(r)))
                for action, c, r in rows
            }

        return await self._run(work)

    async def daily(self, month: str, day_starts: Sequence[datetime]) -> dict[int, Decimal]:
        """Spend of ``month`` per day (committed + still reserved), in one query.

        ``day_starts`` are the instants the month's days start, then the next month's first:
        day ``n`` holds the calls made in ``[day_starts[n-1], day_starts[n])``. Days without
        spend are left out.
        """
        # One pass over the month's rows (its index): each row finds its day in a CASE ladder.
        stops = [_iso(stop) for stop in day_starts[1:]]
        if not stops:
            return {}
        ladder = " ".join(f"WHEN created_at < ? THEN {n}" for n in range(1, len(stops) + 1))
        sql = (
            f"SELECT CASE WHEN created_at < ? THEN 0 {ladder} ELSE 0 END AS day, "
            "SUM(cost_micro_usd) FROM actp_cost_log "
            "WHERE month = ? AND status <> 'released' GROUP BY day"
        )
        args = [_iso(day_starts[0]), *stops, month]

        def work(conn: sqlite3.Connection) -> dict[int, Decimal]:
            rows = conn.execute(sql, args)
            return {int(d): from_micro(int(micro)) for d, micro in rows if int(d) > 0}

        return await self._run(work)

    async def overdue(self, created_before: datetime, limit: int) -> list[LoggedCall]:
        """Reservations still open that were made before ``created_before``, oldest first."""
        return await self._logged(
            "status = 'reserved' AND created_at <= ? ORDER BY created_at LIMIT ?",
            (_iso(created_before), limit),
        )

    async def overruns(self, month: str) -> list[LoggedCall]:
        """Committed calls of ``month`` that cost more than was reserved for them."""
        return await self._logged(
            "month = ? AND status = 'committed' AND cost_micro_usd > reserved_micro_usd "
            "ORDER BY created_at",
            (month,),
        )

    async def _logged(self, where: str, args: tuple[Any, ...]) -> list[LoggedCall]:
        sql = (
            "SELECT id, month, action, request_id, reserved_micro_usd, cost_micro_usd "
            f"FROM actp_cost_log WHERE {where}"
        )

        def work(conn: sqlite3.Connection) -> list[LoggedCall]:
            return [
                LoggedCall(str(i), str(m), str(a), str(r), from_micro(int(res)), from_micro(int(c)))
                for i, m, a, r, res, c in conn.execute(sql, args).fetchall()
            ]

        return await self._run(work)
