"""cost_ledger_pg: the PostgreSQL ledger store on the real server, the Supabase store's
refusals, and which store a configuration gets."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import psycopg
import pytest

from config.hybrid_config import HybridConfig
from cost_ledger import (
    ActionSpend,
    LedgerSchemaMissing,
    LedgerUnavailable,
    ReserveRequest,
    SqliteLedgerStore,
    StoreKind,
)
from cost_ledger_pg import (
    LEDGER_FILENAME,
    MIGRATION_NAME,
    SCHEMA_VERSION,
    PostgresLedgerStore,
    SupabaseLedgerStore,
    ledger_store_for,
    read_migration,
)
from errors import ConfigError
from tests.conftest import free_port

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
MONTH = "2026-03"

postgres = pytest.mark.postgres


@pytest.fixture
async def store(postgres_dsn: str) -> AsyncIterator[PostgresLedgerStore]:
    ledger = PostgresLedgerStore(postgres_dsn)
    await ledger.open()
    yield ledger
    await ledger.close()


def request(
    rid: str, amount: str, *, cap: str = "1.00", now: datetime = NOW, ttl_s: float = 60.0
) -> ReserveRequest:
    return ReserveRequest(
        rid, MONTH, "dm.send", Decimal(amount), f"req-{rid}", Decimal(cap), now, ttl_s
    )


# -- PostgresLedgerStore on the real server --------------------------------------------------


@postgres
async def test_open_creates_the_schema_at_the_current_version(
    store: PostgresLedgerStore, postgres_dsn: str
) -> None:
    assert store.kind is StoreKind.POSTGRES
    with psycopg.connect(postgres_dsn) as conn:
        row = conn.execute("SELECT actp_cost_schema_version()").fetchone()
    assert row is not None and row[0] == SCHEMA_VERSION
    await store.open()  # opening again is a no-op


@postgres
async def test_reserve_within_the_cap_then_refuse_past_it(store: PostgresLedgerStore) -> None:
    first = await store.reserve(request("a", "0.60"))
    assert first.accepted
    assert (first.totals.month, first.totals.reserved_usd) == (MONTH, Decimal("0.6"))
    second = await store.reserve(request("b", "0.50"))
    assert not second.accepted
    assert second.totals.reserved_usd == Decimal("0.6")  # nothing set aside for the refusal
    assert (await store.reserve(request("c", "0.40"))).accepted  # exactly up to the cap


@postgres
async def test_amounts_are_rounded_up_to_whole_micro_dollars(store: PostgresLedgerStore) -> None:
    result = await store.reserve(request("a", "0.0000001"))
    assert result.totals.reserved_usd == Decimal("0.000001")


@postgres
async def test_concurrent_reserves_never_pass_the_cap(store: PostgresLedgerStore) -> None:
    results = await asyncio.gather(*(store.reserve(request(f"r{i}", "0.07")) for i in range(40)))
    accepted = sum(r.accepted for r in results)
    assert accepted == 14  # 14 * 0.07 = 0.98; a 15th would pass 1.00
    totals = await store.totals(MONTH, NOW)
    assert totals.reserved_usd == Decimal("0.98") and totals.committed_usd == 0


@postgres
async def test_commit_and_release_are_settled_once(store: PostgresLedgerStore) -> None:
    await store.reserve(request("a", "0.50"))
    await store.reserve(request("b", "0.30"))
    committed = await store.settle("a", Decimal("0.20"), NOW)
    assert committed.found and committed.changed and not committed.late
    assert committed.totals is not None
    assert committed.totals.committed_usd == Decimal("0.2")
    assert committed.totals.reserved_usd == Decimal("0.3")
    again = await store.settle("a", Decimal("0.40"), NOW)
    assert again.found and not again.changed
    released = await store.settle("b", None, NOW)
    assert released.changed
    totals = await store.totals(MONTH, NOW)
    assert (totals.committed_usd, totals.reserved_usd) == (Decimal("0.2"), Decimal(0))
    assert not (await store.settle("nope", None, NOW)).found


@postgres
async def test_an_expired_reservation_frees_room_and_a_late_commit_is_marked(
    store: PostgresLedgerStore,
) -> None:
    await store.reserve(request("a", "0.90", ttl_s=1))
    later = NOW + timedelta(seconds=5)
    assert (await store.totals(MONTH, later)).reserved_usd == 0
    assert (await store.reserve(request("b", "0.90", now=later))).accepted
    late = await store.settle("a", Decimal("0.90"), later)
    assert late.found and late.late
    assert late.totals is not None and late.totals.committed_usd == Decimal("0.9")


@postgres
async def test_overdue_overruns_by_action_and_daily(store: PostgresLedgerStore) -> None:
    await store.reserve(request("a", "0.10"))
    await store.reserve(request("b", "0.20", now=NOW + timedelta(days=1)))
    await store.settle("a", Decimal("0.15"), NOW)  # cost more than it reserved: an overrun
    overdue = await store.overdue(NOW + timedelta(days=2), 10)
    assert [(c.id, c.request_id, c.reserved_usd) for c in overdue] == [
        ("b", "req-b", Decimal("0.2"))
    ]
    assert await store.overdue(NOW + timedelta(hours=1), 10) == []
    [overrun] = await store.overruns(MONTH)
    assert (overrun.id, overrun.reserved_usd, overrun.cost_usd) == (
        "a",
        Decimal("0.1"),
        Decimal("0.15"),
    )
    assert await store.overruns("2026-04") == []
    spend = await store.by_action(MONTH)
    assert spend == {"dm.send": ActionSpend(Decimal("0.15"), Decimal("0.2"))}
    starts = [datetime(2026, 3, day, tzinfo=UTC) for day in range(1, 32)]
    starts.append(datetime(2026, 4, 1, tzinfo=UTC))
    daily = await store.daily(MONTH, starts)
    assert daily == {15: Decimal("0.15"), 16: Decimal("0.2")}
    assert await store.by_action("2026-04") == {}


@postgres
async def test_stores_starting_together_create_the_schema_once(postgres_dsn: str) -> None:
    stores = [PostgresLedgerStore(postgres_dsn) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        results = await asyncio.gather(
            *(s.reserve(request(f"r{i}", "0.30")) for i, s in enumerate(stores))
        )
        assert sum(r.accepted for r in results) == 3
    finally:
        await asyncio.gather(*(s.close() for s in stores))


@postgres
async def test_heal_re_creates_a_dropped_schema(
    store: PostgresLedgerStore, postgres_dsn: str
) -> None:
    await store.reserve(request("a", "0.50"))
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:  # the database was reset
        row = conn.execute("SELECT current_schema()").fetchone()
        assert row is not None
        conn.execute(f'DROP SCHEMA "{row[0]}" CASCADE')
        conn.execute(f'CREATE SCHEMA "{row[0]}"')
    with pytest.raises(LedgerSchemaMissing, match="actp_cost_totals"):
        await store.totals(MONTH, NOW)
    await store.heal()
    totals = await store.totals(MONTH, NOW)
    assert (totals.month, totals.reserved_usd) == (MONTH, 0)


async def test_a_store_that_is_not_open_says_so() -> None:
    ledger = PostgresLedgerStore("postgresql://u:secret@db.example:6543/money")
    with pytest.raises(LedgerUnavailable, match=r"is not open") as caught:
        await ledger.totals(MONTH, NOW)
    assert "PostgreSQL db.example:6543/money" in str(caught.value)
    await ledger.heal()  # nothing to heal while closed
    await ledger.close()


def test_describe_shows_host_port_and_database_never_the_password() -> None:
    ledger = PostgresLedgerStore("postgresql://admin:hunter2@db.example:6543/money")
    assert ledger.describe() == "PostgreSQL db.example:6543/money"
    assert "hunter2" not in ledger.describe()
    assert PostgresLedgerStore("not a dsn at all =").describe() == "PostgreSQL"


async def test_an_unreachable_server_is_ledger_unavailable_and_leaks_no_pool() -> None:
    ledger = PostgresLedgerStore(
        f"postgresql://postgres@127.0.0.1:{free_port()}/test", connect_timeout_s=1
    )
    with pytest.raises(LedgerUnavailable, match=r"PostgreSQL 127\.0\.0\.1:\d+/test"):
        await ledger.open()
    with pytest.raises(LedgerUnavailable, match="is not open"):
        await ledger.totals(MONTH, NOW)


@postgres
async def test_a_role_that_may_not_create_the_schema_is_a_config_error(
    postgres_dsn: str,
) -> None:
    role = f"ledger_reader_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        schema = conn.execute("SELECT current_schema()").fetchone()
        assert schema is not None
        conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f'GRANT USAGE ON SCHEMA "{schema[0]}" TO {role}')
    try:
        dsn = postgres_dsn.replace("postgres@", f"{role}@", 1)
        with pytest.raises(ConfigError, match=r"cannot create the cost ledger") as caught:
            await PostgresLedgerStore(dsn).open()
        assert MIGRATION_NAME in str(caught.value)
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(f'REVOKE ALL ON SCHEMA "{schema[0]}" FROM {role}')
            conn.execute(f"DROP ROLE {role}")


def test_read_migration_returns_the_sql_of_the_functions() -> None:
    sql = read_migration()
    for fn in ("actp_cost_reserve", "actp_cost_settle", "actp_cost_schema_version"):
        assert fn in sql


# -- SupabaseLedgerStore: what PostgREST's refusals become ------------------------------------


def _postgrest(status: int, body: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.MockTransport(lambda _r: httpx.Response(status, json=body))
    )


@pytest.mark.parametrize(
    ("status", "body", "error", "message"),
    [
        (
            404,
            {"code": "PGRST202", "message": "Could not find the function"},
            ConfigError,
            rf"not set up in Supabase https://p\.supabase\.co: apply {MIGRATION_NAME}",
        ),
        (
            401,
            {"code": "42501", "message": "permission denied"},
            ConfigError,
            "refused SUPABASE_SERVICE_KEY: it must be the project's service_role key",
        ),
        (200, 2, ConfigError, f"schema version 2, this program needs {SCHEMA_VERSION}"),
        (503, {"code": "PGRST000", "message": "db down"}, LedgerUnavailable, "db down"),
    ],
)
async def test_supabase_open_explains_what_is_wrong(
    status: int, body: object, error: type[Exception], message: str
) -> None:
    async with _postgrest(status, body) as http:
        ledger = SupabaseLedgerStore("https://p.supabase.co", "key", http_client=http)
        with pytest.raises(error, match=message):
            await ledger.open()
        with pytest.raises(LedgerUnavailable, match="is not open"):
            await ledger.totals(MONTH, NOW)
        assert not http.is_closed  # a borrowed client is its owner's to close


# -- ledger_store_for ------------------------------------------------------------------------


def test_database_url_picks_postgres(tmp_path: Path) -> None:
    config = HybridConfig.from_mapping(
        {"DATABASE_URL": "postgresql://u:p@h:5/db", "DATA_DIR": str(tmp_path)}
    )
    chosen = ledger_store_for(config)
    assert isinstance(chosen, PostgresLedgerStore)
    assert chosen.describe() == "PostgreSQL h:5/db"


def test_supabase_url_and_key_pick_supabase_rest(tmp_path: Path) -> None:
    config = HybridConfig.from_mapping(
        {
            "SUPABASE_URL": "https://p.supabase.co",
            "SUPABASE_SERVICE_KEY": "k",
            "DATA_DIR": str(tmp_path),
        }
    )
    chosen = ledger_store_for(config)
    assert isinstance(chosen, SupabaseLedgerStore)
    assert chosen.describe() == "Supabase https://p.supabase.co"


def test_nothing_configured_picks_sqlite_in_data_dir(tmp_path: Path) -> None:
    chosen = ledger_store_for(HybridConfig.from_mapping({"DATA_DIR": str(tmp_path)}))
    assert isinstance(chosen, SqliteLedgerStore)
    assert str(tmp_path / LEDGER_FILENAME) in chosen.describe()


@pytest.mark.parametrize(
    ("values", "missing"),
    [
        ({"SUPABASE_URL": "https://p.supabase.co"}, "SUPABASE_SERVICE_KEY is not set"),
        ({"SUPABASE_SERVICE_KEY": "k"}, "SUPABASE_URL is not set"),
    ],
)
def test_half_a_supabase_configuration_is_refused(
    tmp_path: Path, values: dict[str, str], missing: str
) -> None:
    config = HybridConfig.from_mapping({**values, "DATA_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match=missing) as caught:
        ledger_store_for(config)
    assert "needs both SUPABASE_URL and SUPABASE_SERVICE_KEY" in str(caught.value)
