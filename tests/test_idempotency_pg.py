"""PostgresIdempotencyStore on a real PostgreSQL: one atomic claim per key across replicas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from idempotency import ClaimState, Holder, KeyState
from idempotency_pg import TABLE, PostgresIdempotencyStore
from params_digest import params_hash
from tests.conftest import ready_together

pytestmark = pytest.mark.postgres

HASH = params_hash({"to": "ann"})
OpenStore = Callable[..., Awaitable[PostgresIdempotencyStore]]


def _replica(name: str) -> Holder:
    """A holder on another machine: only its heartbeat tells whether it lives."""
    return Holder(f"node-{name}", 7, "1")


@pytest.fixture
async def open_store(postgres_dsn: str) -> AsyncIterator[OpenStore]:
    opened: list[PostgresIdempotencyStore] = []

    async def factory(**options: Any) -> PostgresIdempotencyStore:
        store = PostgresIdempotencyStore(postgres_dsn, **options)
        await store.open()
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()


async def test_two_replicas_never_both_get_new_for_one_key(open_store: OpenStore) -> None:
    a = await open_store(holder=_replica("a"))
    b = await open_store(holder=_replica("b"))
    keys = [f"race-key-{i:03d}" for i in range(40)]
    claims = await asyncio.gather(
        *(store.claim(key, "dm.send", HASH) for key in keys for store in (a, b, a, b))
    )
    for i, key in enumerate(keys):
        states = [claim.state for claim in claims[4 * i : 4 * i + 4]]
        assert states.count(ClaimState.NEW) == 1, key
        assert set(states) == {ClaimState.NEW, ClaimState.RUNNING}


async def test_a_completed_key_answers_every_replica(open_store: OpenStore) -> None:
    a = await open_store(holder=_replica("a"))
    b = await open_store(holder=_replica("b"))
    assert (await a.claim("k-done-01", "dm.send", HASH)).state is ClaimState.NEW
    await a.complete("k-done-01", 200, {"ok": True, "result": {"sent": 1}})
    claim = await b.claim("k-done-01", "dm.send", HASH)
    assert (claim.state, claim.body) == (ClaimState.DONE, {"ok": True, "result": {"sent": 1}})
    assert (await b.claim("k-done-01", "dm.send", params_hash({}))).state is ClaimState.MISMATCH
    assert await b.lookup("k-done-01") is KeyState.DONE
    assert await b.lookup("k-never-01") is KeyState.UNKNOWN


async def _stop_heartbeat(dsn: str, key: str) -> None:
    """Age a claim's heartbeat past the lease, as a replica killed mid-handler leaves it."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            f"UPDATE {TABLE} SET heartbeat_at = now() - interval '1 hour' WHERE key = %s", (key,)
        )


async def test_a_dead_replicas_claim_is_indeterminate(
    open_store: OpenStore, postgres_dsn: str
) -> None:
    dead = await open_store(holder=_replica("dead"))
    other = await open_store(holder=_replica("b"))
    await dead.claim("k-dead-01", "dm.send", HASH)
    assert (await other.claim("k-dead-01", "dm.send", HASH)).state is ClaimState.RUNNING
    assert await other.lookup("k-dead-01") is KeyState.RUNNING
    await _stop_heartbeat(postgres_dsn, "k-dead-01")
    assert (await other.claim("k-dead-01", "dm.send", HASH)).state is ClaimState.INDETERMINATE
    assert await other.lookup("k-dead-01") is KeyState.INDETERMINATE


async def test_the_heartbeat_keeps_a_claim_alive(open_store: OpenStore, postgres_dsn: str) -> None:
    holder = await open_store(holder=_replica("a"))
    other = await open_store(holder=_replica("b"))
    await holder.claim("k-beat-01", "dm.send", HASH)
    await _stop_heartbeat(postgres_dsn, "k-beat-01")
    await holder.renew()
    assert (await other.claim("k-beat-01", "dm.send", HASH)).state is ClaimState.RUNNING


async def test_of_replicas_racing_for_a_dead_idempotent_key_exactly_one_takes_it(
    open_store: OpenStore, postgres_dsn: str
) -> None:
    dead = await open_store(holder=_replica("dead"))
    racers = [await open_store(holder=_replica(f"r{i}")) for i in range(4)]
    await dead.claim("k-take-01", "system.echo", HASH)
    await _stop_heartbeat(postgres_dsn, "k-take-01")
    claims = await asyncio.gather(
        *(r.claim("k-take-01", "system.echo", HASH, rerun_if_dead=True) for r in racers * 3)
    )
    assert [c.state for c in claims].count(ClaimState.NEW) == 1


async def test_a_released_key_can_be_claimed_again(open_store: OpenStore) -> None:
    a = await open_store(holder=_replica("a"))
    b = await open_store(holder=_replica("b"))
    await a.claim("k-rel-01", "dm.send", HASH)
    await a.release("k-rel-01")
    assert await b.lookup("k-rel-01") is KeyState.DONE  # it ran (and failed)
    assert (await b.claim("k-rel-01", "dm.send", HASH)).state is ClaimState.NEW
    await b.release("k-rel-01", ran=False)
    assert await a.lookup("k-rel-01") is KeyState.UNKNOWN


async def test_an_unreachable_database_is_storage_unavailable_not_a_crash() -> None:
    from errors import StorageUnavailable

    store = PostgresIdempotencyStore(
        "postgresql://postgres@127.0.0.1:1/test", connect_timeout_s=0.1, statement_timeout_s=0.1
    )
    await store.open()
    try:
        with pytest.raises(StorageUnavailable):
            await store.claim("k-down-01", "dm.send", HASH)
    finally:
        await store.close()


@pytest.mark.e2e
def test_two_cloud_replicas_sharing_postgresql_run_a_key_once(
    server_factory: Any, postgres_dsn: str, tmp_path: Path
) -> None:
    key = "e2e-cloud-key-123"
    replicas = ready_together(
        [
            server_factory(
                name=f"cloud{i}",
                EVERREACH_ENV="cloud",
                EVERREACH_CLOUD_KEY=key,
                DATABASE_URL=postgres_dsn,
                ready=False,
            )
            for i in range(2)
        ]
    )
    log = tmp_path / "dm.log"
    body = {"params": {"to": "x", "id": "shared", "log": str(log), "sleep_s": 0.3}}
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "pg-shared-key-01"}

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(f"{r.url}/api/services/dm/send", json=body, headers=headers)
                    for r in replicas * 3
                )
            )

    answers = asyncio.run(race())
    assert {a.status_code for a in answers} <= {200, 409}
    later = httpx.post(
        f"{replicas[1].url}/api/services/dm/send", json=body, headers=headers, timeout=30
    )
    assert later.status_code == 200
    assert len(log.read_text().splitlines()) == 1
