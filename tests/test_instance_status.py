"""InstanceStatus: /health, /status and the gauges, built from each part's snapshot."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from config.hybrid_config import HybridConfig
from instance_status import InstanceStatus
from runtime import Runtime
from tests.conftest import free_port, until


def _config(tmp_path: Path, **variables: Any) -> HybridConfig:
    return HybridConfig.from_mapping({"DATA_DIR": str(tmp_path / "data"), **variables})


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    async with Runtime.open(_config(tmp_path)) as opened:
        yield opened


@pytest.fixture
async def cloudy(tmp_path: Path) -> AsyncIterator[Runtime]:
    """A runtime whose CLOUD_ENDPOINT nobody listens on."""
    config = _config(tmp_path, CLOUD_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    async with Runtime.open(config) as opened:
        yield opened


async def test_the_gauges_follow_the_outbox_once_refreshed(runtime):
    status = runtime.instance_status
    await runtime.outbox.enqueue("dm.send", {"to": "a"}, "key-1")
    assert status.gauges["outbox_depth"] == 0  # a scrape reads memory, never the store
    await status.refresh_gauges()
    assert status.gauges["outbox_depth"] == 1
    body, _ = status.render_metrics()
    assert b"everreach_outbox_depth 1.0" in body


async def test_the_refresh_loop_keeps_the_gauges_fresh_until_closed(runtime):
    status = InstanceStatus(runtime.instance_status.parts, refresh_s=0.01)
    await status.start()
    try:
        await runtime.outbox.enqueue("dm.send", {"to": "a"}, "key-1")
        await until(lambda: status.gauges["outbox_depth"] == 1, what="a refreshed gauge")
    finally:
        await status.close()
        await status.close()


async def test_health_is_degraded_while_the_cloud_refuses_our_key(cloudy):
    assert cloudy.connectivity is not None
    cloudy.connectivity.auth = "refused"
    health = await cloudy.instance_status.health()
    assert health["status"] == "degraded"
    assert health["services"]["cloud"]["auth"] == "refused"
    assert health["services"]["cloud"]["configured"] is True


async def test_status_shows_each_parts_snapshot(runtime):
    await runtime.outbox.enqueue("dm.send", {"to": "a"}, "key-1")
    result = await runtime.sync.sync_once()
    status = await runtime.instance_status.status()
    assert status["sync"] == result == runtime.sync.snapshot()
    assert status["outbox"] == await runtime.outbox.snapshot()
    assert status["scheduler"] == runtime.cron.snapshot()
    assert status["connectivity"] is None and status["circuits"]["cloud"] is None
    assert (
        status["online"] is False
        and status["version"] == (await runtime.instance_status.health())["version"]
    )
