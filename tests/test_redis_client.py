"""redis_client: one Redis client per process, handed to every part that needs Redis."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis.exceptions import ConnectionError as RedisConnectionError

from config.hybrid_config import HybridConfig
from local_server import create_app
from redis_client import REDIS_DOWN, REDIS_FAILED, RedisRef, open_redis
from tests.conftest import free_port


async def test_a_borrowed_client_is_left_open_for_its_owner(redis_url: str) -> None:
    shared = open_redis(redis_url)
    try:
        ref = RedisRef(redis_url, shared)
        assert ref.open() is shared
        await ref.close()
        assert await shared.ping()  # still usable: the part did not close what it borrowed
        assert ref.client is shared
    finally:
        await shared.aclose()


async def test_a_client_opened_from_a_url_is_closed_by_its_part(redis_url: str) -> None:
    ref = RedisRef(redis_url)
    client = ref.open()
    assert client is not None and await client.ping()
    await ref.close()
    assert ref.client is None
    assert ref.configured  # the URL stays: a later open() makes a new client


def test_without_a_url_or_a_client_there_is_no_redis() -> None:
    ref = RedisRef(None)
    assert not ref.configured and ref.open() is None


async def test_a_redis_that_does_not_answer_is_down(tmp_path: Path) -> None:
    client = open_redis(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.3)
    with pytest.raises(REDIS_DOWN) as caught:
        await client.ping()
    assert isinstance(caught.value, RedisConnectionError)
    assert isinstance(caught.value, REDIS_FAILED)
    await client.aclose()


@pytest.mark.redis
def test_one_instance_opens_one_redis_client_for_bus_idempotency_and_cron(
    redis_url: str, tmp_path: Path
) -> None:
    config = HybridConfig.from_mapping(
        {
            "EVERREACH_ENV": "cloud",
            "EVERREACH_CLOUD_KEY": "k-0123456789",
            "REDIS_URL": redis_url,
            "DATA_DIR": str(tmp_path / "data"),
            "ALLOWED_HOSTS": "testserver",
        }
    )
    app = create_app(config)
    with TestClient(app) as client:
        runtime = app.state.runtime
        shared = runtime.redis
        assert shared is not None
        assert runtime.bus._redis_ref.client is shared
        assert runtime.idempotency._redis is shared
        assert runtime.cron._lock.client is shared
        assert client.get("/health").json()["services"]["bus"]["backend"] == "redis"
