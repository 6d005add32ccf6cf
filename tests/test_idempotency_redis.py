"""Idempotency records in Redis: replicas behind one balancer never run a key twice."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from idempotency import ClaimState, IdempotencyStore, RedisIdempotencyStore

pytestmark = [pytest.mark.prd200, pytest.mark.redis]

KEY = "e2e-cloud-key-123"


@pytest.fixture
async def replicas(redis_url, tmp_path):
    stores = [
        RedisIdempotencyStore(redis_url, IdempotencyStore(tmp_path / f"r{i}.sqlite3"))
        for i in range(2)
    ]
    for store in stores:
        await store.open()
    yield stores
    for store in stores:
        await store.close()


async def test_a_key_claimed_on_one_replica_is_running_on_the_other(replicas):
    first, second = replicas
    assert (await first.claim("k-1", "dm.send", "h")).state is ClaimState.NEW
    assert (await second.claim("k-1", "dm.send", "h")).state is ClaimState.RUNNING
    await first.complete("k-1", 200, {"ok": True, "result": 1})
    done = await second.claim("k-1", "dm.send", "h")
    assert (done.state, done.status_code, done.body) == (
        ClaimState.DONE,
        200,
        {"ok": True, "result": 1},
    )
    assert (await second.claim("k-1", "dm.send", "other")).state is ClaimState.MISMATCH


async def test_a_released_claim_can_be_taken_again(replicas):
    first, second = replicas
    await first.claim("k-2", "dm.send", "h")
    await first.release("k-2")
    assert (await second.claim("k-2", "dm.send", "h")).state is ClaimState.NEW


async def test_release_never_deletes_a_completed_answer(replicas):
    first, _ = replicas
    await first.claim("k-3", "dm.send", "h")
    await first.complete("k-3", 200, {"ok": True})
    await first.release("k-3")
    assert (await first.claim("k-3", "dm.send", "h")).state is ClaimState.DONE


async def test_unreachable_redis_falls_back_to_the_local_store(tmp_path):
    store = RedisIdempotencyStore(
        "redis://127.0.0.1:1/0", IdempotencyStore(tmp_path / "x.sqlite3"), socket_timeout_s=0.2
    )
    await store.open()
    try:
        assert (await store.claim("k-4", "dm.send", "h")).state is ClaimState.NEW
        await store.complete("k-4", 200, {"ok": True})
        assert (await store.claim("k-4", "dm.send", "h")).state is ClaimState.DONE
    finally:
        await store.close()


@pytest.mark.e2e
async def test_two_cloud_replicas_sharing_redis_run_a_key_once(server_factory, redis_url, tmp_path):
    replicas = [
        server_factory(
            name=f"cloud{i}", EVERREACH_ENV="cloud", EVERREACH_CLOUD_KEY=KEY, REDIS_URL=redis_url
        )
        for i in range(2)
    ]
    log = tmp_path / "dm.log"
    body = {"params": {"to": "x", "id": "shared", "log": str(log), "sleep_s": 0.3}}
    headers = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": "shared-key-0001"}
    async with httpx.AsyncClient(timeout=30) as client:
        answers = await asyncio.gather(
            *(
                client.post(f"{r.url}/api/services/dm/send", json=body, headers=headers)
                for r in replicas * 3
            )
        )
        later = await client.post(
            f"{replicas[1].url}/api/services/dm/send", json=body, headers=headers
        )
    assert later.status_code == 200
    assert {a.status_code for a in answers} <= {200, 409}
    assert len(Path(log).read_text().splitlines()) == 1
    pids = {a.json()["result"]["pid"] for a in [*answers, later] if a.status_code == 200}
    assert len(pids) == 1
    assert json.loads(Path(log).read_text())["id"] == "shared"
