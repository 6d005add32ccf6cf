"""Following one dispatch through the code visits each module at most once on the way down.

A profiler (``sys.setprofile``, and ``threading.setprofile`` for the threads the app starts)
watches one request from the ASGI entry to the answer and keeps only the frames of the project's
own root modules (``*.py`` at the top of the repository and ``config/``). At every call it
reads the call stack (``f_back``; an awaited coroutine's frame points back at the one that
awaits it) as a sequence of modules, consecutive frames of one module counting as one visit.
A module that appears twice in that sequence was re-entered: A -> B -> A. A -> B, return,
A -> C is fine. Each case prints its walk (the modules in the order they are entered, indented
by depth) and its numbers, so a change to the route can be compared with this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import pytest

from config.hybrid_config import HybridConfig
from local_server import create_app

ROOT = Path(__file__).resolve().parent.parent
CLOUD = "http://cloud.test"
CLOUD_KEY = "walk-cloud-key"


def _module_of(filename: str, cache: dict[str, str | None] = {}) -> str | None:  # noqa: B006
    """The project module a code object's file is, or None (the standard library, packages)."""
    if filename not in cache:
        path = Path(filename)
        module = None
        if path.suffix == ".py" and path.parent == ROOT:
            module = path.stem
        elif path.suffix == ".py" and path.parent == ROOT / "config":
            module = f"config.{path.stem}"
        cache[filename] = module
    return cache[filename]


def _stack_of(frame: FrameType | None) -> list[str]:
    """The project modules on ``frame``'s stack, outermost first, one entry per visit."""
    modules: list[str] = []
    while frame is not None:
        module = _module_of(frame.f_code.co_filename)
        if module is not None and (not modules or modules[-1] != module):
            modules.append(module)
        frame = frame.f_back
    modules.reverse()
    return modules


@dataclass
class Walk:
    """What the profiler saw of one request: entries (depth, module, thread), re-entered stacks.

    Only the request's task, the tasks it starts (a cache fill) and what they hand to worker
    threads count: the instance's background loops (probes, gauges, sync) may tick meanwhile.
    """

    entries: list[tuple[int, str, str]] = field(default_factory=list)
    violations: Counter[tuple[str, ...]] = field(default_factory=Counter)
    active: bool = False
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _seen: dict[int, FrameType] = field(default_factory=dict)
    _factory: Any = None
    _worker: threading.local = field(default_factory=threading.local)

    def start(self, *, record: bool = True) -> None:
        """Follow the running task from now on, the tasks it creates and the work it hands to
        worker threads; record what they call only if ``record``."""
        loop = asyncio.get_running_loop()
        self._factory = loop.get_task_factory()
        run_in_executor = loop.run_in_executor

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
            task = asyncio.Task(coro, loop=loop, **kw)
            if asyncio.current_task() in self.tasks:
                self.tasks.add(task)
            return task

        def handing_over(executor: Any, fn: Any, *args: Any) -> asyncio.Future[Any]:
            if asyncio.current_task() in self.tasks:
                fn = functools.partial(self._in_worker, fn)
            return run_in_executor(executor, fn, *args)

        loop.set_task_factory(factory)
        loop.run_in_executor = handing_over  # type: ignore[method-assign,assignment]
        self.tasks = {asyncio.current_task()}  # type: ignore[arg-type]
        self.active = record

    def stop(self) -> None:
        self.active = False
        loop = asyncio.get_running_loop()
        loop.set_task_factory(self._factory)
        del loop.run_in_executor  # the class's own again

    def _in_worker(self, fn: Any, *args: Any) -> Any:
        self._worker.followed = True
        try:
            return fn(*args)
        finally:
            self._worker.followed = False

    def _followed(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return bool(getattr(self._worker, "followed", False))
        try:
            return asyncio.current_task() in self.tasks
        except RuntimeError:  # no running loop
            return False

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if not self.active or event != "call":
            return
        module = _module_of(frame.f_code.co_filename)
        if module is None or not self._followed():
            return
        stack = _stack_of(frame)
        if len(set(stack)) != len(stack):
            self.violations[tuple(stack)] += 1
        if id(frame) in self._seen:  # a coroutine resumed: not a new call
            return
        self._seen[id(frame)] = frame  # kept alive, so an id is never reused during the walk
        caller = _stack_of(frame.f_back)
        if not caller or caller[-1] != module:
            self.entries.append((len(stack), module, threading.current_thread().name))

    @property
    def modules(self) -> list[str]:
        return sorted({module for _, module, _ in self.entries})

    def text(self, title: str) -> str:
        lines = [f"{title}: {len(self.entries)} entries into {len(self.modules)} modules"]
        main = threading.main_thread().name
        for depth, module, thread in self.entries:
            where = "" if thread == main else f"   [thread {thread}]"
            lines.append(f"{'  ' * depth}{module}{where}")
        for stack, count in self.violations.items():
            lines.append(f"RE-ENTERED ({count}x): {' > '.join(stack)}")
        return "\n".join(lines)

    def release(self) -> None:
        self._seen.clear()


@contextlib.contextmanager
def profiling(walk: Walk) -> Iterator[None]:
    """Profile this thread and every thread started inside the block; undo both afterwards."""
    threading.setprofile(walk.profile)
    sys.setprofile(walk.profile)
    try:
        yield
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
        walk.release()


def _cloud(request: httpx.Request) -> httpx.Response:
    """The cloud's network: /health answers, every action call succeeds at a stated price."""
    if request.url.path == "/health":
        return httpx.Response(200, json={"status": "ok"})
    return httpx.Response(200, json={"ok": True, "result": {"where": "cloud"}, "cost_usd": "0.01"})


@contextlib.asynccontextmanager
async def _instance(
    tmp_path: Path, walk: Walk, **variables: str
) -> AsyncIterator[httpx.AsyncClient]:
    """An app on its lifespan, answering an in-process client, profiled from start-up on."""
    config = HybridConfig.from_mapping(
        {"DATA_DIR": str(tmp_path / "data"), "ALLOWED_HOSTS": "testserver", **variables}
    )
    app = create_app(config)
    with profiling(walk):
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
                yield c


async def _walk_one(
    client: httpx.AsyncClient,
    walk: Walk,
    path: str,
    body: dict[str, Any],
    *,
    warm: dict[str, Any] | None = None,
    status: int = 200,
    **kw: Any,
) -> dict[str, Any]:
    # A first request warms what is built lazily (imports, caches), so the walk is the steady one;
    # what it started (a cache fill) ends before the walk begins.
    walk.start(record=False)
    try:
        first = await client.post(path, json=body if warm is None else warm, **kw)
        await _settled(walk)
    finally:
        walk.stop()
    assert first.status_code == status, first.text
    walk.start()
    try:
        answer = await client.post(path, json=body, **kw)
        await _settled(walk)
    finally:
        walk.stop()
    assert answer.status_code == status, answer.text
    envelope: dict[str, Any] = answer.json()
    return envelope


async def _settled(walk: Walk) -> None:
    """Let the tasks the request started (a cache fill) finish inside the walk."""
    started = [task for task in walk.tasks if task is not asyncio.current_task()]
    await asyncio.gather(*started, return_exceptions=True)


def _unreachable(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


@pytest.fixture
def cloud_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime's HTTP client talks to ``_cloud`` instead of the network."""
    import cloud_transport

    monkeypatch.setattr(cloud_transport, "CloudTransport", lambda **_: httpx.MockTransport(_cloud))


@pytest.fixture
def cloud_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime's HTTP client finds nobody listening at the cloud's address."""
    import cloud_transport

    monkeypatch.setattr(
        cloud_transport, "CloudTransport", lambda **_: httpx.MockTransport(_unreachable)
    )


async def test_a_local_dispatch_enters_each_module_once_on_the_way_down(tmp_path: Path) -> None:
    walk = Walk()
    async with _instance(tmp_path, walk, EVERREACH_ENV="local") as client:
        body = await _walk_one(client, walk, "/dispatch", {"action": "system.echo"})
    print(walk.text("POST /dispatch system.echo (local)"))
    assert body["ok"] and body["source"] == "local"
    assert {"local_server", "hybrid_orchestrator", "local_executor", "envelope"} <= set(
        walk.modules
    )
    assert dict(walk.violations) == {}


async def test_a_cloud_dispatch_enters_each_module_once_on_the_way_down(
    tmp_path: Path, cloud_network: None
) -> None:
    walk = Walk()
    async with _instance(
        tmp_path, walk, EVERREACH_ENV="hybrid", CLOUD_ENDPOINT=CLOUD, EVERREACH_CLOUD_KEY=CLOUD_KEY
    ) as client:
        body = await _walk_one(client, walk, "/dispatch", {"action": "claude.generate"})
    print(walk.text("POST /dispatch claude.generate (cloud)"))
    assert body["ok"] and body["source"] == "cloud", body
    assert {"local_server", "hybrid_orchestrator", "cost_guard", "cloud_executor"} <= set(
        walk.modules
    )
    assert dict(walk.violations) == {}


async def test_serving_as_the_cloud_enters_each_module_once_on_the_way_down(
    tmp_path: Path,
) -> None:
    walk = Walk()
    async with _instance(tmp_path, walk, EVERREACH_CLOUD_KEY=CLOUD_KEY) as client:
        body = await _walk_one(
            client,
            walk,
            "/api/services/system/echo",
            {"params": {"n": 1}},
            headers={"Authorization": f"Bearer {CLOUD_KEY}"},
        )
    print(walk.text("POST /api/services/system/echo (serving as the cloud)"))
    assert body["ok"] and body["source"] == "cloud", body
    assert {"local_server", "hybrid_orchestrator", "local_executor"} <= set(walk.modules)
    assert dict(walk.violations) == {}


async def test_a_dispatch_under_an_idempotency_key_enters_each_module_once(tmp_path: Path) -> None:
    walk = Walk()
    async with _instance(tmp_path, walk, EVERREACH_ENV="local") as client:
        body = await _walk_one(
            client,
            walk,
            "/dispatch",
            {"action": "system.echo", "idempotency_key": "walk-key-0002"},
            warm={"action": "system.echo", "idempotency_key": "walk-key-0001"},
        )
    print(walk.text("POST /dispatch system.echo, idempotency_key (local)"))
    assert body["ok"] and body["request_id"] == "walk-key-0002", body
    assert {"local_server", "idempotency", "hybrid_orchestrator", "sqlite_file"} <= set(
        walk.modules
    )
    assert dict(walk.violations) == {}


async def test_a_queued_side_effect_enters_each_module_once(
    tmp_path: Path, cloud_down: None
) -> None:
    walk = Walk()
    async with _instance(
        tmp_path,
        walk,
        EVERREACH_ENV="hybrid",
        CLOUD_ENDPOINT=CLOUD,
        EVERREACH_CLOUD_KEY=CLOUD_KEY,
        CLOUD_RETRIES="0",
    ) as client:
        body = await _walk_one(
            client, walk, "/dispatch", {"action": "dm.send", "params": {"to": "x"}}, status=202
        )
    print(walk.text("POST /dispatch dm.send, cloud unreachable (queued in the outbox)"))
    assert body["source"] == "outbox", body
    assert {"local_server", "hybrid_orchestrator", "outbox", "sqlite_file"} <= set(walk.modules)
    assert dict(walk.violations) == {}
