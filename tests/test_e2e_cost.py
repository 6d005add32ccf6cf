"""End to end: the monthly cap holds across real server processes sharing one ledger."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from config.hybrid_config import HybridConfig
from cost_guard import CostGuard
from tests.conftest import wait_until_it_sees_its_cloud

pytestmark = [pytest.mark.prd200, pytest.mark.e2e]

KEY = "e2e-cloud-key-123"


async def spend(config: HybridConfig, amount_usd: str) -> None:
    guard = CostGuard.from_config(config)
    await guard.open()
    try:
        reservation = await guard.reserve("claude.complete", Decimal(amount_usd), "pre-spend")
        await guard.commit(reservation)
    finally:
        await guard.close()


async def committed_total(config: HybridConfig) -> Decimal:
    guard = CostGuard.from_config(config)
    await guard.open()
    try:
        snapshot = await guard.snapshot()
    finally:
        await guard.close()
    return Decimal(snapshot["spent_usd"]) + Decimal(snapshot["reserved_usd"])


def count_runs(log: Path) -> int:
    return len([json.loads(line) for line in log.read_text().splitlines()])


def start_cloud(server_factory: Any, **variables: str) -> Any:
    """Launch the cloud without waiting: its terminals start beside it (``beside_its_cloud``)."""
    return server_factory(
        name="cloud", EVERREACH_ENV="cloud", EVERREACH_CLOUD_KEY=KEY, ready=False, **variables
    )


def beside_its_cloud(term: Any, cloud: Any) -> None:
    """Wait for a terminal launched beside its cloud, the cloud, and the terminal to see it."""
    term.wait_ready()
    cloud.wait_ready()
    wait_until_it_sees_its_cloud(term)


def terminal_env(cloud_url: str, **variables: str) -> dict[str, str]:
    return {
        "EVERREACH_ENV": "hybrid",
        "CLOUD_ENDPOINT": cloud_url,
        "EVERREACH_CLOUD_KEY": KEY,
        "EVERREACH_SERVICES": "tests.e2e_terminal_services",
        **variables,
    }


@pytest.mark.postgres
async def test_two_terminals_on_one_postgres_ledger_never_pass_the_cap(
    server_factory, postgres_dsn, tmp_path
):
    await spend(HybridConfig.from_mapping({"DATABASE_URL": postgres_dsn}), "399.90")
    cloud = start_cloud(server_factory)
    terminals = [
        server_factory(
            name=f"t{i}", ready=False, **terminal_env(cloud.url, DATABASE_URL=postgres_dsn)
        )
        for i in range(2)
    ]
    for term in terminals:
        beside_its_cloud(term, cloud)
    log = tmp_path / "claude.log"

    async def call(client: httpx.AsyncClient, n: int) -> httpx.Response:
        term = terminals[n % 2]
        return await client.post(
            f"{term.url}/dispatch",
            json={"action": "claude.complete", "params": {"id": n, "log": str(log)}},
        )

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        answers = await asyncio.gather(*(call(client, n) for n in range(200)))

    ok = [a for a in answers if a.status_code == 200]
    capped = [a for a in answers if a.status_code == 429]
    assert len(ok) + len(capped) == 200, {a.status_code for a in answers}
    assert len(ok) == 10
    assert all(a.json()["error"] == "cost_cap_reached" for a in capped)
    assert count_runs(log) == 10
    total = await committed_total(HybridConfig.from_mapping({"DATABASE_URL": postgres_dsn}))
    assert total <= Decimal("400.00")
    assert total == Decimal("400.00")


async def test_at_the_soft_cap_the_next_auto_action_runs_locally(server_factory, tmp_path):
    data_dir = tmp_path / "term-data"
    await spend(HybridConfig.from_mapping({"DATA_DIR": str(data_dir)}), "380")
    cloud = start_cloud(server_factory)
    term = server_factory(name="term", **terminal_env(cloud.url, DATA_DIR=str(data_dir)))
    beside_its_cloud(term, cloud)
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(
            f"{term.url}/dispatch", json={"action": "research.platform", "params": {}}
        )
        status = (await client.get(f"{term.url}/status")).json()
    body = answer.json()
    assert body["ok"] and body["source"] == "local" and body["cost_guard_triggered"] is True
    assert body["result"]["pid"] == term.proc.pid
    assert status["cost"]["soft_cap_reached"] is True
    assert Decimal(status["cost"]["spent_usd"]) == Decimal("380")


async def test_a_cloud_dearer_than_the_estimate_never_passes_the_cap(server_factory, tmp_path):
    # The terminal estimates $0.01 a call; the cloud charges $0.05. Twenty concurrent calls under
    # a $0.10 cap: each is first sent with Cost-Limit 0.01, refused with the cloud's price, and
    # re-reserved at $0.05 only while the cap allows, so exactly two run.
    (tmp_path / "cloud-rates.json").write_text('{"claude.*": "0.05"}')
    (tmp_path / "term-rates.json").write_text('{"claude.*": "0.01"}')
    cloud = start_cloud(server_factory, COST_RATES_FILE=str(tmp_path / "cloud-rates.json"))
    data_dir = tmp_path / "term-data"
    term = server_factory(
        name="term",
        **terminal_env(
            cloud.url,
            DATA_DIR=str(data_dir),
            COST_RATES_FILE=str(tmp_path / "term-rates.json"),
            MONTHLY_COST_CAP="0.10",
            COST_SOFT_CAP="0.10",
        ),
    )
    beside_its_cloud(term, cloud)
    log = tmp_path / "claude.log"
    held: list[Decimal] = []
    burst_done = asyncio.Event()

    async def watch(client: httpx.AsyncClient) -> None:
        # What the terminal's ledger holds (spent + reserved) while the burst runs.
        while not burst_done.is_set():
            cost = (await client.get(f"{term.url}/status")).json()["cost"]
            held.append(Decimal(cost["spent_usd"]) + Decimal(cost["reserved_usd"]))

    async def call(client: httpx.AsyncClient, n: int) -> httpx.Response:
        return await client.post(
            f"{term.url}/dispatch",
            json={"action": "claude.complete", "params": {"id": n, "log": str(log)}},
        )

    async def burst(client: httpx.AsyncClient) -> list[httpx.Response]:
        try:
            return await asyncio.gather(*(call(client, n) for n in range(20)))
        finally:
            burst_done.set()

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as client:
        answers, _ = await asyncio.gather(burst(client), watch(client))
        cost = (await client.get(f"{term.url}/status")).json()["cost"]

    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 2 + [429] * 18, statuses
    assert all(a.json()["error"] == "cost_cap_reached" for a in answers if a.status_code == 429)
    assert [a.json()["cost_usd"] for a in answers if a.status_code == 200] == [0.05, 0.05]
    assert count_runs(log) == 2
    assert held and max(held) <= Decimal("0.10")
    assert (cost["spent_usd"], cost["reserved_usd"]) == ("0.10", "0.00")
    assert cost["budget_closed"] is False
