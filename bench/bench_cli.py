"""Benchmark the ``everreach`` command line: its start-up, one dispatch, and a batch.

    python -m bench.bench_cli [--quick] [--items N]

Against one real server (``local_server:app``, ``EVERREACH_ENV=local``, SQLite in a temporary
``DATA_DIR``, the same uvicorn settings as every bench server):

- start-up: wall time of a whole ``python -m cli routes --json`` process (offline: config, the
  route table, the classifier, JSON out) and of ``python -m cli dispatch system.echo`` (plus
  one HTTP round trip), against the baseline of a process that only imports what the CLI
  cannot avoid (``import httpx, rich.console``). Median of the runs.
- batch: ``items`` ``system.echo`` calls sent by the client (``cli_client.send_batch``, one
  ``POST /dispatch`` per item, at most 3 and 8 in flight) against the same items in one
  ``POST /batch`` (``--server-side``; the server runs 3 at once). Items per second, median of
  the rounds; the client-side runs are in this process, so interpreter start-up is not in them.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx

from bench import common
from cli_client import Server, send_batch

ECHO = {"action": "system.echo", "params": {"text": "hello, hybrid", "n": 42}}


def _process_s(argv: list[str], runs: int) -> float:
    samples = []
    for _ in range(runs + 1):  # the first run warms the page cache and .pyc files
        started = time.perf_counter()
        subprocess.run(argv, cwd=common.ROOT, check=True, capture_output=True)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples[1:])


def _startup_rows(url: str, runs: int) -> list[dict[str, Any]]:
    python = sys.executable
    baseline = _process_s([python, "-c", "import httpx, rich.console"], runs)
    rows = [
        {
            "name": "python -c 'import httpx, rich.console' (baseline)",
            "value": baseline,
            "unit": "ms",
            "vs": None,
        }
    ]
    for name, argv in (
        ("everreach routes --json", [python, "-m", "cli", "routes", "--json"]),
        (
            "everreach dispatch system.echo",
            [python, "-m", "cli", "dispatch", "system.echo", "--url", url],
        ),
    ):
        took = _process_s(argv, runs)
        rows.append({"name": name, "value": took, "unit": "ms", "vs": took / baseline})
    return rows


def _batch_rows(url: str, items: int, rounds: int) -> list[dict[str, Any]]:
    batch = [ECHO] * items
    server = Server(url, timeout_s=60.0)

    def server_side() -> None:
        answer = httpx.post(f"{url}/batch", json={"items": batch, "max_concurrent": 3}, timeout=60)
        answer.raise_for_status()

    def client_side(max_concurrent: int) -> None:
        results = asyncio.run(send_batch(server, batch, max_concurrent=max_concurrent))
        assert all(r["ok"] for r in results)

    runs = {
        f"POST /batch of {items} (server-side, 3 at once)": server_side,
        f"send_batch of {items}, 3 in flight": lambda: client_side(3),
        f"send_batch of {items}, 8 in flight": lambda: client_side(8),
    }
    per_s: dict[str, list[float]] = {name: [] for name in runs}
    for warm_up in runs.values():
        warm_up()
    for _ in range(rounds):  # A/B/C/A/B/C...: a noisy neighbour hits all alike
        for name, run_once in runs.items():
            started = time.perf_counter()
            run_once()
            per_s[name].append(items / (time.perf_counter() - started))
    first = next(iter(runs))
    baseline = statistics.median(per_s[first])
    return [
        {
            "name": f"{name} (baseline)" if name == first else name,
            "value": statistics.median(values),
            "unit": "items/s",
            "vs": None if name == first else statistics.median(values) / baseline,
        }
        for name, values in per_s.items()
    ]


def run(
    quick: bool = False, *, items: int = 200, runs: int | None = None, rounds: int | None = None
) -> list[dict[str, Any]]:
    """Start-up rows (median of ``runs`` processes each) and batch rows (``rounds`` rounds)."""
    runs = runs or (3 if quick else 10)
    rounds = rounds or (2 if quick else 5)
    with (
        common.temp_folder("bench-cli-") as folder,
        common.uvicorn_server(
            "local_server:app", name="cli", folder=folder, variables={"EVERREACH_ENV": "local"}
        ) as srv,
    ):
        return _startup_rows(srv.url, runs) + _batch_rows(srv.url, items, rounds)


def markdown(rows: list[dict[str, Any]]) -> str:
    """Render rows as a markdown table."""
    return common.table(
        ["path", "median", "vs baseline"],
        [
            [
                row["name"],
                f"{row['value'] * 1000:.0f} ms" if row["unit"] == "ms"
                else f"{row['value']:,.0f} items/s",
                "baseline" if row["vs"] is None else f"{row['vs']:.2f}",
            ]
            for row in rows
        ],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--items", type=int, default=200, help="items per batch (200)")
    args = parser.parse_args(argv)
    print(markdown(run(args.quick, items=args.items)))


if __name__ == "__main__":
    main()
