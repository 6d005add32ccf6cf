"""Benchmark ``POST /batch`` of cloud actions whose handler sleeps, against the ideal wall time.

    python -m bench.bench_batch [--quick] [--items N] [--sleep-ms MS] [--rounds R]

A cloud and a hybrid terminal in the shipped configuration (``bench.common.cloud_and_terminal``,
started as ``everreach serve`` starts them). The cloud handler (``content.analyze_video``)
sleeps ``sleep_ms``, so the cloud is never the limit: ``items * sleep_ms / max_concurrent`` is
the ideal wall time, the baseline every round is compared with.

``max_concurrent`` is the highest the terminal accepts, found by asking it (an empty batch is
refused with 422 above the bound), so the bench follows the bound wherever it is configured.
Each round sends one ``POST /batch`` of ``items`` actions with ``force_env=cloud`` and reads the
wall time and the terminal process's CPU time (``/proc/<pid>/stat``). Reported: median
(min..max) over rounds of the wall time, its ratio to the ideal, the terminal CPU per item and
the items/s that CPU allows. Goal: at most 1.5 times the ideal.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import httpx

from bench import common

GOAL_RATIO = 1.5
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


def _bench(folder: Path, *, items: int, sleep_ms: float, rounds: int) -> list[common.Row]:
    params = {"url": "https://example.com/v", "sleep_s": sleep_ms / 1000}
    batch = [{"action": ACTION, "params": params, "force_env": "cloud"}] * items
    with (
        common.cloud_and_terminal(folder, terminal=common.UNCAPPED) as (_, terminal),
        httpx.Client(base_url=terminal.url, headers=common.AUTH, timeout=600) as client,
    ):
        concurrency = highest_max_concurrent(client, terminal.url)
        ideal_s = items * sleep_ms / 1000 / concurrency

        def one_batch(size: int) -> tuple[float, float]:
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

        one_batch(min(items, 2 * concurrency))  # warm-up: the terminal's pool to the cloud
        runs = [one_batch(items) for _ in range(rounds)]
    cpu_us = [cpu_s / items * 1e6 for _, cpu_s in runs]
    return [
        {
            "name": f"POST /batch of {items} cloud actions, handler sleeping {sleep_ms:g} ms",
            "items": items,
            "max_concurrent": concurrency,
            "rounds": rounds,
            "ideal_s": ideal_s,
            **common.summary("wall_s", [wall_s for wall_s, _ in runs]),
            **common.summary("ratio", [wall_s / ideal_s for wall_s, _ in runs]),
            **common.summary("cpu_us", cpu_us),
            **common.summary("cpu_bound_items_per_s", [1e6 / us for us in cpu_us]),
            "goal_met": common.median(wall_s / ideal_s for wall_s, _ in runs) <= GOAL_RATIO,
        }
    ]


def run(
    quick: bool = False,
    *,
    items: int | None = None,
    sleep_ms: float = 20.0,
    rounds: int | None = None,
) -> list[common.Row]:
    """Run the benchmark; one row."""
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as folder:
        return _bench(
            Path(folder),
            items=items or (100 if quick else 1000),
            sleep_ms=sleep_ms,
            rounds=rounds or (3 if quick else 5),
        )


def markdown(rows: list[common.Row]) -> str:
    """Render rows as a markdown table."""
    return common.table(
        ["batch", "max_concurrent (highest accepted)", "rounds", "ideal s",
         "wall s median (min..max)", "wall / ideal", "terminal CPU µs/item",
         "items/s the CPU allows", "goal"],
        [
            [
                r["name"], r["max_concurrent"], r["rounds"], f"{r['ideal_s']:.3f}",
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
    args = parser.parse_args(argv)
    print(markdown(run(args.quick, items=args.items, sleep_ms=args.sleep_ms, rounds=args.rounds)))


if __name__ == "__main__":
    main()
