"""Benchmark the cloud path: hybrid ``/dispatch`` -> cloud, against calling the cloud directly.

    python -m bench.bench_cloud_path [--quick] [--requests N]

Two real uvicorn processes (the settings of ``bench.common.uvicorn_command``), each from its own
temporary working directory and ``DATA_DIR``, both with ``EVERREACH_SERVICES=tests.e2e_services``:

- the cloud: ``EVERREACH_ENV=cloud``, no ``CLOUD_ENDPOINT``, ``EVERREACH_CLOUD_KEY`` set;
- the terminal: ``EVERREACH_ENV=hybrid``, ``CLOUD_ENDPOINT`` = the cloud, the same key.

One client (``httpx.Client``, one keep-alive connection per server) sends requests one after
another, alternating the two paths request by request so drift hits both alike:

- hybrid: ``POST {terminal}/dispatch`` ``{"action": "research.platform", "force_env": "cloud"}``
  — the terminal reserves the cost in its SQLite ledger, calls the cloud, commits the cost, and
  fills its offline cache in the background;
- direct: ``POST {cloud}/api/services/research/platform`` with the bearer key and a fresh
  ``Idempotency-Key`` (the terminal sends one too, so the cloud does the same work for both).

Reported: p50/p99 of each and the difference of the medians. Goal: at most 1.5 ms added at the
median. To say how much of the added time is the cost guard on the path, the same run times
``CostGuard.reserve()`` + ``commit()`` alone, in this process, on a SQLite ledger in the same
temporary folder (the same disk as the terminal's ledger).
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

GOAL_ADDED_MS = 1.5
KEY = "bench-cloud-key-0123456789"
ACTION = "research.platform"
PARAMS = {"platform": "linkedin", "query": "hybrid orchestrator"}
SERVICES = {"EVERREACH_SERVICES": "tests.e2e_services"}


def _timed(n: int, call: Callable[[], None]) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


async def _cost_guard_samples(folder: Path, n: int) -> list[float]:
    """Seconds of one reserve()+commit() pair, the cost guard's work on every cloud call."""
    guard = CostGuard(
        SqliteLedgerStore(folder / "cost_ledger.sqlite3"),
        monthly_cap_usd=Decimal(10**9),  # never refused: the time measured is the reservation
        soft_cap_usd=Decimal(10**9),
        tz=UTC,
    )
    await guard.open()
    try:

        async def pair(i: int) -> None:
            reservation = await guard.reserve(ACTION, Decimal("0.002"), f"bench-{i}")
            await guard.commit(reservation, Decimal("0.002"))

        return await common.time_calls(n, pair, warmup=20)
    finally:
        await guard.close()


def _bench(folder: Path, n: int) -> list[common.Row]:
    cloud_env = {**SERVICES, "EVERREACH_ENV": "cloud", "EVERREACH_CLOUD_KEY": KEY}
    with common.uvicorn_server("local_server:app", name="cloud", folder=folder,
                               variables=cloud_env) as cloud:  # fmt: skip
        terminal_env = {
            **SERVICES, "EVERREACH_ENV": "hybrid", "CLOUD_ENDPOINT": cloud.url,
            "EVERREACH_CLOUD_KEY": KEY,
        }  # fmt: skip
        with (
            common.uvicorn_server("local_server:app", name="terminal", folder=folder,
                                  variables=terminal_env) as terminal,
            httpx.Client(timeout=30) as client,
        ):  # fmt: skip
            hybrid_url = f"{terminal.url}/dispatch"
            hybrid_body = {"action": ACTION, "params": PARAMS, "force_env": "cloud"}
            direct_url = f"{cloud.url}/api/services/{ACTION.replace('.', '/')}"
            direct_body = {"params": PARAMS}

            def hybrid() -> None:
                response = client.post(hybrid_url, json=hybrid_body)
                body = response.json()
                if response.status_code != 200 or body.get("source") != "cloud":
                    raise RuntimeError(f"hybrid dispatch answered {response.status_code}: {body}")

            def direct() -> None:
                headers = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": uuid.uuid4().hex}
                response = client.post(direct_url, json=direct_body, headers=headers)
                if response.status_code != 200 or response.json().get("ok") is not True:
                    raise RuntimeError(f"cloud answered {response.status_code}: {response.text}")

            for _ in range(min(50, n)):  # warm-up: connections, the terminal's pool to the cloud
                hybrid()
                direct()
            hybrid_s: list[float] = []
            direct_s: list[float] = []
            for _ in range(n):  # A/B per request: drift and noisy neighbours hit both alike
                hybrid_s += _timed(1, hybrid)
                direct_s += _timed(1, direct)
    guard_s = asyncio.run(_cost_guard_samples(folder, n))

    added_ms = (common.median(hybrid_s) - common.median(direct_s)) * 1e3
    guard_ms = common.median(guard_s) * 1e3

    def row(name: str, samples: list[float]) -> common.Row:
        return {
            "name": name,
            "n": len(samples),
            "p50_ms": common.median(samples) * 1e3,
            "p99_ms": common.percentile(samples, 0.99) * 1e3,
            "added_p50_ms": None,
            "share_of_added": None,
            "goal_met": None,
        }

    hybrid_row = row("hybrid /dispatch -> cloud (force_env=cloud)", hybrid_s)
    hybrid_row.update(added_p50_ms=added_ms, goal_met=added_ms <= GOAL_ADDED_MS)
    guard_row = row("of which: CostGuard reserve+commit, SQLite, same disk", guard_s)
    guard_row["share_of_added"] = guard_ms / added_ms if added_ms > 0 else None
    return [
        hybrid_row,
        row("direct POST /api/services/research/platform (baseline)", direct_s),
        guard_row,
    ]


def run(quick: bool = False, *, requests: int | None = None) -> list[common.Row]:
    """Run the benchmark; rows for the hybrid path, the direct path and the cost guard alone."""
    with tempfile.TemporaryDirectory(prefix="bench-cloud-path-") as folder:
        return _bench(Path(folder), requests or (100 if quick else 2000))


def markdown(rows: list[common.Row]) -> str:
    """Render rows as a markdown table."""

    def added(r: common.Row) -> str:
        if r["added_p50_ms"] is not None:
            return f"+{r['added_p50_ms']:.3f}"
        if r["share_of_added"] is not None:
            return f"{r['share_of_added']:.0%} of the added time"
        return "baseline" if "baseline" in r["name"] else "—"

    return common.table(
        ["path", "requests", "p50 ms", "p99 ms", "added at p50 ms", "goal"],
        [
            [
                r["name"], r["n"], f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}", added(r),
                common.goal_cell(r["goal_met"], f"<= {GOAL_ADDED_MS:g} ms"),
            ]
            for r in rows
        ],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--requests", type=int, default=None, help="requests per path")
    args = parser.parse_args(argv)
    print(markdown(run(args.quick, requests=args.requests)))


if __name__ == "__main__":
    main()
