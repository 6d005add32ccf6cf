"""Benchmark the router in-process: ``HybridOrchestrator.route()`` against awaiting the handler.

    python -m bench.bench_routing [--quick]

The orchestrator is the production one with ``EVERREACH_ENV=local``: a real ``ServiceRegistry``
holding one no-op async handler, a ``LocalExecutor`` (with its circuit breaker) and the bundled
route table; no cost guard, cache, cloud or connectivity (none of them is consulted on the local
path). The baseline awaits the same handler directly.

Machine noise (another process taking the core for a moment) is cancelled by interleaving: each
round times a batch of ``route()`` calls, then a batch of direct calls (A/B/A/B…). The table
reports the median over rounds of the per-call time of each, and the median of the per-round
differences — the routing overhead. Goal: under 20 µs per call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench import common
from config.hybrid_config import HybridConfig
from hybrid_orchestrator import HybridOrchestrator
from local_executor import LocalExecutor
from route_table import RouteTable
from service_registry import ServiceRegistry

GOAL_OVERHEAD_US = 20.0
# An action of the bundled table (preferred_env local), so the table lookup is a real one.
ACTION = "content.analyze_video"
PARAMS = {"url": "https://example.com/v.mp4", "lang": "en"}


async def _noop(params: dict[str, Any]) -> dict[str, Any]:
    return params


def build_orchestrator() -> HybridOrchestrator:
    """The orchestrator under test: env=local, real registry/executor/route table, nothing else."""
    config = HybridConfig.from_mapping({"EVERREACH_ENV": "local"})
    registry = ServiceRegistry({ACTION: _noop}, builtins=False)
    return HybridOrchestrator(config, local=LocalExecutor(registry), route_table=RouteTable.load())


async def _batch_s(calls: int, call: Callable[[], Awaitable[Any]]) -> float:
    """Seconds per call over ``calls`` awaited one after another."""
    start = time.perf_counter()
    for _ in range(calls):
        await call()
    return (time.perf_counter() - start) / calls


async def _bench(rounds: int, calls: int) -> list[common.Row]:
    orchestrator = build_orchestrator()
    probe = await orchestrator.route(ACTION, PARAMS)
    if not (probe.ok and probe.result == PARAMS):
        raise RuntimeError(f"route() did not reach the handler: {probe.to_dict()}")

    def routed() -> Awaitable[Any]:
        return orchestrator.route(ACTION, PARAMS)

    def direct() -> Awaitable[Any]:
        return _noop(PARAMS)

    await _batch_s(calls, routed)  # warm-up: route memo, first calls
    await _batch_s(calls, direct)
    routed_us: list[float] = []
    direct_us: list[float] = []
    for _ in range(rounds):
        routed_us.append(await _batch_s(calls, routed) * 1e6)
        direct_us.append(await _batch_s(calls, direct) * 1e6)
    overhead = common.median(r - d for r, d in zip(routed_us, direct_us, strict=True))
    route_row = {
        "name": "HybridOrchestrator.route() -> no-op handler (env=local)",
        "calls": rounds * calls,
        "per_call_us": common.median(routed_us),
        "best_round_us": min(routed_us),
        "overhead_us": overhead,
        "goal_met": overhead < GOAL_OVERHEAD_US,
    }
    direct_row = {
        "name": "await handler(params) directly (baseline)",
        "calls": rounds * calls,
        "per_call_us": common.median(direct_us),
        "best_round_us": min(direct_us),
        "overhead_us": None,
        "goal_met": None,
    }
    return [route_row, direct_row]


def run(quick: bool = False) -> list[common.Row]:
    """Run the benchmark; one row for ``route()`` and one for the direct call (µs per call)."""
    rounds, calls = (5, 200) if quick else (41, 2000)
    return asyncio.run(_bench(rounds, calls))


def markdown(rows: list[common.Row]) -> str:
    """Render rows as a markdown table."""
    return common.table(
        ["path", "calls", "µs/call (median of rounds)", "best round µs", "overhead µs", "goal"],
        [
            [
                r["name"], r["calls"], f"{r['per_call_us']:.2f}", f"{r['best_round_us']:.2f}",
                "baseline" if r["overhead_us"] is None else f"{r['overhead_us']:.2f}",
                common.goal_cell(r["goal_met"], f"< {GOAL_OVERHEAD_US:g} µs"),
            ]
            for r in rows
        ],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__).parse_args(argv)
    print(markdown(run(args.quick)))


if __name__ == "__main__":
    main()
