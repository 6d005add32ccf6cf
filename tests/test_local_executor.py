"""LocalExecutor: the envelope of a local run and the per-action circuit breaker (fake clock)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from errors import CircuitOpen, ErrorCode, HandlerError, InvalidParams, Source, UnknownAction
from local_executor import LocalExecutor
from service_registry import ServiceRegistry

pytestmark = pytest.mark.prd200

RESET_S = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


class Flaky:
    """A handler that fails while ``failing`` is set, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.failing = True

    async def __call__(self, params: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        if self.failing:
            raise RuntimeError("scraper crashed")
        return {"fine": True}


def _executor(clock: Clock, **handlers: Any) -> LocalExecutor:
    registry = ServiceRegistry({name.replace("__", "."): h for name, h in handlers.items()})
    return LocalExecutor(registry, reset_after_s=RESET_S, clock=clock)


async def _fail(executor: LocalExecutor, action: str, times: int) -> None:
    for _ in range(times):
        with pytest.raises(HandlerError):
            await executor.run(action, {})


async def test_execute_returns_an_ok_local_envelope() -> None:
    async def analyze(params: dict[str, Any]) -> dict[str, Any]:
        return {"frames": params["n"] * 2}

    executor = _executor(Clock(), content__analyze_video=analyze)
    envelope = await executor.execute("content.analyze_video", {"n": 21}, request_id="r-1")
    body = envelope.to_dict()
    assert body["ok"] is True
    assert body["result"] == {"frames": 42}
    assert body["source"] == "local"
    assert body["error"] is None
    assert body["request_id"] == "r-1"
    assert body["attempts"] == 1
    assert isinstance(body["duration_ms"], float) and body["duration_ms"] >= 0
    assert envelope.http_status == 200


async def test_sync_handlers_run_too() -> None:
    def count(params: dict[str, Any]) -> int:
        return len(params)

    executor = _executor(Clock(), text__count=count)
    assert await executor.run("text.count", {"a": 1, "b": 2}) == 2


async def test_execute_turns_a_handler_failure_into_a_handler_error_envelope() -> None:
    executor = _executor(Clock(), scrape__page=Flaky())
    envelope = await executor.execute("scrape.page", {})
    assert envelope.ok is False
    assert envelope.error is ErrorCode.HANDLER_ERROR
    assert envelope.source is Source.LOCAL
    assert "RuntimeError: scraper crashed" in (envelope.detail or "")
    assert envelope.http_status == 500


async def test_has_tells_whether_a_local_handler_exists() -> None:
    executor = _executor(Clock(), scrape__page=Flaky())
    assert executor.has("scrape.page")
    assert executor.has("system.echo")
    assert not executor.has("dm.send")


async def test_three_consecutive_failures_degrade_the_action_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flaky = Flaky()
    executor = _executor(Clock(), scrape__page=flaky)
    with caplog.at_level(logging.WARNING, logger="everreach.local"):
        await _fail(executor, "scrape.page", 2)
        assert not executor.is_degraded("scrape.page")
        assert caplog.records == []
        await _fail(executor, "scrape.page", 1)
    assert executor.is_degraded("scrape.page")
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "local action degraded"
    assert record.__dict__["action"] == "scrape.page"
    assert record.__dict__["failures"] == 3
    assert executor.circuits() == {"scrape.page": "open"}


async def test_a_degraded_action_fails_fast_without_calling_the_handler() -> None:
    flaky = Flaky()
    executor = _executor(Clock(), scrape__page=flaky)
    await _fail(executor, "scrape.page", 3)
    with pytest.raises(CircuitOpen) as caught:
        await executor.run("scrape.page", {})
    assert caught.value.never_ran is True
    envelope = await executor.execute("scrape.page", {})
    assert envelope.error is ErrorCode.CIRCUIT_OPEN
    assert envelope.http_status == 503
    assert flaky.calls == 3


async def test_the_breaker_is_per_action() -> None:
    executor = _executor(Clock(), scrape__page=Flaky())
    await _fail(executor, "scrape.page", 3)
    assert await executor.run("system.echo", {"still": "works"}) == {"still": "works"}
    assert not executor.is_degraded("system.echo")


async def test_a_success_resets_the_consecutive_count() -> None:
    flaky = Flaky()
    executor = _executor(Clock(), scrape__page=flaky)
    await _fail(executor, "scrape.page", 2)
    flaky.failing = False
    await executor.run("scrape.page", {})
    flaky.failing = True
    await _fail(executor, "scrape.page", 2)
    assert not executor.is_degraded("scrape.page")
    assert flaky.calls == 5


async def test_a_degraded_action_is_tried_again_after_reset_after_s() -> None:
    clock = Clock()
    flaky = Flaky()
    executor = _executor(clock, scrape__page=flaky)
    await _fail(executor, "scrape.page", 3)
    clock.now += RESET_S - 1
    with pytest.raises(CircuitOpen):
        await executor.run("scrape.page", {})
    clock.now += 1
    assert not executor.is_degraded("scrape.page")  # half-open: one trial may go
    flaky.failing = False
    assert await executor.run("scrape.page", {}) == {"fine": True}
    assert flaky.calls == 4
    assert executor.circuits() == {}
    flaky.failing = True
    await _fail(executor, "scrape.page", 2)  # a fresh count: two failures do not degrade
    assert not executor.is_degraded("scrape.page")


async def test_a_failed_trial_degrades_the_action_again() -> None:
    clock = Clock()
    flaky = Flaky()
    executor = _executor(clock, scrape__page=flaky)
    await _fail(executor, "scrape.page", 3)
    clock.now += RESET_S
    await _fail(executor, "scrape.page", 1)
    assert executor.is_degraded("scrape.page")
    with pytest.raises(CircuitOpen):
        await executor.run("scrape.page", {})
    assert flaky.calls == 4


@pytest.mark.parametrize(
    ("action", "error"),
    [("nosuch.thing", UnknownAction), ("Not An Action", InvalidParams)],
)
async def test_caller_errors_do_not_count_towards_the_breaker(
    action: str, error: type[Exception]
) -> None:
    executor = _executor(Clock(), scrape__page=Flaky())
    for _ in range(5):
        with pytest.raises(error):
            await executor.run(action, {})
    assert not executor.is_degraded(action)
    assert executor.circuits() == {}
    envelope = await executor.execute(action, {})
    assert envelope.error in (ErrorCode.UNKNOWN_ACTION, ErrorCode.INVALID_PARAMS)


async def test_the_threshold_is_configurable() -> None:
    registry = ServiceRegistry({"scrape.page": Flaky()})
    executor = LocalExecutor(registry, failure_threshold=1, clock=Clock())
    await _fail(executor, "scrape.page", 1)
    assert executor.is_degraded("scrape.page")


@pytest.mark.parametrize(
    "params",
    [{"x": float("nan")}, {"x": float("inf")}, {"x": "\ud800"}],
    ids=["nan", "infinity", "lone-surrogate"],
)
async def test_params_that_are_not_json_are_the_callers_fault_not_a_handler_failure(
    params: dict[str, Any],
) -> None:
    async def echo(p: dict[str, Any]) -> dict[str, Any]:
        return p

    executor = _executor(Clock(), test__echo=echo)
    for _ in range(3):
        envelope = await executor.execute("test.echo", params)
        assert envelope.error is ErrorCode.INVALID_PARAMS
    assert executor.circuits() == {}
    assert (await executor.execute("test.echo", {"x": 1})).ok
