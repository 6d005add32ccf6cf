"""Benchmark the cloud path: hybrid ``/dispatch`` -> cloud, against calling the cloud directly.

    python -m bench.bench_cloud_path [--quick] [--requests N] [--rounds R]

Two real server processes started as ``everreach serve`` starts them, both in the shipped
configuration (``bench.common.cloud_and_terminal``: token, cloud key, JSON dispatch log), each
from its own temporary working directory and ``DATA_DIR``:

- the cloud: ``EVERREACH_ENV=cloud``;
- the terminal: ``EVERREACH_ENV=hybrid``, ``CLOUD_ENDPOINT`` = the cloud, the same key.

One client (``httpx.Client``, one keep-alive connection per server) sends requests one after
another, alternating the two paths request by request so drift hits both alike, in ``rounds``
rounds of ``requests / rounds`` requests per path:

- hybrid: ``POST {terminal}/dispatch`` ``{"action": "research.platform", "force_env": "cloud"}``
  with the bearer token — the terminal reserves the cost in its SQLite ledger, calls the cloud,
  commits the cost, and fills its offline cache in the background;
- direct: ``POST {cloud}/api/services/research/platform`` with the bearer key and a fresh
  ``Idempotency-Key`` (the terminal sends one too, so the cloud does the same work for both).

Reported: p50/p99 of each path and the added p50/p99 (hybrid minus direct), each as the median
(min..max) over rounds, and the terminal process's CPU per hybrid call at one client
(``/proc/<pid>/stat`` over each round; the direct calls do not touch the terminal). Goal: at
most 1.0 ms added at the median and 3.0 ms at p99. To say how much of the added time is the
cost guard on the path, the same run times the router's bracket, ``CostGuard.spend(...,
commit_behind=True)`` around nothing, alone, in this process, on a SQLite ledger in the same
temporary folder (the same disk as the terminal's): a reservation carved from the instance's
budget lease, and its commit queued behind.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC
from decimal import Decimal
from pathlib import Path

import httpx

from bench import common
from cost_guard import CostGuard
from cost_ledger import SqliteLedgerStore

GOAL_ADDED_P50_MS = 1.0
GOAL_ADDED_P99_MS = 3.0
KEY = common.CLOUD_KEY
ACTION = "research.platform"
PARAMS = {"platform": "linkedin", "query": "hybrid orchestrator"}


def _timed(n: int, call: Callable[[], None]) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


async def _cost_guard_samples(folder: Path, n: int) -> list[float]:
    """Seconds of one ``spend(commit_behind=True)`` bracket, the cost guard's work on every
    cloud call the router makes."""
    guard = CostGuard(
        SqliteLedgerStore(folder / "cost_ledger.sqlite3"),
        monthly_cap_usd=Decimal(10**9),  # never refused: the time measured is the reservation
        soft_cap_usd=Decimal(10**9),
        tz=UTC,
    )
    await guard.open()
    try:

        async def pair(i: int) -> None:
            price = Decimal("0.002")
            async with guard.spend(ACTION, price, f"bench-{i}", commit_behind=True) as spend:
                spend.ran(price)

        return await common.time_calls(n, pair, warmup=20)
    finally:
        await guard.close()


def _bench(folder: Path, per_round: int, rounds: int) -> list[common.Row]:
    with (
        common.cloud_and_terminal(folder, terminal=common.UNCAPPED) as (cloud, terminal),
        httpx.Client(timeout=30) as client,
    ):
        hybrid_url = f"{terminal.url}/dispatch"
        hybrid_body = {"action": ACTION, "params": PARAMS, "force_env": "cloud"}
        direct_url = f"{cloud.url}/api/services/{ACTION.replace('.', '/')}"
        direct_body = {"params": PARAMS}

        def hybrid() -> None:
            response = client.post(hybrid_url, json=hybrid_body, headers=common.AUTH)
            body = response.json()
            if response.status_code != 200 or body.get("source") != "cloud":
                raise RuntimeError(f"hybrid dispatch answered {response.status_code}: {body}")

        def direct() -> None:
            headers = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": uuid.uuid4().hex}
            response = client.post(direct_url, json=direct_body, headers=headers)
            if response.status_code != 200 or response.json().get("ok") is not True:
                raise RuntimeError(f"cloud answered {response.status_code}: {response.text}")

        for _ in range(min(50, per_round)):  # warm-up: connections, the terminal's pool
            hybrid()
            direct()
        hybrid_s: list[list[float]] = []
        direct_s: list[list[float]] = []
        terminal_cpu_us: list[float] = []  # per hybrid call; direct calls cost the terminal nil
        for _ in range(rounds):
            hybrid_s.append([])
            direct_s.append([])
            cpu_before = common.process_cpu_s(terminal.proc.pid)
            for _ in range(per_round):  # A/B per request: drift and neighbours hit both alike
                hybrid_s[-1] += _timed(1, hybrid)
                direct_s[-1] += _timed(1, direct)
            cpu_s = common.process_cpu_s(terminal.proc.pid) - cpu_before
            terminal_cpu_us.append(cpu_s / per_round * 1e6)
    guard_s = asyncio.run(_cost_guard_samples(folder, per_round * rounds))

    def row(name: str, by_round: list[list[float]]) -> common.Row:
        return {
            "name": name,
            "n": sum(len(samples) for samples in by_round),
            "rounds": len(by_round),
            **common.summary("p50_ms", [common.median(r) * 1e3 for r in by_round]),
            **common.summary("p99_ms", [common.percentile(r, 0.99) * 1e3 for r in by_round]),
            "added_p50_ms": None,
            "terminal_cpu_us": None,
            "share_of_added": None,
            "goal_met": None,
        }

    hybrid_row = row("hybrid /dispatch -> cloud (force_env=cloud)", hybrid_s)
    hybrid_row.update(common.summary("terminal_cpu_us", terminal_cpu_us))
    for stat, pick in (("p50", common.median), ("p99", lambda r: common.percentile(r, 0.99))):
        added = [(pick(h) - pick(d)) * 1e3 for h, d in zip(hybrid_s, direct_s, strict=True)]
        hybrid_row.update(common.summary(f"added_{stat}_ms", added))
    hybrid_row["goal_met"] = (
        hybrid_row["added_p50_ms"] <= GOAL_ADDED_P50_MS
        and hybrid_row["added_p99_ms"] <= GOAL_ADDED_P99_MS
    )
    guard_row = row("of which: CostGuard.spend, SQLite, same disk", [guard_s])
    added_ms = hybrid_row["added_p50_ms"]
    guard_row["share_of_added"] = guard_row["p50_ms"] / added_ms if added_ms > 0 else None
    return [
        hybrid_row,
        row("direct POST /api/services/research/platform (baseline)", direct_s),
        guard_row,
    ]


def run(quick: bool = False, *, requests: int | None = None, rounds: int = 3) -> list[common.Row]:
    """Run the benchmark; rows for the hybrid path, the direct path and the cost guard alone."""
    per_round = max(1, (requests or (150 if quick else 3000)) // rounds)
    with tempfile.TemporaryDirectory(prefix="bench-cloud-path-") as folder:
        return _bench(Path(folder), per_round, rounds)


def markdown(rows: list[common.Row]) -> str:
    """Render rows as a markdown table."""

    def added(r: common.Row) -> list[str]:
        if r["added_p50_ms"] is not None:
            return [
                common.spread(r, "added_p50_ms", "{:+.2f}"),
                common.spread(r, "added_p99_ms", "{:+.2f}"),
            ]
        if r["share_of_added"] is not None:
            return [f"{r['share_of_added']:.0%} of the added p50", "—"]
        return ["baseline", "baseline"] if "baseline" in r["name"] else ["—", "—"]

    return common.table(
        ["path", "requests", "rounds", "p50 ms median (min..max)", "p99 ms", "added p50 ms",
         "added p99 ms", "terminal CPU µs/call", "goal"],
        [
            [
                r["name"], r["n"], r["rounds"], common.spread(r, "p50_ms", "{:.2f}"),
                common.spread(r, "p99_ms", "{:.2f}"), *added(r),
                "—" if r["terminal_cpu_us"] is None else common.spread(r, "terminal_cpu_us"),
                common.goal_cell(
                    r["goal_met"], f"<= +{GOAL_ADDED_P50_MS:g} / +{GOAL_ADDED_P99_MS:g} ms"
                ),
            ]
            for r in rows
        ],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--requests", type=int, default=None, help="requests per path")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (>= 3 for a figure)")
    args = parser.parse_args(argv)
    print(markdown(run(args.quick, requests=args.requests, rounds=args.rounds)))


if __name__ == "__main__":
    main()
