"""Benchmark ``POST /dispatch`` of ``system.echo`` against a bare FastAPI endpoint, over HTTP.

    python -m bench.bench_http [--quick] [--connections N] [--duration-s S] [--rounds R]

Two real uvicorn processes with the same settings (``bench.common.uvicorn_command``: one
worker, the same loop and HTTP implementation, no access log, log level warning), each from its
own temporary working directory:

- the server: ``local_server:app`` with ``EVERREACH_ENV=local`` and every store on SQLite in a
  temporary ``DATA_DIR`` (the embedded defaults; no Redis, no PostgreSQL);
- the baseline: ``bench.bare_app:app``, which parses the same body and awaits the same echo
  handler (see its docstring).

One load generator loads them alternately, ``rounds`` times each (A/B/A/B…, so a noisy
neighbour hits both alike), after a warm-up of each: ``wrk`` with a Lua script that POSTs the
body, if ``wrk`` is on PATH (Debian/Ubuntu: ``apt-get install wrk``); else an httpx async load
generator with ``connections`` keep-alive connections in this process, which on a small machine
saturates before the servers do: its numbers are reported, but give no verdict on the goal.

Reported: the median requests/s over rounds, wrk's latency percentiles (median over rounds),
errors, and the median of the per-round ratios dispatch/bare. Goal: ``/dispatch`` reaches at
least 85 % of the bare endpoint's requests/s.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import common

GOAL_RATIO = 0.85
BODY = {"action": "system.echo", "params": {"text": "hello, hybrid", "n": 42, "tags": ["a", "b"]}}
LUA_SCRIPT = """\
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
"""
_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


@dataclass
class LoadResult:
    """One load run against one URL."""

    requests: int
    duration_s: float
    errors: int
    latency_ms: dict[str, float] = field(default_factory=dict)  # "p50", "p99"

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s


# -- load generators ----------------------------------------------------------------------------


def _wrk(url: str, script: Path, connections: int, duration_s: float) -> LoadResult:
    command = [
        "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--latency",
        "-s", str(script), url,
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300).stdout
    return parse_wrk(out)


def parse_wrk(out: str) -> LoadResult:
    """Requests, duration, errors and latency percentiles from wrk's ``--latency`` report."""
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", out)
    if done is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    socket_errors = re.search(r"Socket errors:(.*)$", out, re.MULTILINE)
    errors = sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1))) if socket_errors else 0
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non_2xx.group(1)) if non_2xx else 0
    latency = {
        f"p{pct}": float(value) * _UNIT_MS[unit]
        for pct, value, unit in re.findall(
            r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE
        )
    }
    return LoadResult(
        requests=int(done.group(1)),
        duration_s=float(done.group(2)) * _UNIT_MS[done.group(3)] / 1e3,
        errors=errors,
        latency_ms=latency,
    )


async def _httpx_load(url: str, connections: int, duration_s: float) -> LoadResult:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    samples: list[float] = []
    errors = 0
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        deadline = time.perf_counter() + duration_s

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    response = await client.post(url, json=BODY)
                except httpx.HTTPError:
                    errors += 1
                    continue
                samples.append(time.perf_counter() - start)
                errors += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        wall_s = time.perf_counter() - started
    return LoadResult(
        requests=len(samples),
        duration_s=wall_s,
        errors=errors,
        latency_ms={
            "p50": common.percentile(samples, 0.5) * 1e3,
            "p99": common.percentile(samples, 0.99) * 1e3,
        },
    )


# -- the benchmark ------------------------------------------------------------------------------


def _check(url: str, dispatch: bool) -> None:
    response = httpx.post(url, json=BODY, timeout=10)
    body = response.json()
    if response.status_code != 200 or body.get("result") != BODY["params"]:
        raise RuntimeError(f"{url} answered {response.status_code}: {body}")
    if dispatch and body.get("source") != "local":
        raise RuntimeError(f"{url} did not run system.echo locally: {body}")


def _bench(
    folder: Path, *, connections: int, duration_s: float, rounds: int, warmup_s: float
) -> list[common.Row]:
    use_wrk = shutil.which("wrk") is not None
    script = folder / "post.lua"
    script.write_text(LUA_SCRIPT.format(body=json.dumps(json.dumps(BODY))))

    def load(url: str, seconds: float) -> LoadResult:
        if use_wrk:
            return _wrk(url, script, connections, seconds)
        return asyncio.run(_httpx_load(url, connections, seconds))

    server_env = {"EVERREACH_ENV": "local"}
    with (
        common.uvicorn_server("local_server:app", name="server", folder=folder,
                              variables=server_env) as server,
        common.uvicorn_server("bench.bare_app:app", name="bare", folder=folder) as bare,
    ):  # fmt: skip
        targets = {"bare": f"{bare.url}/echo", "dispatch": f"{server.url}/dispatch"}
        _check(targets["bare"], dispatch=False)
        _check(targets["dispatch"], dispatch=True)
        for url in targets.values():
            load(url, warmup_s)
        results: dict[str, list[LoadResult]] = {"bare": [], "dispatch": []}
        for _ in range(rounds):
            for name, url in targets.items():
                results[name].append(load(url, duration_s))

    generator = (
        f"wrk -t1 -c{connections} -d{max(1, round(duration_s))}s" if use_wrk
        else f"httpx async, {connections} connections, {duration_s:g} s (client-bound: no verdict)"
    )  # fmt: skip
    ratios = [d.rps / b.rps for d, b in zip(results["dispatch"], results["bare"], strict=True)]
    ratio = common.median(ratios)

    def row(name: str, path: str, runs: list[LoadResult]) -> common.Row:
        return {
            "name": name,
            "generator": generator,
            "rounds": len(runs),
            "requests": sum(r.requests for r in runs),
            "rps": common.median(r.rps for r in runs),
            "rps_min": min(r.rps for r in runs),
            "rps_max": max(r.rps for r in runs),
            "p50_ms": common.median(r.latency_ms.get("p50", float("nan")) for r in runs),
            "p99_ms": common.median(r.latency_ms.get("p99", float("nan")) for r in runs),
            "errors": sum(r.errors for r in runs),
            "path": path,
            "server": f"uvicorn 1 worker, --loop {common.UVICORN_LOOP} "
            f"--http {common.UVICORN_HTTP}",
        }

    bare_row = row("bare FastAPI endpoint (baseline)", "POST /echo", results["bare"])
    bare_row.update(ratio=None, ratio_min=None, goal_met=None)
    dispatch_row = row("POST /dispatch system.echo", "POST /dispatch", results["dispatch"])
    # A Python load generator on the same 2 cores saturates before the servers do, which makes
    # the two look alike; only wrk's numbers decide the goal.
    goal_met = ratio >= GOAL_RATIO if use_wrk else None
    dispatch_row.update(ratio=ratio, ratio_min=min(ratios), goal_met=goal_met)
    return [dispatch_row, bare_row]


def run(
    quick: bool = False,
    *,
    connections: int = 32,
    duration_s: float | None = None,
    rounds: int | None = None,
) -> list[common.Row]:
    """Run the benchmark; one row for /dispatch (with the ratio) and one for the bare endpoint."""
    with tempfile.TemporaryDirectory(prefix="bench-http-") as folder:
        return _bench(
            Path(folder),
            connections=connections,
            duration_s=duration_s or (1.0 if quick else 5.0),
            rounds=rounds or (1 if quick else 5),
            warmup_s=1.0 if quick else 2.0,
        )


def markdown(rows: list[common.Row]) -> str:
    """Render rows as a markdown table."""

    def ratio(r: dict[str, Any]) -> str:
        if r["ratio"] is None:
            return "baseline"
        return f"{r['ratio']:.1%} (worst round {r['ratio_min']:.1%})"

    return common.table(
        ["endpoint", "load", "rounds", "req/s (median)", "min..max req/s", "p50 ms", "p99 ms",
         "errors", "vs bare", "goal"],
        [
            [
                r["name"], r["generator"], r["rounds"], f"{r['rps']:,.0f}",
                f"{r['rps_min']:,.0f}..{r['rps_max']:,.0f}", f"{r['p50_ms']:.2f}",
                f"{r['p99_ms']:.2f}", r["errors"], ratio(r),
                common.goal_cell(r["goal_met"], f">= {GOAL_RATIO:.0%}"),
            ]
            for r in rows
        ],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    parser.add_argument("--duration-s", type=float, default=None, help="seconds per load run")
    parser.add_argument("--rounds", type=int, default=None, help="load runs per endpoint")
    args = parser.parse_args(argv)
    rows = run(
        args.quick, connections=args.connections, duration_s=args.duration_s, rounds=args.rounds
    )
    print(markdown(rows))


if __name__ == "__main__":
    main()
