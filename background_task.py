"""BackgroundTask: one named task a part runs while it is open, cancelled and awaited on close."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any


class BackgroundTask:
    """Run one coroutine in the background: started at most once, stopped by ``close()``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._task: asyncio.Task[Any] | None = None

    def start(self, run: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run ``run()`` as a task; a no-op while one already runs."""
        if self._task is None:
            self._task = asyncio.create_task(run(), name=self.name)

    async def close(self) -> None:
        """Cancel the task and wait for it to end (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
