"""batch_execute through a real orchestrator (env local): order, bounded concurrency, isolation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from config.hybrid_config import HybridConfig
from envelope import Envelope
from errors import InvalidParams, Source
from hybrid_orchestrator import HybridOrchestrator
from local_batch import MAX_BATCH_ITEMS, MAX_CONCURRENT_LIMIT, BatchItem, batch_execute, parse_items
from local_executor import LocalExecutor
from route_table import RouteTable
from service_registry import ServiceRegistry

pytestmark = pytest.mark.prd200


class Gauge:
    """Handler that tracks how many of its calls run at once, and finishes out of order."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.calls = 0

    async def __call__(self, params: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            # Later items take fewer steps, so they would finish first if nothing bounded them.
            for _ in range(int(params.get("steps", 1))):
                await asyncio.sleep(0)
            if params.get("fail"):
                raise RuntimeError(f"piece {params['n']} is broken")
            return {"piece": params["n"]}
        finally:
            self.active -= 1


def _router(tmp_path: Path, gauge: Gauge) -> Callable[..., Any]:
    config = HybridConfig.from_mapping({"EVERREACH_ENV": "local", "DATA_DIR": str(tmp_path)})

    async def generate(params: dict[str, Any]) -> dict[str, Any]:
        return await gauge(params)

    registry = ServiceRegistry({"content.generate": generate})
    orchestrator = HybridOrchestrator(
        config, local=LocalExecutor(registry), route_table=RouteTable.load()
    )
    return orchestrator.route


def _pieces(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"action": "content.generate", "params": {"n": i, "steps": 3 * (n - i), **extra}}
        for i in range(n)
    ]


async def test_ten_content_pieces_give_ten_results_in_input_order(tmp_path: Path) -> None:
    gauge = Gauge()
    out = await batch_execute(_pieces(10), route=_router(tmp_path, gauge))
    results = out["results"]
    assert len(results) == 10
    assert [r["result"] for r in results] == [{"piece": i} for i in range(10)]
    assert all(r["ok"] and r["source"] == "local" for r in results)
    assert out["summary"]["total"] == 10
    assert out["summary"]["ok"] == 10
    assert out["summary"]["failed"] == 0
    assert out["summary"]["by_source"] == {"local": 10}
    assert gauge.calls == 10


@pytest.mark.parametrize("max_concurrent", [1, 2, 3, 5])
async def test_no_more_than_max_concurrent_items_run_at_once(
    tmp_path: Path, max_concurrent: int
) -> None:
    gauge = Gauge()
    out = await batch_execute(
        _pieces(12), max_concurrent=max_concurrent, route=_router(tmp_path, gauge)
    )
    assert gauge.peak == max_concurrent  # reached, never passed
    assert [r["result"]["piece"] for r in out["results"]] == list(range(12))


async def test_the_default_bound_is_three(tmp_path: Path) -> None:
    gauge = Gauge()
    await batch_execute(_pieces(10), route=_router(tmp_path, gauge))
    assert gauge.peak == 3


async def test_one_failing_item_does_not_fail_the_others(tmp_path: Path) -> None:
    gauge = Gauge()
    items = _pieces(5)
    items[2]["params"]["fail"] = True
    out = await batch_execute(items, route=_router(tmp_path, gauge))
    results = out["results"]
    assert [r["ok"] for r in results] == [True, True, False, True, True]
    assert results[2]["error"] == "handler_error"
    assert "piece 2 is broken" in results[2]["detail"]
    assert [r["result"] for r in results if r["ok"]] == [{"piece": i} for i in (0, 1, 3, 4)]
    assert out["summary"]["failed"] == 1
    assert out["summary"]["ok"] == 4


async def test_bad_actions_become_error_results_not_a_failed_batch(tmp_path: Path) -> None:
    gauge = Gauge()
    items: list[dict[str, Any]] = [
        {"action": "content.generate", "params": {"n": 0}},
        {"action": "No Such Thing"},
        {"action": "nosuch.action", "params": {}},
        {"action": "system.echo", "params": {"x": 1}, "force_env": "moon"},
        {"action": "system.echo", "params": {"x": 2}},
    ]
    out = await batch_execute(items, route=_router(tmp_path, gauge))
    assert [r["error"] for r in out["results"]] == [
        None,
        "invalid_params",
        "unknown_action",
        "invalid_params",
        None,
    ]
    assert out["results"][4]["result"] == {"x": 2}
    # unknown_action came from the local registry; the invalid ones never got a source
    assert out["summary"]["by_source"] == {"local": 3, "none": 2}
    assert out["summary"]["failed"] == 3


async def test_force_env_per_item_is_passed_to_the_router() -> None:
    seen: list[tuple[str, dict[str, Any] | None, str | None]] = []

    async def route(action: str, params: dict[str, Any] | None, force_env: str | None) -> Any:
        seen.append((action, params, force_env))
        return Envelope(ok=True, action=action, source=Source.LOCAL, result=None)

    await batch_execute(
        [
            {"action": "dm.send", "params": {"to": "a"}, "force_env": "local"},
            BatchItem("dm.send", {"to": "b"}),
        ],
        max_concurrent=1,
        route=route,
    )
    assert seen == [("dm.send", {"to": "a"}, "local"), ("dm.send", {"to": "b"}, None)]


async def test_a_router_that_raises_for_one_item_fails_only_that_item() -> None:
    async def route(action: str, params: dict[str, Any] | None, force_env: str | None) -> Any:
        assert params is not None
        if params["n"] == 1:
            raise OSError("disk full")  # e.g. the outbox could not write
        return Envelope(ok=True, action=action, source=Source.LOCAL, result=params["n"])

    items = [{"action": "dm.send", "params": {"n": n}} for n in range(3)]
    out = await batch_execute(items, route=route)
    assert [r["ok"] for r in out["results"]] == [True, False, True]
    failed = out["results"][1]
    assert failed["error"] == "handler_error"
    assert "OSError: disk full" in failed["detail"]
    assert failed["request_id"]  # still a real id to find the log line by


async def test_progress_is_reported_once_per_item(tmp_path: Path) -> None:
    progress: list[tuple[int, int]] = []
    await batch_execute(
        _pieces(4),
        route=_router(tmp_path, Gauge()),
        on_progress=lambda done, total: progress.append((done, total)),
    )
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]


async def test_an_empty_batch_is_an_empty_result(tmp_path: Path) -> None:
    out = await batch_execute([], route=_router(tmp_path, Gauge()))
    assert out["results"] == []
    assert out["summary"]["total"] == 0


@pytest.mark.parametrize(
    ("items", "named"),
    [
        ([{"action": "system.echo"}, "not an object"], "items[1]"),
        ([{"params": {}}], "items[0]"),
        ([{"action": 7}], "items[0]"),
        ([{"action": "system.echo"}, {"action": "system.echo", "params": [1]}], "items[1].params"),
    ],
)
async def test_invalid_items_are_refused_naming_the_index(
    tmp_path: Path, items: list[Any], named: str
) -> None:
    gauge = Gauge()
    with pytest.raises(InvalidParams) as caught:
        await batch_execute(items, route=_router(tmp_path, gauge))
    assert named in caught.value.detail
    assert gauge.calls == 0  # nothing ran: the batch is refused as a whole


def test_parse_items_defaults_missing_params_to_an_empty_object() -> None:
    assert parse_items([{"action": "system.echo"}]) == [BatchItem("system.echo", {}, None)]


async def test_too_many_items_are_refused(tmp_path: Path) -> None:
    items = [{"action": "system.echo"}] * (MAX_BATCH_ITEMS + 1)
    with pytest.raises(InvalidParams, match=str(MAX_BATCH_ITEMS)):
        await batch_execute(items, route=_router(tmp_path, Gauge()))


@pytest.mark.parametrize("max_concurrent", [0, -1, MAX_CONCURRENT_LIMIT + 1])
async def test_max_concurrent_out_of_bounds_is_invalid_params(
    tmp_path: Path, max_concurrent: int
) -> None:
    with pytest.raises(InvalidParams, match="max_concurrent"):
        await batch_execute(_pieces(2), max_concurrent, route=_router(tmp_path, Gauge()))


@pytest.mark.parametrize("max_concurrent", [1, MAX_CONCURRENT_LIMIT])
async def test_max_concurrent_at_the_bounds_is_accepted(
    tmp_path: Path, max_concurrent: int
) -> None:
    gauge = Gauge()
    out = await batch_execute(
        _pieces(MAX_CONCURRENT_LIMIT + 4), max_concurrent, route=_router(tmp_path, gauge)
    )
    assert out["summary"]["ok"] == MAX_CONCURRENT_LIMIT + 4
    assert gauge.peak == max_concurrent


async def test_a_lower_configured_limit_refuses_what_the_default_accepts(tmp_path: Path) -> None:
    route = _router(tmp_path, Gauge())
    await batch_execute(_pieces(2), 3, route=route, max_concurrent_limit=3)
    with pytest.raises(InvalidParams, match="between 1 and 2"):
        await batch_execute(_pieces(2), 3, route=route, max_concurrent_limit=2)
