"""SyncLoop: keep this instance and its cloud in step, in the background.

At start-up and then every ``SYNC_INTERVAL_SEC`` while the cloud is reachable, it replays the
outbox, pushes local state and pulls the cloud's (``StateSync`` does each step). When the
connectivity checker sees the cloud come back it syncs at once instead of waiting out the
interval. The result of the last run is its ``snapshot()``, shown in ``/status`` as ``sync``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from background_task import BackgroundTask

log = logging.getLogger("everreach.runtime")


class Syncer(Protocol):
    """The two steps of a sync (``StateSync`` has them)."""

    async def push_pending_sync(self) -> dict[str, int]: ...

    async def pull_cloud_state(self) -> dict[str, Any]: ...


class SyncLoop:
    """Run ``Syncer`` steps at start-up, on an interval and when the cloud comes back."""

    def __init__(
        self,
        syncer: Syncer,
        *,
        interval_s: float,
        is_online: Callable[[], bool],
        before_replay: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._syncer = syncer
        self.interval_s = interval_s
        self._is_online = is_online
        self._before_replay = before_replay
        self._clock = clock
        self._sleep = sleep
        self._task = BackgroundTask("state-sync")
        self.last: dict[str, Any] = {}

    async def sync_once(self, *, pull: bool = False) -> dict[str, Any]:
        """Replay the outbox and push local state; optionally pull the cloud's state."""
        result: dict[str, Any] = {"at": self._clock()}
        if self._before_replay is not None and self._is_online():
            self._before_replay()
        try:
            result["push"] = await self._syncer.push_pending_sync()
            if pull:
                result["pull"] = await self._syncer.pull_cloud_state()
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
            log.warning("state sync failed", extra={"error": result["error"]})
        self.last = result
        return result

    async def on_connectivity(self, online: bool) -> None:
        """Sync (and pull) at once when the cloud comes back."""
        log.warning("cloud connectivity changed", extra={"online": online})
        if online:
            await self.sync_once(pull=True)

    def start(self) -> None:
        """Start the loop: a first sync at once, then one every ``interval_s``."""
        self._task.start(self._run)

    async def _run(self) -> None:
        while True:
            if self._is_online():
                await self.sync_once(pull=True)
            await self._sleep(self.interval_s)

    async def close(self) -> None:
        """Stop the loop and wait for it (idempotent)."""
        await self._task.close()

    def snapshot(self) -> dict[str, Any]:
        """The last run's result (``{}`` before the first)."""
        return dict(self.last)
