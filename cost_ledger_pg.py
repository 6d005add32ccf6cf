"""PostgreSQL and Supabase REST ledger stores: the SQL functions of the migration, two transports.

- ``PostgresLedgerStore``  ``DATABASE_URL`` / ``SUPABASE_DB_URL``: runs the migration in
                           ``supabase/migrations/`` if it is missing, then calls its functions,
                           which lock the month's totals row (``SELECT ... FOR UPDATE``).
- ``SupabaseLedgerStore``  only the REST API: the same functions through ``supabase`` rpc; REST
                           cannot create them, so ``open()`` says which file to apply.

psycopg and supabase are imported inside the methods that use them, never at import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cost_ledger import (
    ActionSpend,
    LedgerAccessDenied,
    LedgerSchemaMissing,
    LedgerStore,
    LedgerUnavailable,
    LoggedCall,
    MonthTotals,
    ReserveRequest,
    ReserveResult,
    SettleResult,
    SqliteLedgerStore,
    StoreKind,
    from_micro,
    to_micro,
)
from errors import ConfigError

if TYPE_CHECKING:
    import httpx

    from config.hybrid_config import HybridConfig

SCHEMA_VERSION = 3  # 2: actp_cost_overdue, actp_cost_overruns; 3: actp_cost_daily
MIGRATION_FILE = "20260501000000_actp_cost_ledger.sql"
MIGRATION_NAME = f"supabase/migrations/{MIGRATION_FILE}"
LEDGER_FILENAME = "cost_ledger.sqlite3"


# -- the SQL functions of the migration, shared by PostgreSQL and Supabase REST -----------------


class _FunctionLedger:
    """A ledger whose logic lives in the migration's SQL functions; subclasses only transport."""

    async def _call(self, fn: str, params: dict[str, Any]) -> Any:
        raise NotImplementedError

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        data = await self._call(
            "actp_cost_reserve",
            {
                "p_id": request.reservation_id,
                "p_month": request.month,
                "p_action": request.action,
                "p_cost_usd": from_micro(to_micro(request.amount_usd)),
                "p_request_id": request.request_id,
                "p_cap_usd": from_micro(to_micro(request.cap_usd)),
                "p_now": request.now,
                "p_ttl_s": float(request.ttl_s),
            },
        )
        return ReserveResult(bool(data["accepted"]), MonthTotals.from_json(data))

    def settle_behind(self, reservation_id: str, amount_usd: Decimal | None, now: datetime) -> None:
        """Not queueable: a commit here is one round trip, waited for (``settle``)."""
        return None

    async def settle(
        self, reservation_id: str, amount_usd: Decimal | None, now: datetime
    ) -> SettleResult:
        cost = None if amount_usd is None else from_micro(to_micro(amount_usd))
        data = await self._call(
            "actp_cost_settle", {"p_id": reservation_id, "p_cost_usd": cost, "p_now": now}
        )
        return SettleResult.from_json(data)

    async def totals(self, month: str, now: datetime) -> MonthTotals:
        data = await self._call("actp_cost_totals", {"p_month": month, "p_now": now})
        return MonthTotals.from_json(data)

    async def overdue(self, created_before: datetime, limit: int) -> list[LoggedCall]:
        data = await self._call("actp_cost_overdue", {"p_before": created_before, "p_limit": limit})
        return [_logged_call(row) for row in data or []]

    async def overruns(self, month: str) -> list[LoggedCall]:
        data = await self._call("actp_cost_overruns", {"p_month": month})
        return [_logged_call(row) for row in data or []]

    async def by_action(self, month: str) -> dict[str, ActionSpend]:
        data = await self._call("actp_cost_by_action", {"p_month": month})
        return {
            str(action): ActionSpend(
                Decimal(spend.get("committed_usd") or 0), Decimal(spend.get("reserved_usd") or 0)
            )
            for action, spend in (data or {}).items()
        }

    async def daily(self, month: str, day_starts: Sequence[datetime]) -> dict[int, Decimal]:
        # Timestamps as ISO text: one parameter type for psycopg and for PostgREST's JSON.
        data = await self._call(
            "actp_cost_daily",
            {"p_month": month, "p_day_starts": [start.isoformat() for start in day_starts]},
        )
        days = len(day_starts) - 1
        return {
            int(day): Decimal(usd) for day, usd in (data or {}).items() if 1 <= int(day) <= days
        }


def _logged_call(row: dict[str, Any]) -> LoggedCall:
    return LoggedCall(
        str(row["id"]),
        str(row["month"]),
        str(row["action"]),
        str(row["request_id"]),
        Decimal(row["reserved_usd"]),
        Decimal(row["cost_usd"]),
    )


def read_migration() -> str:
    """Return the SQL of the ledger migration; ``ConfigError`` if the file is not there."""
    try:
        return (Path(__file__).parent / MIGRATION_NAME).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"the cost ledger migration {MIGRATION_NAME} is missing from this installation "
            f"({exc.strerror or exc})"
        ) from None


class PostgresLedgerStore(_FunctionLedger):
    """PostgreSQL through a psycopg 3 async pool; creates the schema if it is missing."""

    kind = StoreKind.POSTGRES

    def __init__(
        self,
        dsn: str,
        *,
        pool_max_size: int = 10,
        connect_timeout_s: float = 5.0,
        statement_timeout_s: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self._pool_max_size = pool_max_size
        self._connect_timeout_s = connect_timeout_s
        self._statement_timeout_s = statement_timeout_s
        self._pool: Any = None

    def describe(self) -> str:
        # Host, port and database only: the DSN may carry a password.
        from psycopg.conninfo import conninfo_to_dict

        try:
            info = conninfo_to_dict(self._dsn)
        except Exception:
            return "PostgreSQL"
        host, port = info.get("host", "localhost"), info.get("port", 5432)
        return f"PostgreSQL {host}:{port}/{info.get('dbname', '')}"

    async def _configure(self, conn: Any) -> None:
        await conn.execute(f"SET statement_timeout = {int(self._statement_timeout_s * 1000)}")

    async def open(self) -> None:
        if self._pool is not None:
            return
        import psycopg
        from psycopg_pool import AsyncConnectionPool, PoolTimeout

        pool = AsyncConnectionPool(
            self._dsn,
            min_size=1,
            max_size=self._pool_max_size,
            open=False,
            timeout=self._connect_timeout_s + self._statement_timeout_s,
            name="cost-ledger",
            configure=self._configure,
            kwargs={
                "autocommit": True,
                # No server-side prepared statements: they break behind PgBouncer/Supavisor in
                # transaction mode, and one function call plans in microseconds anyway.
                "prepare_threshold": None,
                "connect_timeout": max(1, round(self._connect_timeout_s)),
            },
        )
        try:
            await pool.open(wait=True, timeout=self._connect_timeout_s)
            self._pool = pool
            await self._ensure_schema()
        except (PoolTimeout, psycopg.OperationalError, LedgerUnavailable) as exc:
            self._pool = None
            await pool.close()
            raise LedgerUnavailable(f"{self.describe()}: {exc}") from exc
        except psycopg.Error as exc:
            self._pool = None
            await pool.close()
            raise ConfigError(
                f"cannot create the cost ledger in {self.describe()} (DATABASE_URL / "
                f"SUPABASE_DB_URL): {exc}; apply {MIGRATION_NAME} as a role that may"
            ) from exc
        except BaseException:  # ConfigError (no migration file), cancellation: no leaked pool
            self._pool = None
            await pool.close()
            raise

    async def _ensure_schema(self) -> None:
        try:
            version = int(await self._call("actp_cost_schema_version", {}))
        except LedgerSchemaMissing:
            version = 0
        if version >= SCHEMA_VERSION:
            return
        sql = read_migration()
        async with self._pool.connection() as conn, conn.transaction():
            # Several instances starting at once: one runs the DDL, the others wait for it.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('actp_cost_log schema'))")
            # No parameters: psycopg sends the whole file as one simple query.
            await conn.execute(sql.encode())

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def heal(self) -> None:
        """Drop dead pooled connections after an outage; re-create a dropped schema."""
        import psycopg

        if self._pool is None:
            return
        try:
            await self._pool.check()
            await self._ensure_schema()
        except psycopg.Error as exc:
            raise LedgerUnavailable(f"{self.describe()}: {exc}") from exc

    async def _call(self, fn: str, params: dict[str, Any]) -> Any:
        import psycopg
        from psycopg_pool import PoolTimeout

        if self._pool is None:
            raise LedgerUnavailable(f"the cost ledger ({self.describe()}) is not open")
        args = ", ".join(f"{name} => %({name})s" for name in params)
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(f"SELECT {fn}({args})", params)
                row = await cur.fetchone()
        except psycopg.errors.UndefinedFunction as exc:
            raise LedgerSchemaMissing(f"{self.describe()}: {exc}") from exc
        except (PoolTimeout, psycopg.Error) as exc:
            raise LedgerUnavailable(f"{self.describe()}: {exc}") from exc
        return row[0] if row else None


# PostgREST's answers that mean "the migration was not applied" or "this key may not".
_MISSING_CODES = frozenset({"PGRST202", "PGRST205", "42883", "42P01"})
_DENIED_CODES = frozenset({"PGRST301", "PGRST302", "42501"})


class SupabaseLedgerStore(_FunctionLedger):
    """Supabase over REST (PostgREST rpc) through the ``supabase`` client."""

    kind = StoreKind.SUPABASE

    def __init__(
        self,
        url: str,
        service_key: str,
        *,
        http_client: httpx.AsyncClient | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self._url = url
        self._key = service_key
        self._given_http = http_client
        self._own_http: httpx.AsyncClient | None = None
        self._timeout_s = timeout_s
        self._client: Any = None

    def describe(self) -> str:
        return f"Supabase {self._url}"

    async def open(self) -> None:
        if self._client is not None:
            return
        import httpx

        from supabase import AsyncClientOptions, acreate_client

        http = self._given_http
        if http is None:
            http = self._own_http = httpx.AsyncClient(timeout=httpx.Timeout(self._timeout_s))
        options = AsyncClientOptions(
            httpx_client=http,
            postgrest_client_timeout=self._timeout_s,
            auto_refresh_token=False,
            persist_session=False,
        )
        self._client = await acreate_client(self._url, self._key, options=options)
        try:
            version = int(await self._call("actp_cost_schema_version", {}))
        except LedgerSchemaMissing as exc:
            await self.close()
            raise ConfigError(
                f"the cost ledger is not set up in {self.describe()}: apply {MIGRATION_NAME} "
                f"(supabase db push, or paste it into the SQL editor) and restart ({exc})"
            ) from None
        except LedgerAccessDenied as exc:
            await self.close()
            raise ConfigError(
                f"{self.describe()} refused SUPABASE_SERVICE_KEY: it must be the project's "
                f"service_role key ({exc})"
            ) from None
        except LedgerUnavailable:
            await self.close()
            raise
        if version < SCHEMA_VERSION:
            await self.close()
            raise ConfigError(
                f"the cost ledger in {self.describe()} has schema version {version}, this "
                f"program needs {SCHEMA_VERSION}: apply {MIGRATION_NAME} and restart"
            )

    async def close(self) -> None:
        self._client = None
        own, self._own_http = self._own_http, None
        if own is not None:
            await own.aclose()

    async def heal(self) -> None:
        return None

    async def _call(self, fn: str, params: dict[str, Any]) -> Any:
        import httpx
        from postgrest.exceptions import APIError

        if self._client is None:
            raise LedgerUnavailable(f"the cost ledger ({self.describe()}) is not open")
        body = {
            name: (
                value.isoformat()
                if isinstance(value, datetime)
                else format(value, "f")
                if isinstance(value, Decimal)
                else value
            )
            for name, value in params.items()
        }
        try:
            response = await self._client.rpc(fn, body).execute()
        except APIError as exc:
            text = f"{self.describe()}: {fn}: {exc.code or ''} {exc.message or exc}".strip()
            if exc.code in _MISSING_CODES:
                raise LedgerSchemaMissing(text) from exc
            if exc.code in _DENIED_CODES:
                raise LedgerAccessDenied(text) from exc
            raise LedgerUnavailable(text) from exc
        except httpx.HTTPError as exc:
            raise LedgerUnavailable(f"{self.describe()}: {type(exc).__name__}: {exc}") from exc
        return response.data


def ledger_store_for(
    config: HybridConfig, *, http_client: httpx.AsyncClient | None = None
) -> LedgerStore:
    """The ledger store the configuration asks for (not opened yet).

    PostgreSQL if DATABASE_URL or SUPABASE_DB_URL is set; else Supabase REST if SUPABASE_URL
    and SUPABASE_SERVICE_KEY are; else SQLite at DATA_DIR/cost_ledger.sqlite3.
    """
    key = config.secret("supabase_service_key")
    if config.postgres_dsn:
        return PostgresLedgerStore(config.postgres_dsn)
    if config.supabase_url and key:
        return SupabaseLedgerStore(config.supabase_url, key, http_client=http_client)
    if config.supabase_url or key:
        missing = "SUPABASE_SERVICE_KEY" if config.supabase_url else "SUPABASE_URL"
        raise ConfigError(
            f"the Supabase cost ledger needs both SUPABASE_URL and SUPABASE_SERVICE_KEY; "
            f"{missing} is not set (or set DATABASE_URL / SUPABASE_DB_URL instead)"
        )
    return SqliteLedgerStore(config.data_dir / LEDGER_FILENAME)
