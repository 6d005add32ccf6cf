"""ServiceRegistry: registering and dispatching handlers, loading EVERREACH_SERVICES modules, the
errors a bad handler or module produces, and the system.* built-ins."""

from __future__ import annotations

import asyncio
import datetime
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import service_registry
from errors import HandlerError, InvalidParams, RegistryError, UnknownAction
from service_registry import (
    ServiceRegistry,
    check_action_name,
    current_idempotency_key,
    idempotency_key_scope,
    register,
)
from tests.conftest import clean_env, free_port, wait_until_serving

pytestmark = pytest.mark.prd200

BUILTINS = ["system.echo", "system.heartbeat", "system.self_test"]


@pytest.fixture(autouse=True)
def declared(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A private copy of the @register table, so test declarations vanish afterwards.

    A services module first imported here registered into the copy only: it is forgotten too,
    so a later test that imports it registers it in the real table (whatever the test order).
    """
    table = dict(service_registry._DECLARED)
    monkeypatch.setattr(service_registry, "_DECLARED", table)
    before = set(sys.modules)
    yield table
    for name in set(sys.modules) - before:
        if name.startswith("tests."):
            del sys.modules[name]


@pytest.fixture
def services_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Factory: write a uniquely named module on sys.path; return its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(source: str, *, stem: str = "svc") -> str:
        name = f"{stem}_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


async def _add(params: dict[str, Any]) -> dict[str, Any]:
    return {"sum": params["a"] + params["b"]}


def _registry(**handlers: Callable[..., Any]) -> ServiceRegistry:
    return ServiceRegistry({name.replace("__", "."): h for name, h in handlers.items()})


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["research.keyword", "dm.send", "a.b", "content.analyze_video", "s3.put_2"]
)
def test_valid_action_name(name: str) -> None:
    assert check_action_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "x",
        "../x",
        "a.b/c",
        "A.B",
        "Dm.send",
        "a.b.c",
        ".b",
        "a.",
        "1a.b",
        "a.1b",
        "a-b.c",
        "a.b c",
        "dm.send\n",
        "",
        "a." + "b" * 65,  # topic longer than 64
        None,
        42,
    ],
)
def test_invalid_action_name(name: object) -> None:
    with pytest.raises(InvalidParams, match=r"service\.topic"):
        check_action_name(name)


# -- register, dispatch, actions --------------------------------------------------------------


async def test_dispatch_runs_an_async_handler_on_the_event_loop_thread() -> None:
    seen: list[int] = []

    async def handler(params: dict[str, Any]) -> dict[str, Any]:
        seen.append(threading.get_ident())
        return {"got": params}

    registry = _registry(test__async=handler)
    assert await registry.dispatch("test.async", {"x": 1}) == {"got": {"x": 1}}
    assert seen == [threading.get_ident()]


async def test_dispatch_runs_a_sync_handler_in_a_worker_thread() -> None:
    seen: list[int] = []

    def handler(params: dict[str, Any]) -> int:
        seen.append(threading.get_ident())
        return int(params["n"]) * 2

    registry = _registry(test__sync=handler)
    assert await registry.dispatch("test.sync", {"n": 21}) == 42
    assert len(seen) == 1
    assert seen[0] != threading.get_ident()


async def test_a_blocking_sync_handler_does_not_block_the_event_loop() -> None:
    started, release = threading.Event(), threading.Event()

    def handler(params: dict[str, Any]) -> str:
        started.set()
        assert release.wait(10), "the loop never released the handler"
        return "done"

    registry = _registry(test__blocking=handler)
    task = asyncio.create_task(registry.dispatch("test.blocking", {}))
    assert await asyncio.to_thread(started.wait, 10)
    # The handler is blocked in its thread, and the loop still runs other work.
    assert await registry.dispatch("system.echo", {"still": "serving"}) == {"still": "serving"}
    assert not task.done()
    release.set()
    assert await task == "done"


async def test_a_callable_object_returning_a_coroutine_is_awaited() -> None:
    class Handler:
        async def __call__(self, params: dict[str, Any]) -> str:
            return "from __call__"

    registry = _registry(test__callable=Handler())
    assert await registry.dispatch("test.callable", {}) == "from __call__"


def test_actions_lists_builtins_and_added_handlers_sorted() -> None:
    registry = _registry(zeta__z=_add, alpha__a=_add)
    assert registry.actions() == ["alpha.a", *BUILTINS, "zeta.z"]
    assert registry.has("alpha.a")
    assert not registry.has("alpha.b")


def test_a_registry_without_builtins_is_empty() -> None:
    assert ServiceRegistry(builtins=False).actions() == []


async def test_module_level_register_dispatch_and_actions(declared: dict[str, Any]) -> None:
    @register("test.module_level")
    async def handler(params: dict[str, Any]) -> str:
        return "ok"

    assert declared["test.module_level"] is handler
    assert "test.module_level" in service_registry.actions()
    assert await service_registry.dispatch("test.module_level", {}) == "ok"


# -- errors -----------------------------------------------------------------------------------


async def test_unknown_action_names_the_near_ones() -> None:
    registry = _registry(content__analyze_video=_add, content__generate=_add)
    with pytest.raises(UnknownAction) as info:
        await registry.dispatch("content.analyse_video", {})
    assert info.value.extra["near"][0] == "content.analyze_video"
    assert "did you mean content.analyze_video" in info.value.detail
    assert info.value.http_status == 404


async def test_unknown_action_with_nothing_near_gives_no_hint() -> None:
    with pytest.raises(UnknownAction) as info:
        await _registry().dispatch("zzzzzz.qqqqqq", {})
    assert info.value.extra["near"] == []
    assert "did you mean" not in info.value.detail


@pytest.mark.parametrize("name", ["../x", "a.b/c", "A.B", "x", "system.echo\n", "a.b.c"])
async def test_dispatch_of_a_malformed_name_is_invalid_params(name: str) -> None:
    with pytest.raises(InvalidParams) as info:
        await _registry().dispatch(name, {})
    assert info.value.http_status == 422


async def test_a_raising_handler_becomes_a_handler_error_with_type_and_message() -> None:
    async def handler(params: dict[str, Any]) -> None:
        raise KeyError("no such video")

    def sync_handler(params: dict[str, Any]) -> None:
        raise ZeroDivisionError("division by zero")

    registry = _registry(test__raises=handler, test__sync_raises=sync_handler)
    with pytest.raises(HandlerError) as info:
        await registry.dispatch("test.raises", {})
    assert info.value.detail == "test.raises raised KeyError: 'no such video'"
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(HandlerError, match="ZeroDivisionError: division by zero"):
        await registry.dispatch("test.sync_raises", {})


async def test_a_cancelled_handler_is_not_turned_into_a_handler_error() -> None:
    async def handler(params: dict[str, Any]) -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await _registry(test__cancelled=handler).dispatch("test.cancelled", {})


@pytest.mark.parametrize(
    "result",
    [
        object(),
        {1, 2},
        b"bytes",
        datetime.date(2024, 1, 1),
        {"nested": [object()]},
        {("tuple", "key"): 1},
        float("nan"),
        {"score": float("inf")},
    ],
    ids=["object", "set", "bytes", "date", "nested", "tuple-key", "nan", "inf"],
)
async def test_a_non_json_result_is_a_handler_error(result: object) -> None:
    async def handler(params: dict[str, Any]) -> object:
        return result

    with pytest.raises(HandlerError, match="not JSON-serialisable"):
        await _registry(test__junk=handler).dispatch("test.junk", {})


async def test_a_result_that_contains_itself_is_a_handler_error() -> None:
    cyclic: list[object] = []
    cyclic.append({"again": cyclic})

    async def handler(params: dict[str, Any]) -> object:
        return cyclic

    with pytest.raises(HandlerError, match="not JSON-serialisable"):
        await _registry(test__cycle=handler).dispatch("test.cycle", {})


@pytest.mark.parametrize(
    "result", [None, True, 0, 1.5, "text", [1, "a", None], {"a": {"b": [1.0, {"c": None}]}}]
)
async def test_a_json_result_is_returned_unchanged(result: object) -> None:
    async def handler(params: dict[str, Any]) -> object:
        return result

    assert await _registry(test__fine=handler).dispatch("test.fine", {}) == result


def test_adding_an_action_twice_is_a_registry_error() -> None:
    registry = _registry(test__twice=_add)

    async def other(params: dict[str, Any]) -> None:
        return None

    with pytest.raises(RegistryError, match=r"'test.twice' is registered twice.*_add.*other"):
        registry.add("test.twice", other)
    registry.add("test.twice", other, replace=True)
    with pytest.raises(RegistryError, match=r"'system\.echo' is registered twice"):
        ServiceRegistry({"system.echo": other})


def test_declaring_an_action_twice_is_a_registry_error() -> None:
    register("test.declared_twice")(_add)
    register("test.declared_twice")(_add)  # the same function again (a reload) is fine

    async def other(params: dict[str, Any]) -> None:
        return None

    with pytest.raises(RegistryError, match=r"'test\.declared_twice' is registered twice"):
        register("test.declared_twice")(other)


def test_registering_a_malformed_name_is_refused() -> None:
    with pytest.raises(InvalidParams):
        register("Bad.Name")
    with pytest.raises(InvalidParams):
        ServiceRegistry({"../x": _add})


# -- EVERREACH_SERVICES modules ---------------------------------------------------------------

MODULE = """
    from service_registry import register

    @register("{action}")
    async def handler(params):
        return {{"from": __name__}}
"""


async def test_from_modules_loads_the_named_modules(services_module: Any) -> None:
    first = services_module(MODULE.format(action="alpha.one"))
    second = services_module(MODULE.format(action="beta.two"))
    registry = ServiceRegistry.from_modules([first, second])
    assert registry.actions() == ["alpha.one", "beta.two", *BUILTINS]
    assert await registry.dispatch("beta.two", {}) == {"from": second}


def test_from_modules_takes_only_the_named_modules_handlers(services_module: Any) -> None:
    named = services_module(MODULE.format(action="alpha.one"))
    other = services_module(MODULE.format(action="gamma.three"))
    ServiceRegistry.from_modules([other])  # declared, but not named below
    assert ServiceRegistry.from_modules([named]).actions() == ["alpha.one", *BUILTINS]


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("raise RuntimeError('no credentials for the scraper')", "RuntimeError: no credentials"),
        ("import module_that_does_not_exist_42", "ModuleNotFoundError"),
        ("def broken(:\n    pass", "SyntaxError"),
        (MODULE.format(action="Bad.Name"), "InvalidParams"),
    ],
    ids=["raises", "missing-import", "syntax-error", "bad-action-name"],
)
def test_a_module_that_fails_to_import_is_a_registry_error_naming_it(
    services_module: Any, source: str, reason: str
) -> None:
    name = services_module(source)
    with pytest.raises(RegistryError) as info:
        ServiceRegistry.from_modules([name])
    message = str(info.value)
    assert f"module {name!r} failed to import" in message
    assert "EVERREACH_SERVICES" in message
    assert reason in message


def test_a_missing_module_is_a_registry_error_naming_it() -> None:
    with pytest.raises(RegistryError, match="module 'no_such_services_module' failed to import"):
        ServiceRegistry.from_modules(["no_such_services_module"])


def test_two_modules_declaring_one_action_is_a_registry_error(services_module: Any) -> None:
    first = services_module(MODULE.format(action="dup.action"))
    second = services_module(MODULE.format(action="dup.action"))
    with pytest.raises(RegistryError) as info:
        ServiceRegistry.from_modules([first, second])
    assert "'dup.action' is registered twice" in str(info.value)
    assert first in str(info.value)
    assert second in str(info.value)


def test_a_module_declaring_a_builtin_is_a_registry_error(services_module: Any) -> None:
    name = services_module(MODULE.format(action="system.echo"))
    with pytest.raises(RegistryError, match=r"'system\.echo' is registered twice"):
        ServiceRegistry.from_modules([name])


async def test_the_e2e_services_module_loads() -> None:
    registry = ServiceRegistry.from_modules(["tests.e2e_services"])
    expected = {
        "content.analyze_video",
        "content.generate",
        "research.keyword",
        "research.platform",
        "dm.send",
        "test.fail",
        "test.sync_add",
    }
    assert expected | set(BUILTINS) <= set(registry.actions())
    assert (await registry.dispatch("test.sync_add", {"a": 2, "b": 3}))["sum"] == 5
    with pytest.raises(HandlerError, match="RuntimeError: boom"):
        await registry.dispatch("test.fail", {})


# -- built-ins --------------------------------------------------------------------------------


async def test_heartbeat() -> None:
    beat = await ServiceRegistry().dispatch("system.heartbeat", {})
    assert beat["alive"] is True
    assert isinstance(beat["ts"], float)
    assert isinstance(beat["host"], str)


async def test_echo_returns_the_params() -> None:
    params = {"a": [1, 2], "b": {"c": None}}
    assert await ServiceRegistry().dispatch("system.echo", params) == params


async def test_self_test_reports_the_registry() -> None:
    report = await _registry(test__one=_add).dispatch("system.self_test", {})
    assert report == {"registry": {"ok": True, "actions": 4}, "ok": True}


async def test_self_test_runs_every_check() -> None:
    registry = ServiceRegistry()

    async def store_ok() -> dict[str, Any]:
        return {"ok": True, "backend": "sqlite"}

    async def bus_ok() -> dict[str, Any]:
        return {"ok": True}

    registry.add_check("store", store_ok)
    registry.add_check("bus", bus_ok)
    report = await registry.dispatch("system.self_test", {})
    assert report["ok"] is True
    assert report["store"] == {"ok": True, "backend": "sqlite"}
    assert report["bus"] == {"ok": True}


async def test_self_test_reports_a_raising_check_and_fails() -> None:
    registry = ServiceRegistry()

    async def store_ok() -> dict[str, Any]:
        return {"ok": True}

    async def cloud_down() -> dict[str, Any]:
        raise ConnectionRefusedError("cloud refused the connection")

    registry.add_check("store", store_ok)
    registry.add_check("cloud", cloud_down)
    report = await registry.dispatch("system.self_test", {})
    assert report["ok"] is False
    assert report["store"] == {"ok": True}
    assert report["cloud"] == {
        "ok": False,
        "error": "ConnectionRefusedError: cloud refused the connection",
    }


async def test_self_test_fails_on_a_check_that_reports_not_ok() -> None:
    registry = ServiceRegistry()

    async def degraded() -> dict[str, Any]:
        return {"ok": False, "detail": "redis down, using sqlite"}

    registry.add_check("bus", degraded)
    report = await registry.dispatch("system.self_test", {})
    assert report["ok"] is False
    assert report["registry"]["ok"] is True


@pytest.mark.prd200
async def test_a_handler_rejecting_its_params_answers_invalid_params() -> None:
    async def strict(params: dict[str, Any]) -> dict[str, Any]:
        raise InvalidParams("'to' is required: the recipient's handle")

    registry = ServiceRegistry({"dm.send": strict})
    with pytest.raises(InvalidParams, match="'to' is required"):
        await registry.dispatch("dm.send", {})


@pytest.mark.prd200
async def test_a_hanging_self_test_check_is_reported_not_waited_for(monkeypatch) -> None:
    import service_registry

    monkeypatch.setattr(service_registry, "SELF_TEST_CHECK_TIMEOUT_S", 0.05)

    async def hangs() -> dict[str, Any]:
        await asyncio.sleep(60)
        return {"ok": True}

    registry = ServiceRegistry()
    registry.add_check("stuck", hangs)
    report = await registry.dispatch("system.self_test", {})
    assert report["stuck"]["ok"] is False and "no answer" in report["stuck"]["error"]
    assert report["ok"] is False


def test_from_modules_imports_from_the_app_dir_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    name = f"cwd_services_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE.format(action="cwd.loaded")))
    try:
        registry = ServiceRegistry.from_modules([name], app_dir=tmp_path)
    finally:
        sys.modules.pop(name, None)
    assert "cwd.loaded" in registry.actions()
    assert sys.path[0] == str(tmp_path.resolve())


def test_a_missing_module_says_where_it_looked_and_how_to_fix_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(RegistryError) as info:
        ServiceRegistry.from_modules(["my_missing_services"], app_dir=tmp_path)
    message = str(info.value)
    assert "no module named 'my_missing_services'" in message
    assert "my_missing_services.py" in message
    assert str(tmp_path.resolve()) in message
    assert "PYTHONPATH" in message


def test_a_module_missing_a_dependency_names_the_dependency_not_the_path(
    services_module: Any,
) -> None:
    name = services_module("import no_such_dependency_xyz\n")
    with pytest.raises(RegistryError) as info:
        ServiceRegistry.from_modules([name])
    assert "no_such_dependency_xyz" in str(info.value)
    assert "looked for" not in str(info.value)


# The console script, not `python -m cli`: `-m` puts the cwd on sys.path by itself, the
# installed `everreach` (what `make run` starts) does not.
EVERREACH = Path(sys.executable).with_name("everreach")


def serve_in(cwd: Path, port: int, **variables: str) -> subprocess.Popen[str]:
    env = clean_env(also=("PYTHONPATH",))
    env.update({"DATA_DIR": str(cwd / "data"), "PORT": str(port), **variables})
    return subprocess.Popen(
        [str(EVERREACH), "serve"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.e2e
@pytest.mark.skipif(not EVERREACH.exists(), reason="the everreach console script is not installed")
def test_serve_loads_a_services_module_from_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "my_services.py").write_text(textwrap.dedent(MODULE.format(action="mine.hello")))
    port = free_port()
    proc = serve_in(tmp_path, port, EVERREACH_SERVICES="my_services")
    try:
        wait_until_serving(proc, port)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/dispatch",
            json={"action": "mine.hello", "params": {"x": 1}},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


@pytest.mark.process
@pytest.mark.skipif(not EVERREACH.exists(), reason="the everreach console script is not installed")
def test_serve_with_a_missing_services_module_says_where_it_looked(tmp_path: Path) -> None:
    proc = serve_in(tmp_path, free_port(), EVERREACH_SERVICES="my_servces")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in err
    assert "no module named 'my_servces'" in err
    assert f"in: {tmp_path.resolve()}" in err
    assert "PYTHONPATH" in err


def test_a_key_scope_gives_handlers_its_key_and_restores_the_outer_one() -> None:
    assert current_idempotency_key() is None
    with idempotency_key_scope("outer-key-1"):
        with pytest.raises(RuntimeError), idempotency_key_scope("inner-key-2"):
            assert current_idempotency_key() == "inner-key-2"
            raise RuntimeError("a handler failed")
        assert current_idempotency_key() == "outer-key-1"
    assert current_idempotency_key() is None


def test_a_checked_action_name_gets_the_same_answer_the_second_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import service_registry
    from errors import InvalidParams

    monkeypatch.setattr(service_registry, "_GOOD_NAMES", set())  # others' names fill it

    class Odd(str):
        """A str subclass: checked by the regex every time, never kept."""

    for _ in range(2):
        assert service_registry.check_action_name("naming.again") == "naming.again"
        for bad in ("Naming.again", "naming.again\n", "naming", 3, None):
            with pytest.raises(InvalidParams):
                service_registry.check_action_name(bad)
    assert "naming.again" in service_registry._GOOD_NAMES
    assert service_registry.check_action_name(Odd("odd.name")) == "odd.name"
    assert "odd.name" not in service_registry._GOOD_NAMES
    monkeypatch.setattr(service_registry, "_MAX_GOOD_NAMES", 1)  # full: checked, not kept
    assert service_registry.check_action_name("naming.more") == "naming.more"
    assert "naming.more" not in service_registry._GOOD_NAMES
