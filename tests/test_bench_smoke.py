"""Smoke tests of the benchmarks: each ``run(quick=True)`` returns well-formed rows.

Nothing here asserts a speed (speed is what ``python -m bench`` reports); the tests check that
every bench still runs against the current code and answers with rows its table can render.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import __main__ as bench_main
from bench import common
from bench.bench_http import parse_wrk

pytestmark = pytest.mark.prd200
SIGNED = ("overhead", "added")

WRK_OUTPUT = """\
Running 1s test @ http://127.0.0.1:18190/echo
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   420.14us  481.17us   5.28ms   95.60%
    Req/Sec    11.60k     0.93k   13.39k    72.73%
  Latency Distribution
     50%  328.00us
     75%  356.00us
     90%  443.00us
     99%    3.26ms
  12668 requests in 1.10s, 2.62MB read
  Socket errors: connect 0, read 2, write 1, timeout 0
  Non-2xx or 3xx responses: 5
Requests/sec:  11523.59
Transfer/sec:      2.38MB
"""


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {
        key: value
        for key, value in row.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def _check_rows(module: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows are named dicts of finite numbers, and the module's table renders each one."""
    assert rows, "a bench returned no rows"
    measured = [row for row in rows if "skipped" not in row]
    assert measured, f"every row was skipped: {rows}"
    for row in rows:
        assert isinstance(row["name"], str) and row["name"]
    for row in measured:
        numbers = _numbers(row)
        assert numbers, f"row without numbers: {row}"
        for key, value in numbers.items():
            assert math.isfinite(value), f"{row['name']}: {key}={value}"
            # Differences (overhead, added time) are signed; everything else is a count or time.
            assert value >= 0 or key.startswith(SIGNED), f"{row['name']}: {key}={value}"
    table = module.markdown(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert all(line.startswith("|") and line.endswith("|") for line in table)
    return measured


# Every bench `python -m bench` runs; the server benches have tests of their own below, and
# bench_pacing in test_bench_pacing.py (it needs the test Redis).
OWN_TESTS = (
    "bench_http", "bench_cloud_path", "bench_cloud_cpu", "bench_batch", "bench_startup",
    "bench_pacing",
)  # fmt: skip
GENERIC = [name for name in bench_main.BENCHES if name not in OWN_TESTS]
# Smaller than --quick where a bench takes a size: the smoke test runs each code path once.
SMOKE_SIZES: dict[str, dict[str, Any]] = {"bench_cli": {"items": 20, "runs": 1, "rounds": 1}}


# Left out of `make test-fast`: bench_sync_bus and bench_cli start processes, and the others
# still run for seconds each.
@pytest.mark.process
@pytest.mark.parametrize("name", GENERIC)
def test_bench_quick_run_returns_well_formed_rows(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the benches' SQLite files go under ./data
    module = importlib.import_module(f"bench.{name}")
    _check_rows(module, module.run(quick=True, **SMOKE_SIZES.get(name, {})))


def test_routing_bench_reports_route_against_the_direct_call() -> None:
    from bench import bench_routing

    routed, direct = bench_routing.run(quick=True)
    assert routed["calls"] == direct["calls"] > 0
    assert routed["per_call_us"] > 0 and direct["per_call_us"] > 0
    assert isinstance(routed["goal_met"], bool) and direct["goal_met"] is None
    assert direct["overhead_us"] is None and isinstance(routed["overhead_us"], float)


def _within_rounds(row: dict[str, Any], key: str) -> None:
    assert row[f"{key}_min"] <= row[key] <= row[f"{key}_max"], (row["name"], key)


@pytest.mark.e2e
def test_http_bench_loads_both_servers_without_errors() -> None:
    from bench import bench_http

    rows = bench_http.run(quick=True, connections=4, rounds=2)  # two: a spread to check
    dispatch, bare = _check_rows(bench_http, rows)
    assert dispatch["path"] == "POST /dispatch" and bare["path"] == "POST /echo"
    assert dispatch["errors"] == 0 and bare["errors"] == 0
    assert dispatch["requests"] > 0 and bare["requests"] > 0
    assert dispatch["rounds"] == bare["rounds"] == 2
    # A median over rounds of per-round ratios and CPU differences, with their spread.
    _within_rounds(dispatch, "ratio")
    _within_rounds(dispatch, "overhead_cpu_us")
    assert dispatch["cpu_us"] > 0 and bare["cpu_us"] > 0
    # Only wrk decides the goal; the httpx fallback is client-bound and gives no verdict.
    assert isinstance(dispatch["goal_met"], bool) == (shutil.which("wrk") is not None)


@pytest.mark.e2e
def test_cloud_path_bench_compares_hybrid_with_direct_and_times_the_cost_guard() -> None:
    from bench import bench_cloud_path

    rows = bench_cloud_path.run(quick=True, requests=30)
    hybrid, direct, guard = _check_rows(bench_cloud_path, rows)
    assert [r["n"] for r in rows] == [30, 30, 30]
    assert hybrid["rounds"] == direct["rounds"] == 3
    _within_rounds(hybrid, "added_p50_ms")
    _within_rounds(hybrid, "added_p99_ms")
    assert hybrid["terminal_cpu_us"] > 0
    assert isinstance(hybrid["goal_met"], bool)
    assert guard["p50_ms"] > 0


def test_parse_wrk_reads_requests_errors_and_latency_percentiles() -> None:
    result = parse_wrk(WRK_OUTPUT)
    assert result.requests == 12668
    assert result.duration_s == pytest.approx(1.10)
    assert result.errors == 3 + 5
    assert result.latency_ms == pytest.approx({"p50": 0.328, "p99": 3.26})


def test_parse_wrk_refuses_output_without_a_request_count() -> None:
    with pytest.raises(RuntimeError, match="unexpected wrk output"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


@pytest.mark.parametrize(
    ("samples", "fraction", "expected"),
    [
        ([3.0], 0.5, 3.0),
        ([4.0, 1.0, 3.0, 2.0], 0.5, 3.0),  # nearest rank: sorted[int(4 * 0.5)]
        ([float(i) for i in range(100)], 0.99, 99.0),
        ([float(i) for i in range(10)], 0.99, 9.0),
        ([5.0, 1.0], 1.0, 5.0),
    ],
)
def test_percentile_is_nearest_rank(samples: list[float], fraction: float, expected: float) -> None:
    assert common.percentile(samples, fraction) == expected


def test_percentile_of_no_samples_is_an_error() -> None:
    with pytest.raises(ValueError):
        common.percentile([], 0.5)


def test_table_aligns_numbers_right_and_the_first_column_left() -> None:
    assert common.table(["path", "n"], [["a", 1], ["b", 22]]).splitlines() == [
        "| path | n |",
        "|---|---:|",
        "| a | 1 |",
        "| b | 22 |",
    ]


@pytest.mark.process
def test_bench_runner_writes_the_selected_tables_with_their_commands(tmp_path: Path) -> None:
    output = tmp_path / "results" / "latest.md"
    status = bench_main.main(["--quick", "--only", "routing", "--output", str(output)])
    text = output.read_text(encoding="utf-8")
    assert status == 0
    assert "`python -m bench --quick --only routing --output" in text
    assert "## bench_routing" in text and "`python -m bench.bench_routing --quick`" in text
    assert "| HybridOrchestrator.route()" in text
    assert "## bench_http" not in text


def test_bench_runner_refuses_an_unknown_bench_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_main.main(["--only", "nope"])
    assert "no bench 'nope'" in capsys.readouterr().err


@pytest.mark.process
def test_bench_runner_reports_a_failing_bench_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import bench_routing

    def broken(quick: bool = False) -> list[dict[str, Any]]:
        raise RuntimeError("handler vanished")

    monkeypatch.setattr(bench_routing, "run", broken)
    output = tmp_path / "latest.md"
    assert bench_main.main(["--quick", "--only", "routing", "--output", str(output)]) == 1
    assert "RuntimeError: handler vanished" in output.read_text(encoding="utf-8")


@pytest.mark.e2e
def test_cloud_cpu_bench_reads_the_terminals_cpu_per_cloud_call() -> None:
    from bench import bench_cloud_cpu

    rows = bench_cloud_cpu.run(quick=True, connections=4, duration_s=1.0, rounds=2)
    hybrid, direct = _check_rows(bench_cloud_cpu, rows)
    assert hybrid["errors"] == 0 and direct["errors"] == 0
    assert hybrid["calls_per_s"] > 0 and direct["calls_per_s"] > 0
    assert hybrid["terminal_cpu_us"] > 0 and direct["terminal_cpu_us"] is None
    assert hybrid["cloud_cpu_us"] > 0 and direct["cloud_cpu_us"] > 0
    _within_rounds(hybrid, "ratio")
    assert isinstance(hybrid["goal_met"], bool) and direct["goal_met"] is None


@pytest.mark.e2e
def test_batch_bench_runs_cloud_batches_at_50_and_the_highest_accepted_concurrency() -> None:
    from bench import bench_batch

    # 100 items: enough terminal CPU (>= 10 ms) to show in /proc's ticks every round.
    rows = _check_rows(bench_batch, bench_batch.run(quick=True, items=100, rounds=2))
    assert (rows[0]["max_concurrent"], rows[0]["highest_accepted"]) == (50, False)
    assert rows[-1]["highest_accepted"] and rows[-1]["max_concurrent"] > 50
    for row in rows:
        assert row["items"] == 100 and row["rounds"] == 2
        assert row["ideal_s"] == pytest.approx(100 * 0.020 / row["max_concurrent"])
        _within_rounds(row, "wall_s")
        # A batch of sleeping handlers cannot beat its ideal wall time.
        assert row["wall_s_min"] >= row["ideal_s"] * 0.99
        assert row["cpu_us"] > 0


@pytest.mark.parametrize(("bound", "ceiling"), [(1, 64), (32, 64), (37, 4096), (64, 64)])
def test_highest_max_concurrent_finds_the_bound_by_bisection(bound: int, ceiling: int) -> None:
    import httpx

    from bench.bench_batch import highest_max_concurrent

    asked: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        value = json.loads(request.content)["max_concurrent"]
        asked.append(value)
        return httpx.Response(200 if value <= bound else 422, json={})

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        assert highest_max_concurrent(client, "http://terminal", ceiling) == min(bound, ceiling)
    assert len(asked) <= 2 + ceiling.bit_length()


def test_highest_max_concurrent_refuses_a_server_that_answers_otherwise() -> None:
    import httpx

    from bench.bench_batch import highest_max_concurrent

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": "unauthorized"})

    with (
        httpx.Client(transport=httpx.MockTransport(handler)) as client,
        pytest.raises(RuntimeError, match="401"),
    ):
        highest_max_concurrent(client, "http://terminal")


@pytest.mark.e2e
def test_startup_bench_times_import_ready_and_idle_memory_against_baselines() -> None:
    from bench import bench_startup

    rows = bench_startup.run(quick=True, rounds=1)
    imported, ready, cpu, rss = _check_rows(bench_startup, rows)
    assert imported["baseline_name"] == "import fastapi"
    assert ready["unit"] == cpu["unit"] == "s" and rss["unit"] == "MiB"
    assert cpu["goal"] is None and "CPU" in cpu["name"]
    for row in rows:
        assert row["value"] > 0 and row["baseline"] > 0
        assert row["ratio"] == pytest.approx(row["value"] / row["baseline"])


@pytest.mark.e2e
def test_bare_app_runs_under_everreach_serve_with_its_flags(tmp_path: Path) -> None:
    import httpx

    with common.uvicorn_server(
        "bench.bare_app:app", name="bare", folder=tmp_path, variables=common.SHIPPED
    ) as bare:
        answer = httpx.post(f"{bare.url}/echo", json={"action": "system.echo", "params": {"a": 1}})
        assert answer.json() == {"ok": True, "action": "system.echo", "result": {"a": 1}}
        log = bare.log_tail()
    # cmd_serve announced it: the bare app went through the same uvicorn.Config.
    assert f"serving at {bare.url}" in log


def test_serve_command_starts_each_app_as_the_project_ships() -> None:
    python = sys.executable
    assert common.serve_command("local_server:app", 9000) == [
        python, "-m", "cli", "serve", "--port", "9000",
    ]  # fmt: skip
    assert common.serve_command("bench.bare_app:app", 9000)[:4] == [
        python, "-m", "bench.serve", "bench.bare_app:app",
    ]  # fmt: skip
    assert common.serve_command("local_server:app", 9000, "docker") == [
        python, "-m", "uvicorn", "local_server:app", "--host", "127.0.0.1", "--port", "9000",
        "--no-access-log", "--ws", "none",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown launcher"):
        common.serve_command("local_server:app", 9000, "gunicorn")


@pytest.mark.process
def test_process_cpu_s_counts_a_busy_childs_cpu_time() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert common.process_cpu_s(busy.pid) >= 0
        while common.process_cpu_s(busy.pid) < 0.05:  # polls: ticks of 10 ms add up
            assert busy.poll() is None
    finally:
        busy.kill()
        busy.wait()


def test_process_rss_mib_reads_this_processs_resident_memory() -> None:
    assert 1 < common.process_rss_mib(os.getpid()) < 100_000


def test_summary_and_spread_report_the_median_and_the_range_of_rounds() -> None:
    row = {"name": "x", **common.summary("ratio", [0.5, 0.25, 0.75])}
    assert row == {"name": "x", "ratio": 0.5, "ratio_min": 0.25, "ratio_max": 0.75}
    assert common.spread(row, "ratio", "{:.0%}") == "50% (25%..75%)"


@pytest.mark.process
def test_bench_runner_header_names_the_commit_and_the_load(tmp_path: Path) -> None:
    output = tmp_path / "latest.md"
    assert bench_main.main(["--quick", "--only", "routing", "--output", str(output)]) == 0
    first = output.read_text(encoding="utf-8").split("\n\n")[1]
    assert f"commit {bench_main.commit()};" in first and "load average" in first
    assert bench_main.commit() != "unknown commit"
