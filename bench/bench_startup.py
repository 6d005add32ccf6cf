"""Benchmark start-up: importing the server module, start to first 200 on /health, idle memory.

    python -m bench.bench_startup [--quick] [--rounds R]      (--quick: one round, a smoke run)

Each round, alternately for the project and its baseline (A/B/A/B…):

- import: a fresh interpreter times ``import local_server`` against ``import fastapi`` (in the
  process, so the interpreter's own start is in neither);
- ready: wall time from starting the server (``local_server:app``, shipped configuration,
  SQLite in a temporary ``DATA_DIR``) until ``GET /health`` first answers 200, polled every
  10 ms, once as ``everreach serve`` and once as the image's command line; the baseline is the
  bare FastAPI app under the same launcher;
- CPU until ready: the CPU time (user + system, ``/proc/<pid>/stat``, all its threads) that
  same process had used when ``/health`` first answered: on a shared machine the wall time
  above mostly measures the neighbours, this much less;
- idle RSS: the resident memory of that same process once it answered a few /health calls.

Reported: median (min..max) over rounds of each and of the per-round ratio to its baseline.
Goals: import at most 0.45 s, ready in at most 0.5 s, idle RSS at most 60 MiB (CPU: no goal).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench import common

IMPORT_TIMER = (
    "import time; started = time.perf_counter(); import {module}; "
    "print(time.perf_counter() - started)"
)
GOALS: dict[str, float | None] = {"import": 0.45, "ready": 0.5, "cpu": None, "rss": 60.0}


def import_s(module: str, folder: Path) -> float:
    """Seconds a fresh interpreter takes to import ``module`` (run from ``folder``)."""
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_TIMER.format(module=module)],
        cwd=folder,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(common.ROOT)},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return float(out.strip().splitlines()[-1])


def start_s_cpu_s_and_rss_mib(
    app: str, folder: Path, name: str, launcher: str
) -> tuple[float, float, float]:
    """Seconds from start to the first 200 on /health, the server's CPU seconds by then, and
    the idle RSS after it."""
    variables = {"EVERREACH_ENV": "local", **common.SHIPPED}
    started = time.perf_counter()
    with common.uvicorn_server(
        app, name=name, folder=folder, variables=variables, launcher=launcher
    ) as server:
        ready_s = time.perf_counter() - started
        cpu_s = common.process_cpu_s(server.proc.pid)
        for _ in range(5):
            httpx.get(f"{server.url}/health", timeout=10).raise_for_status()
        return ready_s, cpu_s, common.process_rss_mib(server.proc.pid)


def _bench(folder: Path, rounds: int, launchers: tuple[str, ...]) -> list[common.Row]:
    measured: dict[str, list[tuple[float, float]]] = {"import": []}
    for module in ("local_server", "fastapi") if rounds > 1 else ():  # .pyc files, page cache
        import_s(module, folder)
    for index in range(rounds):
        measured["import"].append((import_s("local_server", folder), import_s("fastapi", folder)))
        for launcher in launchers:
            name = f"{launcher}{index}"
            mine = start_s_cpu_s_and_rss_mib("local_server:app", folder, f"server-{name}", launcher)
            bare = start_s_cpu_s_and_rss_mib("bench.bare_app:app", folder, f"bare-{name}", launcher)
            for key, ours, theirs in zip(("ready", "cpu", "rss"), mine, bare, strict=True):
                measured.setdefault(f"{key} {launcher}", []).append((ours, theirs))

    def row(key: str, name: str, baseline: str, unit: str) -> common.Row:
        pairs = measured[key]
        summary = {
            **common.summary("value", [mine for mine, _ in pairs]),
            **common.summary("baseline", [base for _, base in pairs]),
            **common.summary("ratio", [mine / base for mine, base in pairs]),
        }
        goal = GOALS[key.split()[0]]
        met = None if goal is None else summary["value"] <= goal
        return {"name": name, "baseline_name": baseline, "unit": unit, "rounds": len(pairs),
                "goal": goal, "goal_met": met, **summary}  # fmt: skip

    rows = [row("import", "import local_server", "import fastapi", "s")]
    for launcher in launchers:
        how = {"serve": "everreach serve", "docker": "the image's command"}[launcher]
        baseline = f"bare app, {how}"
        rows += [
            row(f"ready {launcher}", f"{how}: start -> first 200 on /health", baseline, "s"),
            row(f"cpu {launcher}", f"{how}: server CPU until first 200", baseline, "s"),
            row(f"rss {launcher}", f"{how}: idle RSS", baseline, "MiB"),
        ]
    return rows


def run(quick: bool = False, *, rounds: int | None = None) -> list[common.Row]:
    """Run the benchmark; one row per figure (import, ready, idle RSS)."""
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as folder:
        launchers = ("serve",) if quick else common.LAUNCHERS
        return _bench(Path(folder), rounds or (1 if quick else 5), launchers)


def markdown(rows: list[common.Row]) -> str:
    """Render rows as a markdown table."""
    fmt: dict[str, Callable[[common.Row, str], str]] = {
        "s": lambda r, key: common.spread(r, key, "{:.3f} s"),
        "MiB": lambda r, key: common.spread(r, key, "{:.0f} MiB"),
    }
    return common.table(
        ["figure", "rounds", "median (min..max)", "baseline", "baseline median (min..max)",
         "ratio to baseline", "goal"],
        [
            [
                r["name"], r["rounds"], fmt[r["unit"]](r, "value"), r["baseline_name"],
                fmt[r["unit"]](r, "baseline"), common.spread(r, "ratio", "{:.2f}x"),
                common.goal_cell(r["goal_met"], f"<= {r['goal']:g} {r['unit']}")
                if r["goal"] is not None else "—",
            ]
            for r in rows
        ],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--rounds", type=int, default=None, help="rounds (>= 3 for a figure)")
    args = parser.parse_args(argv)
    print(markdown(run(args.quick, rounds=args.rounds)))


if __name__ == "__main__":
    main()
