"""BackgroundTask: started at most once, cancelled and awaited on close."""

from __future__ import annotations

import asyncio

from background_task import BackgroundTask
from tests.conftest import until


def _named(name: str) -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == name]


async def test_a_second_start_while_running_is_a_no_op():
    started: list[int] = []
    release = asyncio.Event()

    async def run() -> None:
        started.append(1)
        await release.wait()

    task = BackgroundTask("probe-one")
    task.start(run)
    task.start(run)
    await until(lambda: started == [1], what="the first run")
    assert len(_named("probe-one")) == 1
    await task.close()


async def test_close_cancels_the_task_waits_for_it_and_may_be_repeated():
    cleaned: list[bool] = []
    waiting = asyncio.Event()

    async def run() -> None:
        try:
            waiting.set()
            await asyncio.Event().wait()
        finally:
            cleaned.append(True)

    task = BackgroundTask("probe-two")
    task.start(run)
    await until(waiting.is_set, what="the task to start")
    await task.close()
    assert cleaned == [True] and not _named("probe-two")
    await task.close()
