"""Benchmark ``POST /dispatch`` of ``system.echo`` against a bare FastAPI endpoint, over HTTP.

    python -m bench.bench_http [--quick] [--connections N] [--duration-s S] [--rounds R]

Real server processes started the way the project ships (``bench.common.serve_command``), each
from its own temporary working directory, every store on SQLite (the embedded defaults):

- ``dispatch``: ``local_server:app``, ``EVERREACH_ENV=local``, in the shipped configuration
  (``bench.common.SHIPPED``: ``LOCAL_API_TOKEN`` and ``EVERREACH_CLOUD_KEY`` set, the dispatch
  log line on as JSON lines into a file);
- ``dispatch, no secret`` (full run): the same without the token and the key;
- ``bare``: ``bench.bare_app:app``, which parses the same body and awaits the same echo handler
  (see its docstring), under the same launcher, hence the same uvicorn flags.

Each is run by ``everreach serve`` and, in the full run, by the image's command line (launcher
``docker``), each with its own bare baseline. One load generator loads every server in turn,
``rounds`` times (A/B/C/A/B/C…, so a noisy neighbour hits all alike), after a warm-up of each:
``wrk -t1`` with a Lua script that POSTs the body with the bearer token (if ``wrk`` is on PATH:
Debian/Ubuntu ``apt-get install wrk``); else an httpx load generator in this process, which on
a small machine saturates before the servers do: its numbers are reported, with no verdict.

Per round: requests/s, and the server process's CPU time per request (``/proc/<pid>/stat``,
which moves far less than req/s when neighbours are busy). Reported: median (min..max) over
rounds of each, of the per-round ratio to the bare endpoint of the same launcher, and of the
CPU per request beyond bare. Goals: ``/dispatch`` reaches at least 85 % of the bare endpoint's
requests/s with at most 20 µs of server CPU per request beyond it.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import common

GOAL_RATIO = 0.85
GOAL_CPU_US = 20.0
BODY = {"action": "system.echo", "params": {"text": "hello, hybrid", "n": 42, "tags": ["a", "b"]}}
LUA_SCRIPT = """\
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = {authorization}
"""
_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
DISPATCH_LOG_MARK = '"event": "dispatch"'
NO_SECRET = {
    k: v for k, v in common.SHIPPED.items() if k not in ("LOCAL_API_TOKEN", "EVERREACH_CLOUD_KEY")
}


@dataclass
class LoadResult:
    """One load run against one URL, and the server CPU it cost."""

    requests: int
    duration_s: float
    errors: int
    latency_ms: dict[str, float] = field(default_factory=dict)  # "p50", "p99"
    cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s

    @property
    def cpu_us(self) -> float:
        """Server CPU per request, µs."""
        return self.cpu_s / max(1, self.requests) * 1e6


@dataclass(frozen=True)
class Target:
    """One server to load: what it serves, how it is started, and its baseline."""

    name: str
    app: str
    launcher: str
    variables: dict[str, str]
    path: str
    baseline: str | None  # the name of the bare target of the same launcher; None: it is one


def targets(quick: bool) -> list[Target]:
    """The servers of one run: per launcher a bare baseline and the shipped /dispatch."""
    found = []
    for launcher in ("serve",) if quick else common.LAUNCHERS:
        bare = f"bare FastAPI endpoint ({launcher})"
        dispatch_env = {"EVERREACH_ENV": "local"}
        found += [
            Target(f"POST /dispatch, shipped ({launcher})", "local_server:app", launcher,
                   {**dispatch_env, **common.SHIPPED}, "POST /dispatch", bare),
            Target(bare, "bench.bare_app:app", launcher, {}, "POST /echo", None),
        ]  # fmt: skip
        if not quick and launcher == "serve":
            found.insert(-1, Target(f"POST /dispatch, no secret ({launcher})", "local_server:app",
                                    launcher, {**dispatch_env, **NO_SECRET}, "POST /dispatch",
                                    bare))  # fmt: skip
    return found


# -- load generators ----------------------------------------------------------------------------


def wrk(url: str, script: Path, connections: int, duration_s: float) -> LoadResult:
    """Run ``wrk -t1`` with a Lua ``script`` against ``url``; its parsed report."""
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


async def httpx_load(
    url: str,
    connections: int,
    duration_s: float,
    *,
    body: Any = None,
    headers: dict[str, str] | None = None,
    fresh_key: str | None = None,
) -> LoadResult:
    """POST ``body`` with ``connections`` keep-alive connections for ``duration_s`` (no wrk).

    ``fresh_key``: a header that gets a new random value on every request (Idempotency-Key).
    """
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    samples: list[float] = []
    errors = 0
    async with httpx.AsyncClient(limits=limits, timeout=30, headers=headers) as client:
        deadline = time.perf_counter() + duration_s

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    fresh = {fresh_key: uuid.uuid4().hex} if fresh_key else None
                    response = await client.post(
                        url, json=BODY if body is None else body, headers=fresh
                    )
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
    response = httpx.post(url, json=BODY, headers=common.AUTH, timeout=10)
    body = response.json()
    if response.status_code != 200 or body.get("result") != BODY["params"]:
        raise RuntimeError(f"{url} answered {response.status_code}: {body}")
    if dispatch and body.get("source") != "local":
        raise RuntimeError(f"{url} did not run system.echo locally: {body}")


def _bench(
    folder: Path,
    chosen: list[Target],
    *,
    connections: int,
    duration_s: float,
    rounds: int,
    warmup_s: float,
) -> list[common.Row]:
    use_wrk = shutil.which("wrk") is not None
    if not use_wrk:
        print(f"bench_http: {common.WRK_HINT}; falling back to httpx (no verdict)", flush=True)
    script = folder / "post.lua"
    script.write_text(
        LUA_SCRIPT.format(
            body=json.dumps(json.dumps(BODY)),
            authorization=json.dumps(common.AUTH["Authorization"]),
        )
    )

    def load(server: common.Server, url: str, seconds: float) -> LoadResult:
        cpu_before = common.process_cpu_s(server.proc.pid)
        if use_wrk:
            result = wrk(url, script, connections, seconds)
        else:
            result = asyncio.run(httpx_load(url, connections, seconds, headers=common.AUTH))
        result.cpu_s = common.process_cpu_s(server.proc.pid) - cpu_before
        return result

    results: dict[str, list[LoadResult]] = {t.name: [] for t in chosen}
    specs = [
        common.ServerSpec(t.app, f"server{i}", t.variables, t.launcher)
        for i, t in enumerate(chosen)
    ]
    with common.uvicorn_servers(specs, folder=folder) as started:
        servers = {t.name: server for t, server in zip(chosen, started, strict=True)}
        urls = {t.name: f"{servers[t.name].url}{t.path.split()[1]}" for t in chosen}
        for t in chosen:
            _check(urls[t.name], dispatch=t.baseline is not None)
            if warmup_s:
                load(servers[t.name], urls[t.name], warmup_s)
        for _ in range(rounds):
            for t in chosen:
                results[t.name].append(load(servers[t.name], urls[t.name], duration_s))
        for t in chosen:  # the shipped configuration logs every dispatch: make sure it did
            log = servers[t.name].log_path.read_text(errors="replace")
            if t.baseline is not None and DISPATCH_LOG_MARK not in log:
                raise RuntimeError(f"{t.name} wrote no dispatch log line:\n{log[-2000:]}")

    generator = (
        f"wrk -t1 -c{connections} -d{max(1, round(duration_s))}s" if use_wrk
        else f"httpx async, {connections} connections, {duration_s:g} s (client-bound: no verdict)"
    )  # fmt: skip
    rows = []
    for t in chosen:
        runs = results[t.name]
        row: common.Row = {
            "name": t.name,
            "launcher": t.launcher,
            "generator": generator,
            "rounds": len(runs),
            "requests": sum(r.requests for r in runs),
            **common.summary("rps", [r.rps for r in runs]),
            **common.summary("cpu_us", [r.cpu_us for r in runs]),
            "p50_ms": common.median(r.latency_ms.get("p50", float("nan")) for r in runs),
            "p99_ms": common.median(r.latency_ms.get("p99", float("nan")) for r in runs),
            "errors": sum(r.errors for r in runs),
            "path": t.path,
            "ratio": None,
            "goal_met": None,
        }
        if t.baseline is not None:
            pairs = list(zip(runs, results[t.baseline], strict=True))
            row.update(common.summary("ratio", [d.rps / b.rps for d, b in pairs]))
            row.update(common.summary("overhead_cpu_us", [d.cpu_us - b.cpu_us for d, b in pairs]))
            # A Python load generator on the same cores saturates before the servers do, which
            # makes them look alike; only wrk's numbers decide the goal.
            if use_wrk:
                met = row["ratio"] >= GOAL_RATIO and row["overhead_cpu_us"] <= GOAL_CPU_US
                row["goal_met"] = met
        rows.append(row)
    return rows


def load_settings(quick: bool, duration_s: float | None, rounds: int | None) -> dict[str, Any]:
    """Seconds per load run, rounds and warm-up seconds: as given, else the quick or full ones."""
    return {
        "duration_s": duration_s or (1.0 if quick else 5.0),
        "rounds": rounds or (3 if quick else 5),
        "warmup_s": 0.0 if quick else 2.0,  # quick: a smoke run
    }


def load_main(
    doc: str | None,
    run_bench: Callable[..., list[common.Row]],
    render: Callable[[list[common.Row]], str],
    argv: list[str] | None,
) -> None:
    """The command line of a bench that loads servers: ``--connections --duration-s --rounds``."""
    parser = common.parser(doc)
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    parser.add_argument("--duration-s", type=float, default=None, help="seconds per load run")
    parser.add_argument("--rounds", type=int, default=None, help="load runs per server")
    args = parser.parse_args(argv)
    rows = run_bench(
        args.quick, connections=args.connections, duration_s=args.duration_s, rounds=args.rounds
    )
    print(render(rows))


def run(
    quick: bool = False,
    *,
    connections: int = 32,
    duration_s: float | None = None,
    rounds: int | None = None,
) -> list[common.Row]:
    """Run the benchmark; per launcher, rows for /dispatch (with ratios) then the bare endpoint."""
    with tempfile.TemporaryDirectory(prefix="bench-http-") as folder:
        return _bench(
            Path(folder),
            targets(quick),
            connections=connections,
            **load_settings(quick, duration_s, rounds),
        )


def markdown(rows: list[common.Row]) -> str:
    """Render rows as a markdown table."""

    def versus(r: common.Row) -> list[str]:
        if r["ratio"] is None:
            return ["baseline", "baseline"]
        return [common.spread(r, "ratio", "{:.1%}"), common.spread(r, "overhead_cpu_us", "{:+.0f}")]

    return common.table(
        ["endpoint", "load", "rounds", "req/s median (min..max)", "server CPU µs/req",
         "p50 ms", "p99 ms", "errors", "req/s vs bare", "CPU µs/req beyond bare", "goal"],
        [
            [
                r["name"], r["generator"], r["rounds"],
                common.spread(r, "rps"), common.spread(r, "cpu_us"),
                f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", r["errors"], *versus(r),
                common.goal_cell(
                    r["goal_met"], f">= {GOAL_RATIO:.0%} and <= +{GOAL_CPU_US:.0f} µs"
                ),
            ]
            for r in rows
        ],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    load_main(__doc__, run, markdown, argv)


if __name__ == "__main__":
    main()
