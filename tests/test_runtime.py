"""Runtime: every resource opened in order and closed in reverse, loops owned by their parts."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from config.hybrid_config import HybridConfig
from errors import ConfigError
from runtime import Runtime
from tests.conftest import free_port, modules_loaded_by


def _config(tmp_path: Path, **variables: Any) -> HybridConfig:
    return HybridConfig.from_mapping({"DATA_DIR": str(tmp_path / "data"), **variables})


def _other_tasks() -> set[str]:
    return {t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def test_every_part_is_there_while_open_and_the_client_is_closed_after(tmp_path):
    async with Runtime.open(_config(tmp_path)) as runtime:
        assert not runtime.client.is_closed
        assert runtime.cloud is None and runtime.connectivity is None
        assert runtime.orchestrator and runtime.cost_guard and runtime.state_sync and runtime.cron
        assert (await runtime.instance_status.health())["status"] == "ok"
    assert runtime.client.is_closed


async def test_each_loop_runs_in_its_part_and_stops_with_the_runtime(tmp_path):
    # A cloud endpoint nobody listens on: the probes fail fast, the loops still run.
    config = _config(tmp_path, CLOUD_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    before = _other_tasks()
    async with Runtime.open(config) as runtime:
        assert runtime.cloud is not None and runtime.connectivity is not None
        running = _other_tasks() - before
        assert {"gauges", "state-sync", "connectivity-probe"} <= running
    assert _other_tasks() <= before


async def test_a_failure_half_way_through_start_up_closes_what_was_opened(tmp_path):
    schedules = tmp_path / "schedules.json"
    schedules.write_text("{not json", encoding="utf-8")
    config = _config(tmp_path, SCHEDULES_PATH=str(schedules))
    before = _other_tasks()
    with pytest.raises(ConfigError):
        async with Runtime.open(config):
            pytest.fail("start-up must not get this far")
    assert _other_tasks() <= before
    # The DATA_DIR lock was released: the next instance does not see a live holder.
    async with Runtime.open(_config(tmp_path)) as runtime:
        assert runtime.data_dir_shared_with is None


async def test_a_closer_that_fails_is_logged_and_the_others_still_run(tmp_path, caplog):
    async with Runtime.open(_config(tmp_path)) as runtime:

        async def broken() -> None:
            raise OSError("the disk went away")

        # Registered last, so closed first: the client opened before it must still close.
        runtime._on_close(broken)
    assert runtime.client.is_closed
    assert "closing a resource failed" in caplog.text


class HeldServer:
    """HTTP/1.1 on loopback that answers no request until ``hold`` of them are waiting at once."""

    def __init__(self, hold: int) -> None:
        self.hold = hold
        self.handlers: set[asyncio.Task[None]] = set()
        self._waiting = 0
        self._release = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                self._waiting += 1
                if self._waiting == self.hold:
                    self._release.set()
                await self._release.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def next_round(self) -> None:
        self._waiting = 0
        self._release = asyncio.Event()


async def test_the_http_client_holds_batch_max_concurrent_requests_in_flight(tmp_path):
    # 150 at once: past the 100 connections the pool used to cap, so with that cap the server
    # would never see 150 waiting and the rounds would not finish.
    hold = 150
    server = HeldServer(hold)
    # A backlog for all of them: past the default 100, the kernel drops SYNs and each dropped
    # connect waits a second for its retry.
    listener = await asyncio.start_server(server.serve, "127.0.0.1", 0, backlog=hold)
    url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}/"
    config = _config(tmp_path, BATCH_MAX_CONCURRENT=str(hold))
    try:
        async with Runtime.open(config) as runtime:
            for _ in range(2):
                answers = await asyncio.wait_for(
                    asyncio.gather(*(runtime.client.get(url) for _ in range(hold))), 30
                )
                assert [a.status_code for a in answers] == [200] * hold
                server.next_round()
    finally:
        listener.close()
        await listener.wait_closed()
        await asyncio.gather(*server.handlers)  # the client closed: each sees its EOF


async def test_idle_cloud_connections_are_dropped_before_the_cloud_drops_them(
    tmp_path, monkeypatch
):
    import uvicorn

    import runtime as runtime_module

    # What the cloud runs (everreach serve and the image: uvicorn's default keep-alive).
    assert uvicorn.Config("local_server:app").timeout_keep_alive > runtime_module.CLOUD_KEEPALIVE_S
    monkeypatch.setattr(runtime_module, "CLOUD_KEEPALIVE_S", 0.2)
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:  # keep the connection 0.6 s after each answer, as a server's keep-alive
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.6)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}/"
    try:
        async with Runtime.open(_config(tmp_path)) as runtime:
            assert (await runtime.client.get(url)).text == "ok"
            await asyncio.sleep(0.02)
            assert (await runtime.client.get(url)).text == "ok"  # reused
            assert connections == 1
            await asyncio.sleep(0.4)  # idle past the client's keep-alive, not the server's
            assert (await runtime.client.get(url)).text == "ok"
            assert connections == 2
    finally:
        listener.close()
        await listener.wait_closed()


# Opens and closes a runtime on argv[1] (DATA_DIR) and argv[2] (CLOUD_ENDPOINT, or "").
_OPEN_AND_CLOSE = """
import asyncio
import contextlib
from config.hybrid_config import HybridConfig
from runtime import Runtime

variables = {"DATA_DIR": sys.argv[1], "CLOUD_ENDPOINT": sys.argv[2]}

async def main() -> None:
    async with Runtime.open(HybridConfig.from_mapping(variables)):
        pass

asyncio.run(main())
"""
_CONFIGURED_ONLY = {"cloud_executor", "cloud_routes", "idempotency_pg", "idempotency_redis"}


@pytest.mark.process
def test_a_local_runtime_loads_no_cloud_executor_and_no_shared_idempotency_store(tmp_path):
    local = modules_loaded_by(_OPEN_AND_CLOSE, str(tmp_path / "local"), "")
    assert "runtime" in local and local & _CONFIGURED_ONLY == set()
    cloud = f"http://127.0.0.1:{free_port()}"
    hybrid = modules_loaded_by(_OPEN_AND_CLOSE, str(tmp_path / "hybrid"), cloud)
    assert {"cloud_executor", "cloud_routes"} <= hybrid


def _part(events: list[str], name: str, *, fail: bool = False) -> tuple[Any, Any]:
    async def open_() -> None:
        events.append(f"start {name}")
        await asyncio.sleep(0)
        events.append(f"opened {name}")
        if fail:
            raise OSError(f"{name} failed")

    async def close() -> None:
        events.append(f"close {name}")

    return open_, [close]


async def test_parts_opened_side_by_side_close_in_reverse_and_the_first_failure_is_raised(
    tmp_path,
):
    events: list[str] = []
    with pytest.raises(OSError, match="b failed"):
        async with contextlib.AsyncExitStack() as stack:
            runtime = Runtime(_config(tmp_path), stack)
            await runtime._open_together(
                [
                    _part(events, "a"),
                    _part(events, "b", fail=True),
                    _part(events, "c"),
                    _part(events, "d", fail=True),
                ]
            )
    starts = [e for e in events if e.startswith("start")]
    assert events[:4] == starts  # all started before any finished opening
    assert [e for e in events if e.startswith("close")] == ["close c", "close a"]


async def test_a_runtime_opened_side_by_side_closes_every_store(tmp_path):
    async with Runtime.open(_config(tmp_path)) as runtime:
        assert (await runtime.instance_status.health())["status"] == "ok"
        await runtime.outbox.enqueue("system.heartbeat", {}, "key-1")
    async with Runtime.open(_config(tmp_path)) as again:  # the lock and files were released
        assert again.data_dir_shared_with is None
        assert len(await again.outbox.pending()) == 1


async def test_the_stores_sharing_one_sqlite_file_open_one_after_another(tmp_path):
    # Two connections turning a new file to WAL at once may fail with "database is locked".
    events: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        runtime = Runtime(_config(tmp_path), stack)
        for name, store in zip("abcd", runtime._stores(), strict=True):

            async def open_(opener: Any = store.open, name: str = name) -> None:
                events.append(f"start {name}")
                await opener()
                events.append(f"end {name}")

            store.open = open_  # type: ignore[method-assign]
        await runtime._open()
    assert events == [f"{edge} {name}" for name in "abcd" for edge in ("start", "end")]
