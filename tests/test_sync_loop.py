"""SyncLoop: sync at start-up, on an interval while online, at once when the cloud is back."""

from __future__ import annotations

import asyncio
from typing import Any

from sync_loop import SyncLoop
from tests.conftest import until


class FakeSyncer:
    """Counts pushes and pulls; raises ``failure`` from the push when set."""

    def __init__(self) -> None:
        self.pushes = 0
        self.pulls = 0
        self.failure: Exception | None = None

    async def push_pending_sync(self) -> dict[str, int]:
        self.pushes += 1
        if self.failure is not None:
            raise self.failure
        return {"replayed": 0}

    async def pull_cloud_state(self) -> dict[str, Any]:
        self.pulls += 1
        return {"pulled": 0}


class Online:
    def __init__(self, value: bool) -> None:
        self.value = value

    def __call__(self) -> bool:
        return self.value


class Ticks:
    """A sleep whose intervals pass at once, counted: the test polls, never waits."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self, _: float) -> None:
        self.count += 1
        await asyncio.sleep(0)


async def test_a_failed_sync_is_recorded_in_the_snapshot_not_raised():
    syncer = FakeSyncer()
    syncer.failure = ConnectionError("cloud went away")
    loop = SyncLoop(syncer, interval_s=60, is_online=Online(True), clock=lambda: 12.0)
    result = await loop.sync_once(pull=True)
    assert result == {"at": 12.0, "error": "ConnectionError: cloud went away"}
    assert loop.snapshot() == result and syncer.pulls == 0


async def test_coming_back_online_pushes_and_pulls_at_once_going_offline_does_nothing():
    syncer = FakeSyncer()
    loop = SyncLoop(syncer, interval_s=60, is_online=Online(True))
    await loop.on_connectivity(False)
    assert (syncer.pushes, syncer.pulls) == (0, 0) and loop.snapshot() == {}
    await loop.on_connectivity(True)
    assert (syncer.pushes, syncer.pulls) == (1, 1)
    assert loop.snapshot()["push"] == {"replayed": 0}


async def test_the_breaker_trial_is_offered_only_while_the_cloud_is_reachable():
    trials: list[bool] = []
    online = Online(False)
    loop = SyncLoop(
        FakeSyncer(), interval_s=60, is_online=online, before_replay=lambda: trials.append(True)
    )
    await loop.sync_once()
    assert trials == []
    online.value = True
    await loop.sync_once()
    assert trials == [True]


async def test_the_loop_waits_while_offline_and_syncs_once_online_until_closed():
    syncer = FakeSyncer()
    online = Online(False)
    ticks = Ticks()
    loop = SyncLoop(syncer, interval_s=60, is_online=online, sleep=ticks)
    loop.start()
    loop.start()  # a second start is a no-op, not a second loop
    await until(lambda: ticks.count >= 3, what="three intervals while offline")
    assert syncer.pushes == 0
    online.value = True
    await until(lambda: syncer.pulls >= 2, what="two syncs once online")
    await loop.close()
    await loop.close()
    assert not any(t.get_name() == "state-sync" for t in asyncio.all_tasks())
