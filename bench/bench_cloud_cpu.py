"""Benchmark the terminal's CPU per cloud-bound call, and how many cloud calls/s it makes.

    python -m bench.bench_cloud_cpu [--quick] [--connections N] [--duration-s S] [--rounds R]

A cloud and a hybrid terminal in the shipped configuration (``bench.common.cloud_and_terminal``,
started as ``everreach serve`` starts them), the cloud action a no-op (``research.platform``).
``rounds`` alternating rounds (A/B/A/B…) of ``wrk -t1 -cN`` (else the httpx load generator):

- A, hybrid: ``POST {terminal}/dispatch`` ``{"action": "research.platform", "force_env":
  "cloud"}`` with the bearer token: every request is one cloud call made by the terminal;
- B, direct (the baseline): ``POST {cloud}/api/services/research/platform`` with the bearer key
  and a fresh ``Idempotency-Key`` per request, i.e. what the cloud does to serve one call.

Per round: calls/s, and the CPU time of each process per call (``/proc/<pid>/stat``): the
terminal's alone is the figure. Reported as median (min..max) over rounds, with the ratio of the
terminal's CPU per call to the cloud's CPU per direct call in the same round. Goal: at most
1.0 ms of terminal CPU per cloud call (>= 1,000 cloud calls/s per terminal process).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from bench import common
from bench.bench_http import LoadResult, httpx_load, load_main, load_settings, wrk

GOAL_CPU_US = 1000.0
ACTION = "research.platform"
PARAMS = {"platform": "linkedin", "query": "hybrid orchestrator"}
HYBRID_BODY = {"action": ACTION, "params": PARAMS, "force_env": "cloud"}
DIRECT_BODY = {"params": PARAMS}
CLOUD_AUTH = {"Authorization": f"Bearer {common.CLOUD_KEY}"}
LUA_SCRIPT = """\
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = {authorization}
local n = 0
request = function()
  n = n + 1
  wrk.headers["Idempotency-Key"] = {prefix} .. n
  return wrk.format()
end
"""


def _script(folder: Path, name: str, body: Any, headers: dict[str, str]) -> Path:
    """A wrk script that POSTs ``body`` with a fresh ``Idempotency-Key`` on every request."""
    path = folder / f"{name}.lua"
    path.write_text(
        LUA_SCRIPT.format(
            body=json.dumps(json.dumps(body)),
            authorization=json.dumps(headers["Authorization"]),
            prefix=json.dumps(f"bench-{uuid.uuid4().hex[:12]}-"),
        )
    )
    return path


def _bench(
    folder: Path, *, connections: int, duration_s: float, rounds: int, warmup_s: float
) -> list[common.Row]:
    use_wrk = shutil.which("wrk") is not None
    if not use_wrk:
        print(f"bench_cloud_cpu: {common.WRK_HINT}; falling back to httpx", flush=True)
    with common.cloud_and_terminal(folder, terminal=common.UNCAPPED) as (cloud, terminal):
        paths = {
            "hybrid": (f"{terminal.url}/dispatch", HYBRID_BODY, common.AUTH),
            "direct": (f"{cloud.url}/api/services/research/platform", DIRECT_BODY, CLOUD_AUTH),
        }
        scripts = {name: _script(folder, name, body, h) for name, (_, body, h) in paths.items()}

        def load(name: str, seconds: float) -> tuple[LoadResult, float, float]:
            """One load run; the terminal's and the cloud's CPU seconds during it."""
            url, body, headers = paths[name]
            before = [common.process_cpu_s(s.proc.pid) for s in (terminal, cloud)]
            if use_wrk:
                result = wrk(url, scripts[name], connections, seconds)
            else:
                result = asyncio.run(
                    httpx_load(url, connections, seconds, body=body, headers=headers,
                               fresh_key="Idempotency-Key")
                )  # fmt: skip
            after = [common.process_cpu_s(s.proc.pid) for s in (terminal, cloud)]
            return result, after[0] - before[0], after[1] - before[1]

        for name in paths:
            if warmup_s:
                load(name, warmup_s)
        runs: dict[str, list[tuple[LoadResult, float, float]]] = {"hybrid": [], "direct": []}
        for _ in range(rounds):
            for name in paths:
                runs[name].append(load(name, duration_s))
    log = terminal.log_path.read_text(errors="replace")
    if '"source": "cloud"' not in log:
        raise RuntimeError(f"the terminal logged no dispatch to the cloud:\n{log[-2000:]}")

    def per_call_us(cpu_s: float, result: LoadResult) -> float:
        return cpu_s / max(1, result.requests) * 1e6

    hybrid, direct = runs["hybrid"], runs["direct"]
    direct_cloud_us = [per_call_us(cloud_s, r) for r, _, cloud_s in direct]
    terminal_us = [per_call_us(term_s, r) for r, term_s, _ in hybrid]
    ratios = [t / d for t, d in zip(terminal_us, direct_cloud_us, strict=True)]
    generator = f"wrk -t1 -c{connections}" if use_wrk else f"httpx, {connections} connections"
    hybrid_row: common.Row = {
        "name": "terminal POST /dispatch -> cloud, no-op handler",
        "generator": generator,
        "rounds": rounds,
        "errors": sum(r.errors for r, _, _ in hybrid),
        **common.summary("calls_per_s", [r.rps for r, _, _ in hybrid]),
        **common.summary("terminal_cpu_us", terminal_us),
        **common.summary("cloud_cpu_us", [per_call_us(c, r) for r, _, c in hybrid]),
        **common.summary("ratio", ratios),
    }
    hybrid_row["goal_met"] = hybrid_row["terminal_cpu_us"] <= GOAL_CPU_US
    direct_row: common.Row = {
        "name": "direct POST /api/services/research/platform (baseline)",
        "generator": generator,
        "rounds": rounds,
        "errors": sum(r.errors for r, _, _ in direct),
        **common.summary("calls_per_s", [r.rps for r, _, _ in direct]),
        "terminal_cpu_us": None,
        **common.summary("cloud_cpu_us", direct_cloud_us),
        "ratio": None,
        "goal_met": None,
    }
    return [hybrid_row, direct_row]


def run(
    quick: bool = False,
    *,
    connections: int = 32,
    duration_s: float | None = None,
    rounds: int | None = None,
) -> list[common.Row]:
    """Run the benchmark; a row for the cloud calls through the terminal and the direct ones."""
    with tempfile.TemporaryDirectory(prefix="bench-cloud-cpu-") as folder:
        return _bench(
            Path(folder), connections=connections, **load_settings(quick, duration_s, rounds)
        )


def markdown(rows: list[common.Row]) -> str:
    """Render rows as a markdown table."""

    def cpu(r: common.Row, key: str) -> str:
        return "—" if r[key] is None else common.spread(r, key)

    return common.table(
        ["path", "load", "rounds", "calls/s median (min..max)", "terminal CPU µs/call",
         "cloud CPU µs/call", "terminal CPU / cloud CPU per direct call", "errors", "goal"],
        [
            [
                r["name"], r["generator"], r["rounds"], common.spread(r, "calls_per_s"),
                cpu(r, "terminal_cpu_us"), cpu(r, "cloud_cpu_us"),
                "baseline" if r["ratio"] is None else common.spread(r, "ratio", "{:.2f}x"),
                r["errors"], common.goal_cell(r["goal_met"], f"<= {GOAL_CPU_US:,.0f} µs"),
            ]
            for r in rows
        ],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    load_main(__doc__, run, markdown, argv)


if __name__ == "__main__":
    main()
