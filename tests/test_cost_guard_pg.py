"""CostGuard on the real PostgreSQL server, and through Supabase REST.

No Supabase (PostgREST) server can run here, so the Supabase store is tested with the real
``supabase`` client whose HTTP goes to a small stand-in for PostgREST's ``/rest/v1/rpc/{fn}``
(an ``httpx.MockTransport``) that calls the same SQL function on the real PostgreSQL and answers
with PostgREST's status codes and error bodies. The migration's functions, the client and the
store are real; PostgREST's own routing and auth are what is imitated.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import psycopg
import pytest

from cost_ledger import MonthTotals
from cost_ledger_pg import (
    MIGRATION_NAME,
    PostgresLedgerStore,
    SupabaseLedgerStore,
    read_migration,
)
from errors import ConfigError, CostCapReached
from tests.test_cost_guard import (
    CAP,
    CENT,
    FakeClock,
    WatchedStore,
    Worker,
    assert_march_forecast,
    burst,
    cloud_never_saw_it,
    forecast_scenario,
    kill_between_reserve_and_commit,
    never_ran_sweep,
    opened,
    overrun_seen_by_another,
    run_two_process_burst,
    spend,
    start_worker,
)

pytestmark = [pytest.mark.prd200, pytest.mark.postgres]
__all__ = ["start_worker"]  # the fixture, re-used from the SQLite tests

SERVICE_KEY = "service-role-key-for-tests"


def ledger_rows(dsn: str) -> dict[str, Decimal]:
    """Sum the log by status and read the totals row: the database's own view."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT status, coalesce(sum(cost_usd), 0) FROM actp_cost_log GROUP BY status"
        ).fetchall()
        month = conn.execute(
            "SELECT coalesce(sum(committed_usd), 0), coalesce(sum(reserved_usd), 0) "
            "FROM actp_cost_month"
        ).fetchone()
    sums = {str(status): Decimal(total) for status, total in rows}
    assert month is not None
    sums["month_committed"], sums["month_reserved"] = Decimal(month[0]), Decimal(month[1])
    return sums


async def test_schema_is_created_with_numeric_money(postgres_dsn: str) -> None:
    async with opened(PostgresLedgerStore(postgres_dsn)) as guard:
        assert guard.healthy
    with psycopg.connect(postgres_dsn) as conn:
        types: dict[str, str] = dict(
            conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_name = 'actp_cost_log' AND table_schema = current_schema()"
            ).fetchall()
        )
    assert types["cost_usd"] == "numeric"
    for column in ("id", "created_at", "month", "action", "request_id", "status", "expires_at"):
        assert column in types


async def test_instances_starting_together_create_the_schema_once(postgres_dsn: str) -> None:
    stores = [PostgresLedgerStore(postgres_dsn) for _ in range(4)]
    await asyncio.gather(*(store.open() for store in stores))
    await asyncio.gather(*(store.close() for store in stores))


async def test_ten_one_cent_calls_make_exactly_ten_cents_in_numeric(postgres_dsn: str) -> None:
    async with opened(PostgresLedgerStore(postgres_dsn)) as guard:
        for _ in range(10):
            await spend(guard, CENT)
        snap = await guard.snapshot()
    assert snap["spent_usd"] == "0.10"
    assert ledger_rows(postgres_dsn)["committed"] == Decimal("0.10")


async def test_cap_holds_under_200_concurrent_calls_on_postgres(postgres_dsn: str) -> None:
    store = WatchedStore(PostgresLedgerStore(postgres_dsn))
    async with opened(store) as guard:
        await spend(guard, Decimal("399.90"))
        assert await burst(guard, 200) == 10
    assert max(store.seen_totals) == CAP
    sums = ledger_rows(postgres_dsn)
    assert sums["committed"] == sums["month_committed"] == CAP
    assert sums["month_reserved"] == 0


async def test_cap_holds_across_two_processes_sharing_one_database(
    postgres_dsn: str, start_worker: Callable[..., Worker]
) -> None:
    async with opened(PostgresLedgerStore(postgres_dsn)) as guard:
        await spend(guard, Decimal("399.90"))
    config = {"DATABASE_URL": postgres_dsn, "EVERREACH_TZ": "UTC"}
    ran, peak = run_two_process_burst(start_worker, config, calls_each=100)
    assert ran == 10
    assert peak <= CAP
    sums = ledger_rows(postgres_dsn)
    assert sums["committed"] == sums["month_committed"] == CAP
    assert sums.get("reserved", Decimal(0)) == sums["month_reserved"] == 0


async def test_killed_process_leaves_no_phantom_spend_on_postgres(
    postgres_dsn: str, start_worker: Callable[..., Worker]
) -> None:
    config = {"DATABASE_URL": postgres_dsn, "EVERREACH_TZ": "UTC"}
    kill_between_reserve_and_commit(start_worker, config, amount="300")
    clock = FakeClock()
    async with opened(
        PostgresLedgerStore(postgres_dsn), clock=clock, request_state=cloud_never_saw_it
    ) as guard:
        assert guard.current_totals().reserved_usd == Decimal("300")
        with pytest.raises(CostCapReached):
            await guard.reserve("dm.send", Decimal("200"), "r")
        clock.advance(900 + 1)
        await guard.refresh()
        assert guard.current_totals().reserved_usd == 0
        await guard.reserve("dm.send", CAP, "r2")
    # Settled by the guard's sweep after the cloud confirmed it never ran, not by the store's
    # own expiry (which would release a call that may have run).
    assert ledger_rows(postgres_dsn)["released"] == Decimal("300")


async def test_stale_reservations_of_a_past_month_are_swept(postgres_dsn: str) -> None:
    clock = FakeClock(datetime(2026, 1, 31, 23, 59, tzinfo=UTC))
    async with opened(PostgresLedgerStore(postgres_dsn), clock=clock, reservation_ttl_s=60) as g:
        await g.reserve("dm.send", Decimal("7"), "crashed-in-january")
        clock.advance(3600)
        await g.refresh()
        assert g.month() == "2026-02"
    assert ledger_rows(postgres_dsn)["month_reserved"] == 0


async def test_postgres_snapshot_per_action(postgres_dsn: str) -> None:
    async with opened(PostgresLedgerStore(postgres_dsn)) as guard:
        await spend(guard, Decimal("0.002"), "research.platform")
        await spend(guard, Decimal("0.002"), "research.platform")
        held = await guard.reserve("dm.send", Decimal("0.001"), "r")
        snap = await guard.snapshot()
        await guard.release(held)
    assert snap["by_action"] == {"research.platform": "0.004"}
    assert snap["reserved_by_action"] == {"dm.send": "0.001"}
    assert snap["store"] == "postgres" and snap["healthy"] is True


async def test_postgres_forecast_counts_spend_per_local_day(postgres_dsn: str) -> None:
    assert_march_forecast(await forecast_scenario(PostgresLedgerStore(postgres_dsn)))


# -- Supabase REST ---------------------------------------------------------------------------


def postgrest_standin(dsn: str) -> httpx.MockTransport:
    """Answer ``POST /rest/v1/rpc/{fn}`` like PostgREST, running ``fn`` on real PostgreSQL."""

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.headers.get("apikey") != SERVICE_KEY:
            return httpx.Response(401, json={"code": "PGRST301", "message": "JWT invalid"})
        match = re.fullmatch(r"/rest/v1/rpc/(\w+)", request.url.path)
        if request.method != "POST" or match is None:
            return httpx.Response(404, json={"code": "PGRST125", "message": "Invalid path"})
        fn, params = match.group(1), json.loads(request.content or b"{}")
        args = ", ".join(f"{name} => %({name})s" for name in params)
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                cur = await conn.execute(f"SELECT {fn}({args})", params)
                row = await cur.fetchone()
        except psycopg.errors.UndefinedFunction:
            return httpx.Response(
                404,
                json={
                    "code": "PGRST202",
                    "message": f"Could not find the function public.{fn} in the schema cache",
                    "details": None,
                    "hint": None,
                },
            )
        except psycopg.Error as exc:
            return httpx.Response(400, json={"code": exc.sqlstate, "message": str(exc)})
        return httpx.Response(200, json=row[0] if row else None)

    return httpx.MockTransport(handle)


@pytest.fixture
async def supabase_http(postgres_dsn: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=postgrest_standin(postgres_dsn)) as http:
        yield http


def apply_migration(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(read_migration().encode())


def supabase_store(http: httpx.AsyncClient, key: str = SERVICE_KEY) -> SupabaseLedgerStore:
    return SupabaseLedgerStore("https://project.supabase.co", key, http_client=http)


async def test_supabase_without_the_migration_names_the_file_to_apply(
    supabase_http: httpx.AsyncClient,
) -> None:
    with pytest.raises(ConfigError) as info:
        async with opened(supabase_store(supabase_http)):
            pass
    assert MIGRATION_NAME in str(info.value)


async def test_supabase_with_a_wrong_key_is_a_config_error(
    postgres_dsn: str, supabase_http: httpx.AsyncClient
) -> None:
    apply_migration(postgres_dsn)
    with pytest.raises(ConfigError, match=r"SUPABASE_SERVICE_KEY.*service_role"):
        async with opened(supabase_store(supabase_http, key="anon-key")):
            pass


async def test_supabase_rest_ledger_is_exact_and_holds_the_cap(
    postgres_dsn: str, supabase_http: httpx.AsyncClient
) -> None:
    apply_migration(postgres_dsn)
    async with opened(supabase_store(supabase_http)) as guard:
        assert guard.healthy
        for _ in range(10):
            await spend(guard, CENT)
        assert guard.current_totals().committed_usd == Decimal("0.10")
        await spend(guard, Decimal("399.80"))
        assert guard.is_soft_cap_reached()
        assert await burst(guard, 30) == 10
        with pytest.raises(CostCapReached):
            await guard.reserve("dm.send", CENT, "over")
        snap = await guard.snapshot()
    assert snap["store"] == "supabase" and snap["spent_usd"] == "400.00"
    assert ledger_rows(postgres_dsn)["committed"] == CAP


async def test_supabase_and_postgres_stores_share_one_ledger(
    postgres_dsn: str, supabase_http: httpx.AsyncClient
) -> None:
    clock = FakeClock()
    async with (
        opened(PostgresLedgerStore(postgres_dsn), clock=clock) as direct,
        never_ran_sweep(supabase_store(supabase_http), clock) as rest,
    ):
        await rest.reserve("dm.send", Decimal("399"), "held-over-rest")
        with pytest.raises(CostCapReached):
            await direct.reserve("dm.send", Decimal("2"), "r")
        clock.advance(61)
        await rest.refresh()  # its sweep asks the cloud, which never saw the call: released
        await direct.commit(await direct.reserve("dm.send", Decimal("2"), "r2"))
        await rest.refresh()
        assert rest.current_totals().committed_usd == Decimal("2")


def make_it_a_version_2_ledger(dsn: str) -> None:
    """The ledger as the previous release left it: no spend-per-day function."""
    apply_migration(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP FUNCTION actp_cost_daily(text, text[])")
        conn.execute(
            "CREATE OR REPLACE FUNCTION actp_cost_schema_version() RETURNS integer "
            "LANGUAGE sql IMMUTABLE AS $$ SELECT 2 $$"
        )


async def test_a_version_2_ledger_upgrades_itself_over_postgres(postgres_dsn: str) -> None:
    make_it_a_version_2_ledger(postgres_dsn)
    assert_march_forecast(await forecast_scenario(PostgresLedgerStore(postgres_dsn)))


async def test_a_version_2_ledger_over_supabase_rest_asks_for_the_migration(
    postgres_dsn: str, supabase_http: httpx.AsyncClient
) -> None:
    make_it_a_version_2_ledger(postgres_dsn)
    with pytest.raises(ConfigError, match=r"schema version 2, this program needs 3: apply"):
        async with opened(supabase_store(supabase_http)):
            pass


async def test_supabase_rest_forecast_counts_spend_per_local_day(
    postgres_dsn: str, supabase_http: httpx.AsyncClient
) -> None:
    apply_migration(postgres_dsn)
    assert_march_forecast(await forecast_scenario(supabase_store(supabase_http)))


async def test_postgres_late_commit_is_recorded_and_release_is_idempotent(
    postgres_dsn: str,
) -> None:
    clock = FakeClock()
    async with never_ran_sweep(PostgresLedgerStore(postgres_dsn), clock) as g:
        slow = await g.reserve("dm.send", Decimal("5"), "slow")
        dropped = await g.reserve("dm.send", Decimal("7"), "dropped")
        await g.release(dropped)
        await g.release(dropped)
        clock.advance(120)
        await g.refresh()
        assert g.current_totals().reserved_usd == 0
        await g.commit(slow, Decimal("4.5"))
        await g.commit(slow, Decimal("99"))  # a repeated commit changes nothing
        assert g.current_totals().committed_usd == Decimal("4.5")
    sums = ledger_rows(postgres_dsn)
    assert sums["committed"] == sums["month_committed"] == Decimal("4.5")
    assert sums["released"] == Decimal("7") and sums["month_reserved"] == 0


async def test_an_overrun_closes_the_budget_for_every_instance_on_postgres(
    postgres_dsn: str,
) -> None:
    async with (
        opened(PostgresLedgerStore(postgres_dsn)) as one,
        opened(PostgresLedgerStore(postgres_dsn)) as other,
    ):
        await overrun_seen_by_another(one, other)
    sums = ledger_rows(postgres_dsn)
    assert sums["committed"] == sums["month_committed"] == Decimal("0.05")


async def test_an_unsettled_reservation_is_spent_on_postgres_without_a_cloud_answer(
    postgres_dsn: str,
) -> None:
    clock = FakeClock()
    async with opened(PostgresLedgerStore(postgres_dsn), clock=clock, reservation_ttl_s=60) as g:
        await g.reserve("dm.send", Decimal("5"), "crashed")
        clock.advance(61)
        await g.refresh()
        assert g.current_totals() == MonthTotals(g.month(), Decimal("5"), Decimal(0))
