"""Idempotency with Redis: replicas share claims through it, and the durable SQLite record
answers when Redis restarts empty or was down."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from idempotency import ClaimState, IdempotencyStore
from idempotency_redis import RedisIdempotencyStore
from tests.conftest import free_port, ready_together

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
    replicas = ready_together(
        [
            server_factory(
                name=f"cloud{i}",
                EVERREACH_ENV="cloud",
                EVERREACH_CLOUD_KEY=KEY,
                REDIS_URL=redis_url,
                ready=False,
            )
            for i in range(2)
        ]
    )
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


# -- Redis restarts empty: the durable record still answers ----------------------------------


class ThrowawayRedis:
    """A redis-server without persistence on a free port, to stop and restart empty."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> ThrowawayRedis:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no"],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 15  # a hang limit, not a timed assertion
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def keys(self) -> list[Any]:
        client = redis.Redis(port=self.port)
        try:
            return list(client.keys("everreach:idem:*"))
        finally:
            client.close()


@pytest.fixture
def throwaway_redis(tmp_path: Path) -> Iterator[ThrowawayRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = ThrowawayRedis(free_port(), tmp_path).start()
    yield server
    server.stop()


def _send(cloud: Any, key: str, log: Path) -> httpx.Response:
    return httpx.post(
        f"{cloud.url}/api/services/dm/send",
        json={"params": {"to": "ann", "id": key, "log": str(log)}},
        headers={"Authorization": f"Bearer {KEY}", "Idempotency-Key": key},
        timeout=30,
    )


def _runs(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.e2e
def test_a_key_run_before_redis_restarted_empty_is_not_run_again(
    server_factory: Any, throwaway_redis: ThrowawayRedis, tmp_path: Path
) -> None:
    cloud = server_factory(
        name="cloud", EVERREACH_ENV="cloud", EVERREACH_CLOUD_KEY=KEY, REDIS_URL=throwaway_redis.url
    )
    log = tmp_path / "dm.log"
    first = _send(cloud, "redis-restart-key-1", log)
    assert first.status_code == 200 and _runs(log) == 1
    assert throwaway_redis.keys()  # Redis did hold the claim

    throwaway_redis.stop()
    throwaway_redis.start()  # empty: no persistence
    assert throwaway_redis.keys() == []

    replay = _send(cloud, "redis-restart-key-1", log)
    assert replay.status_code == 200
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert replay.json()["result"] == first.json()["result"]
    assert _runs(log) == 1


@pytest.mark.e2e
def test_a_key_run_while_redis_was_down_is_not_run_again_once_it_is_back(
    server_factory: Any, throwaway_redis: ThrowawayRedis, tmp_path: Path
) -> None:
    cloud = server_factory(
        name="cloud", EVERREACH_ENV="cloud", EVERREACH_CLOUD_KEY=KEY, REDIS_URL=throwaway_redis.url
    )
    log = tmp_path / "dm.log"
    throwaway_redis.stop()
    first = _send(cloud, "redis-down-key-1", log)
    assert first.status_code == 200 and _runs(log) == 1

    throwaway_redis.start()
    replay = _send(cloud, "redis-down-key-1", log)
    assert replay.status_code == 200
    assert replay.json()["result"] == first.json()["result"]
    assert _runs(log) == 1
