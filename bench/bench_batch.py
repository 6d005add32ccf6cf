"""Benchmark ``POST /batch`` of cloud actions whose handler sleeps, against the ideal wall time.

    python -m bench.bench_batch [--quick] [--items N] [--sleep-ms MS] [--rounds R]
                                [--max-concurrent N ...]

A cloud and a hybrid terminal in the shipped configuration (``bench.common.cloud_and_terminal``,
started as ``everreach serve`` starts them). The cloud handler (``content.analyze_video``)
sleeps ``sleep_ms``, so the cloud is never the limit: ``items * sleep_ms / max_concurrent`` is
the ideal wall time, the baseline every round is compared with.

One row per ``max_concurrent``: each given (``--max-concurrent``, default 50: the figure of the
goal, 1,000 items of 20 ms in 0.4 s ideally) and the highest the terminal accepts, found by
asking it (an empty batch is refused with 422 above the bound), so the bench follows the bound
wherever it is configured. The rows' batches alternate round by round (A/B/A/B…); each round
sends one ``POST /batch`` of ``items`` actions with ``force_env=cloud`` and reads the wall time
and the terminal process's CPU time (``/proc/<pid>/stat``). Reported: median (min..max) over
rounds of the wall time, its ratio to the ideal, the terminal CPU per item and the items/s that
CPU allows. Goal: at most 1.5 times the ideal.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from bench import common

GOAL_RATIO = 1.5
GOAL_CONCURRENCY = 50  # the goal's figure: 1,000 items of 20 ms, 50 in flight, ideally 0.4 s
ACTION = "content.analyze_video"
PROBE_CEILING = 4096  # the highest max_concurrent asked for


def highest_max_concurrent(client: httpx.Client, url: str, ceiling: int = PROBE_CEILING) -> int:
    """The highest ``max_concurrent`` ``POST {url}/batch`` accepts (bisection, empty batches)."""

    def accepted(value: int) -> bool:
        answer = client.post(f"{url}/batch", json={"items": [], "max_concurrent": value})
        if answer.status_code not in (200, 422):
            raise RuntimeError(f"/batch answered {answer.status_code}: {answer.text}")
        return answer.status_code == 200

    if not accepted(1):
        raise RuntimeError("/batch refuses max_concurrent=1")
    low, high = 1, ceiling + 1  # accepted(low); high is refused or past the ceiling
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if accepted(middle) else (low, middle)
    return low


def _bench(
    folder: Path, *, items: int, sleep_ms: float, rounds: int, fixed: Sequence[int]
) -> list[common.Row]:
    params = {"url": "https://example.com/v", "sleep_s": sleep_ms / 1000}
    batch = [{"action": ACTION, "params": params, "force_env": "cloud"}] * items
    with (
        common.cloud_and_terminal(folder, terminal=common.UNCAPPED) as (_, terminal),
        httpx.Client(base_url=terminal.url, headers=common.AUTH, timeout=600) as client,
    ):
        highest = highest_max_concurrent(client, terminal.url)
        concurrencies = [c for c in dict.fromkeys(fixed) if c < highest] + [highest]

        def one_batch(size: int, concurrency: int) -> tuple[float, float]:
            """Wall and terminal CPU seconds of one batch of ``size`` items."""
            cpu_before = common.process_cpu_s(terminal.proc.pid)
            started = time.perf_counter()
            answer = client.post(
                "/batch", json={"items": batch[:size], "max_concurrent": concurrency}
            )
            wall_s = time.perf_counter() - started
            cpu_s = common.process_cpu_s(terminal.proc.pid) - cpu_before
            results = answer.json().get("results") if answer.status_code == 200 else None
            if not results or any(r.get("source") != "cloud" for r in results):
                raise RuntimeError(f"/batch answered {answer.status_code}: {answer.text[:2000]}")
            return wall_s, cpu_s

        one_batch(min(items, 2 * highest), highest)  # warm-up: the terminal's pool to the cloud
        runs: dict[int, list[tuple[float, float]]] = {c: [] for c in concurrencies}
        for _ in range(rounds):
            for concurrency in concurrencies:
                runs[concurrency].append(one_batch(items, concurrency))
    return [
        _row(items, sleep_ms, concurrency, concurrency == highest, runs[concurrency])
        for concurrency in concurrencies
    ]


def _row(
    items: int, sleep_ms: float, concurrency: int, highest: bool, runs: list[tuple[float, float]]
) -> common.Row:
    ideal_s = items * sleep_ms / 1000 / concurrency
    cpu_us = [cpu_s / items * 1e6 for _, cpu_s in runs]
    if not all(cpu_us):  # /proc counts CPU in 10 ms ticks: a small batch may show none
        raise RuntimeError(
            f"the terminal's CPU time for a batch of {items} did not register in /proc's ticks: "
            f"use more items (--items)"
        )
    return {
        "name": f"POST /batch of {items} cloud actions, handler sleeping {sleep_ms:g} ms",
        "items": items,
        "max_concurrent": concurrency,
        "highest_accepted": highest,
        "rounds": len(runs),
        "ideal_s": ideal_s,
        **common.summary("wall_s", [wall_s for wall_s, _ in runs]),
        **common.summary("ratio", [wall_s / ideal_s for wall_s, _ in runs]),
        **common.summary("cpu_us", cpu_us),
        **common.summary("cpu_bound_items_per_s", [1e6 / us for us in cpu_us]),
        "goal_met": common.median(wall_s / ideal_s for wall_s, _ in runs) <= GOAL_RATIO,
    }


def run(
    quick: bool = False,
    *,
    items: int | None = None,
    sleep_ms: float = 20.0,
    rounds: int | None = None,
    max_concurrent: Sequence[int] = (GOAL_CONCURRENCY,),
) -> list[common.Row]:
    """Run the benchmark; a row per ``max_concurrent`` below the highest accepted, then one
    at the highest."""
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as folder:
        return _bench(
            Path(folder),
            items=items or (100 if quick else 1000),
            sleep_ms=sleep_ms,
            rounds=rounds or (3 if quick else 5),
            fixed=max_concurrent,
        )


def markdown(rows: list[common.Row]) -> str:
    """Render rows as a markdown table."""
    return common.table(
        ["batch", "max_concurrent", "rounds", "ideal s",
         "wall s median (min..max)", "wall / ideal", "terminal CPU µs/item",
         "items/s the CPU allows", "goal"],
        [
            [
                r["name"],
                f"{r['max_concurrent']} (highest accepted)" if r["highest_accepted"]
                else r["max_concurrent"],
                r["rounds"], f"{r['ideal_s']:.3f}",
                common.spread(r, "wall_s", "{:.2f}"), common.spread(r, "ratio", "{:.1f}x"),
                common.spread(r, "cpu_us"), common.spread(r, "cpu_bound_items_per_s"),
                common.goal_cell(r["goal_met"], f"<= {GOAL_RATIO:g}x ideal"),
            ]
            for r in rows
        ],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--items", type=int, default=None, help="items per batch (1000)")
    parser.add_argument("--sleep-ms", type=float, default=20.0, help="cloud handler sleep (20)")
    parser.add_argument("--rounds", type=int, default=None, help="batches (>= 3 for a figure)")
    parser.add_argument(
        "--max-concurrent", type=int, nargs="*", default=[GOAL_CONCURRENCY],
        help=f"concurrencies besides the highest accepted ({GOAL_CONCURRENCY})",
    )  # fmt: skip
    args = parser.parse_args(argv)
    rows = run(
        args.quick,
        items=args.items,
        sleep_ms=args.sleep_ms,
        rounds=args.rounds,
        max_concurrent=args.max_concurrent,
    )
    print(markdown(rows))


if __name__ == "__main__":
    main()
