"""The ``everreach`` commands, against real server processes where they need one."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import service_registry
from cli import ExitCode, main
from config.hybrid_config import HybridConfig
from tests.conftest import ROOT, free_port, modules_loaded_by

pytestmark = pytest.mark.prd200
e2e = pytest.mark.e2e

CONFIG = HybridConfig.from_mapping({})  # no environment, no .env: every call names --url
TOKEN = "cli-test-token-123"


SERVICES_MODULES = ("tests.e2e_services", "tests.e2e_terminal_services")
# The in-process servers a test started, by URL: ``run`` sends their calls through the app.
IN_PROCESS: dict[str, Any] = {}


def run(
    capsys: pytest.CaptureFixture[str], *argv: str, config: HybridConfig = CONFIG
) -> tuple[int, str, str]:
    url = argv[argv.index("--url") + 1] if "--url" in argv else None
    code = main(list(argv), config=config, client=IN_PROCESS.get(url or ""))
    out, err = capsys.readouterr()
    return code, out, err


@dataclass
class InProcessServer:
    """The app of ``create_app`` behind a test client: the CLI's calls never leave the process."""

    url: str
    env: dict[str, str]


@pytest.fixture
def app_server(app_client: Any, tmp_path: Path) -> Iterator[Any]:
    """``app_server(**variables)``: ``server_factory`` for tests the network does not matter to.

    The test services modules declare some actions alike, and each process of
    ``server_factory`` imports one of them; here the @register table is private to the test and
    they import afresh into it (the table and the modules are put back afterwards).
    """
    table = service_registry._DECLARED
    saved = {name: sys.modules.pop(name) for name in SERVICES_MODULES if name in sys.modules}
    service_registry._DECLARED = {}
    started = iter(range(1_000))

    def start(*, name: str | None = None, **variables: str) -> InProcessServer:
        assert not IN_PROCESS, "one in-process server per test: they share a URL"
        name = f"{name or 'app'}{next(started)}"
        env = {"DATA_DIR": str(tmp_path / name / "data"), **variables}
        env.setdefault("EVERREACH_SERVICES", "tests.e2e_services")
        env.setdefault("SCHEDULES_PATH", str(tmp_path / name / "schedules.json"))
        server = InProcessServer("http://testserver", env)
        IN_PROCESS[server.url] = app_client(**env)
        return server

    try:
        yield start
    finally:
        IN_PROCESS.clear()
        service_registry._DECLARED = table
        for name in SERVICES_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def local_server(module_server_factory: Any) -> Any:
    """One plain local server shared by the tests that assert nothing about its counters."""
    return module_server_factory(name="local")


def terminal_offline(server_factory: Any) -> Any:
    """A hybrid terminal in OFFLINE_MODE with no dm.send handler: dm.send can only queue."""
    return server_factory(
        name="terminal",
        EVERREACH_ENV="hybrid",
        CLOUD_ENDPOINT=f"http://127.0.0.1:{free_port()}",
        EVERREACH_CLOUD_KEY="cloud-key-123",
        EVERREACH_SERVICES="tests.e2e_terminal_services",
        OFFLINE_MODE="true",
    )


# -- dispatch -------------------------------------------------------------------------------------


@e2e
def test_dispatch_prints_the_envelope_and_exits_0(local_server, capsys):
    server = local_server
    code, out, _ = run(
        capsys,
        "dispatch",
        "system.echo",
        "--url",
        server.url,
        "--params",
        '{"a": 1, "b": "x"}',
        "-p",
        "b=y",
        "-p",
        "n=3",
        "-p",
        "to=alice",
    )
    envelope = json.loads(out)
    assert code == ExitCode.OK == 0
    assert envelope["ok"] is True and envelope["source"] == "local"
    assert envelope["result"] == {"a": 1, "b": "y", "n": 3, "to": "alice"}


@e2e
def test_dispatch_of_an_unknown_action_exits_1_and_says_why(local_server, capsys):
    server = local_server
    code, out, err = run(capsys, "dispatch", "nope.missing", "--url", server.url)
    assert code == ExitCode.FAILED == 1
    assert json.loads(out)["error"] == "unknown_action"
    assert "HTTP 404" in err and "unknown_action" in err


def test_dispatch_queued_in_the_outbox_exits_3(app_server, capsys):
    server = terminal_offline(app_server)
    code, out, err = run(
        capsys,
        "dispatch",
        "dm.send",
        "--url",
        server.url,
        "-p",
        "to=bob",
        "--idempotency-key",
        "cli-queued-0001",
    )
    envelope = json.loads(out)
    assert code == ExitCode.QUEUED == 3
    assert envelope["queued"] is True and envelope["source"] == "outbox"
    assert envelope["outbox_id"] in err


def test_dispatch_without_a_server_says_how_to_start_one(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(capsys, "dispatch", "system.echo", "--url", url)
    assert code == ExitCode.FAILED
    assert out == ""
    assert err == f"everreach: no server at {url}; start it with: everreach serve\n"


def test_dispatch_and_status_send_the_token_from_the_config(app_server, capsys):
    server = app_server(LOCAL_API_TOKEN=TOKEN)
    code, _, err = run(capsys, "status", "--url", server.url)
    assert code == ExitCode.FAILED and "needs a token" in err
    code, _, err = run(capsys, "dispatch", "system.echo", "--url", server.url, "--token", "wrong")
    assert code == ExitCode.FAILED and "refused the token" in err
    with_token = HybridConfig.from_mapping({"local_api_token": TOKEN})
    code, out, _ = run(capsys, "dispatch", "system.echo", "--url", server.url, config=with_token)
    assert code == ExitCode.OK and json.loads(out)["ok"] is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--params", "{not json"], "--params is not valid JSON"),
        (["--params", "[1, 2]"], "--params must be a JSON object"),
        (["-p", "novalue"], "use key=value"),
    ],
)
def test_dispatch_with_bad_params_is_a_usage_error(capsys, argv, message):
    code, out, err = run(capsys, "dispatch", "system.echo", "--url", "http://127.0.0.1:9", *argv)
    assert code == ExitCode.USAGE and out == "" and message in err


# -- batch ----------------------------------------------------------------------------------------


@e2e
def test_batch_prints_results_in_input_order_with_a_progress_bar(local_server, capsys, tmp_path):
    server = local_server
    # The first items sleep longest, so they finish last: the output must still be in order.
    items = [
        {"action": "content.generate", "params": {"n": n, "sleep_s": 0.03 * (6 - n)}}
        for n in range(6)
    ]
    items.append({"action": "nope.missing", "params": {}})
    path = tmp_path / "items.json"
    path.write_text(json.dumps(items))
    code, out, err = run(capsys, "batch", str(path), "--url", server.url, "--max-concurrent", "3")
    body = json.loads(out)
    assert [r["result"]["piece"] for r in body["results"][:6]] == [0, 1, 2, 3, 4, 5]
    assert body["results"][6]["error"] == "unknown_action"
    assert body["summary"] | {"duration_ms": 0} == {
        "total": 7,
        "ok": 6,
        "failed": 1,
        "queued": 0,
        "by_source": {"local": 7},
        "duration_ms": 0,
    }
    assert code == ExitCode.FAILED  # one item failed
    assert "batch" in err and "7/7" in err and "6 ok, 1 failed, 0 queued" in err
    assert "everreach: batch: 7 items, 6 ok, 1 failed, 0 queued" in err


@e2e
def test_batch_reads_stdin_and_can_run_on_the_server(local_server, capsys, monkeypatch):
    server = local_server
    items = [{"action": "test.sync_add", "params": {"a": n, "b": 1}} for n in range(4)]
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"items": items})))
    code, out, err = run(capsys, "batch", "-", "--url", server.url, "--server-side")
    body = json.loads(out)
    assert code == ExitCode.OK
    assert [r["result"]["sum"] for r in body["results"]] == [1, 2, 3, 4]
    assert body["summary"]["ok"] == 4 and "4 items, 4 ok" in err


def test_batch_server_side_takes_the_servers_bound_not_a_fixed_one(app_server, capsys, tmp_path):
    server = app_server(BATCH_MAX_CONCURRENT="512")
    path = tmp_path / "items.json"
    path.write_text(json.dumps([{"action": "system.echo", "params": {"n": 1}}]))
    argv = ("batch", str(path), "--url", server.url, "--server-side", "--no-progress")
    code, out, _ = run(capsys, *argv, "--max-concurrent", "300")  # over the default 256
    assert code == ExitCode.OK and json.loads(out)["summary"]["ok"] == 1
    code, _, err = run(capsys, *argv, "--max-concurrent", "513")
    assert code == ExitCode.FAILED
    assert "refused the batch (HTTP 422)" in err and "between 1 and 512" in err
    assert "BATCH_MAX_CONCURRENT" in err


def test_batch_one_dispatch_per_item_is_bounded_by_this_environments_setting(capsys, tmp_path):
    path = tmp_path / "items.json"
    path.write_text("[]")
    config = HybridConfig.from_mapping({"BATCH_MAX_CONCURRENT": "8"})
    argv = ("batch", str(path), "--url", "http://127.0.0.1:9", "--max-concurrent", "9")
    code, _, err = run(capsys, *argv, config=config)
    assert code == ExitCode.USAGE and "between 1 and 8 (BATCH_MAX_CONCURRENT)" in err
    code, _, err = run(capsys, "batch", str(path), "--server-side", "--max-concurrent", "0")
    assert code == ExitCode.USAGE and "at least 1" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{oops", "not valid JSON at line 1"),
        ('{"action": "x.y"}', "must be a JSON list"),
        ('[{"params": {}}]', "item 0 must be an object with an 'action' string"),
        ('[{"action": "x.y", "params": [1]}]', "item 0: 'params' must be a JSON object"),
    ],
)
def test_batch_rejects_a_malformed_file_as_a_usage_error(capsys, tmp_path, content, message):
    path = tmp_path / "items.json"
    path.write_text(content)
    code, out, err = run(capsys, "batch", str(path), "--url", "http://127.0.0.1:9")
    assert code == ExitCode.USAGE and out == "" and message in err


# -- status, cost, outbox, routes -----------------------------------------------------------------


@e2e
def test_status_shows_env_counts_cost_outbox_and_jobs(server_factory, capsys):
    server = server_factory()
    for _ in range(2):
        httpx.post(f"{server.url}/dispatch", json={"action": "system.echo"}, timeout=10)
    code, out, _ = run(capsys, "status", "--url", server.url)
    assert code == ExitCode.OK
    assert "env local" in out and "no cloud configured" in out
    assert "$0.00 of $400.00" in out and "$380.00" in out
    row = next(line for line in out.splitlines() if "system.echo" in line)
    assert row.split("│")[2].strip() == "2"  # the "local" column
    assert "pending" in out and "daily_routine" in out and "sqlite" in out

    code, out, _ = run(capsys, "status", "--url", server.url, "--json")
    assert code == ExitCode.OK
    assert json.loads(out)["dispatch_counts"]["system.echo"] == {"local": 2}


@e2e
def test_cost_shows_the_spend_against_the_caps_and_the_configured_rates(
    local_server, capsys, tmp_path
):
    server = local_server
    rates = tmp_path / "rates.json"
    rates.write_text('{"dm.send": 0.0015}')
    config = HybridConfig.from_mapping({"cost_rates_file": str(rates)})
    code, out, _ = run(capsys, "cost", "--url", server.url, config=config)
    assert code == ExitCode.OK
    assert "$0.00 of $400.00" in out and "soft cap   $380.00" in out
    assert "0.0% of the hard cap" in out
    assert next(line for line in out.splitlines() if "dm.send" in line).split()[-2] == "$0.0015"

    code, out, _ = run(capsys, "cost", "--url", server.url, "--json", config=config)
    body = json.loads(out)
    assert body["cost"]["hard_cap_usd"] == "400.00" and body["rates"]["dm.send"] == "0.0015"


def test_cost_shows_the_months_daily_spend_as_a_sparkline_and_the_forecast(
    app_server, capsys, tmp_path
):
    from datetime import UTC, datetime, timedelta
    from decimal import Decimal

    from tests.test_cost_ledger import seed_ledger

    now = datetime.now(UTC)
    today = now.date()
    data = tmp_path / "seeded" / "data"
    seed_ledger(data, [(now, Decimal("30"))], f"{today:%Y-%m}")  # $30 today, nothing before
    server = app_server(
        DATA_DIR=str(data), EVERREACH_TZ="UTC", MONTHLY_COST_CAP="1000", COST_SOFT_CAP="20"
    )
    code, out, _ = run(capsys, "cost", "--url", server.url)
    assert code == ExitCode.OK
    spark = next(line for line in out.splitlines() if line.startswith("daily spend "))
    assert spark.split()[2] == "▁" * (today.day - 1) + "█"  # one character a day, 1st to today
    last = (today.replace(day=28) + timedelta(days=4)).replace(day=1) - timedelta(days=1)
    pace = Decimal(30) / min(7, today.day)
    projected = (30 + pace * (last - today).days).quantize(Decimal("0.01"))
    pace_text = pace.quantize(Decimal("0.01"))
    # $30 passed the $20 soft cap today; at most $30 a day never reaches $1000 this month
    assert (
        f"Projected ${projected} by {last.day} {last:%b} at ${pace_text}/day (the last 7 days' "
        f"pace); soft cap {today.day} {today:%b}; hard cap not this month."
    ) in " ".join(out.split())

    code, out, _ = run(capsys, "cost", "--url", server.url, "--json")
    forecast = json.loads(out)["cost"]["forecast"]
    assert forecast["daily_usd"][-1] == "30.00" and len(forecast["daily_usd"]) == today.day


def test_cost_without_a_server_prints_the_rates_and_exits_1(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(capsys, "cost", "--url", url, "--json")
    assert code == ExitCode.FAILED
    assert json.loads(out) == {"cost": None, "rates": json.loads(out)["rates"]}
    assert json.loads(out)["rates"]["*"] == "0.01"
    assert "month-to-date spend unknown: no server at" in err


def test_outbox_shows_the_pending_depth(app_server, capsys):
    server = terminal_offline(app_server)
    assert run(capsys, "dispatch", "dm.send", "--url", server.url)[0] == ExitCode.QUEUED
    code, out, _ = run(capsys, "outbox", "--url", server.url)
    assert code == ExitCode.OK
    assert next(line for line in out.splitlines() if "pending" in line).split() == ["pending", "1"]
    code, out, _ = run(capsys, "outbox", "--url", server.url, "--json")
    assert json.loads(out)["outbox"]["depth"] == 1 and json.loads(out)["dead_letters"] == []


def test_routes_prints_the_table_with_the_classifier_kind_without_a_server(capsys, tmp_path):
    table = tmp_path / "routes.json"
    table.write_text(
        json.dumps(
            {
                "actions": {
                    "research.keyword": {
                        "preferred_env": "auto",
                        "fallback_env": "local",
                        "side_effect": False,
                    },
                    "content.*": {
                        "preferred_env": "auto",
                        "fallback_env": "cloud",
                        "side_effect": False,
                    },
                    "dm.send": {
                        "preferred_env": "cloud",
                        "fallback_env": "none",
                        "side_effect": True,
                    },
                }
            }
        )
    )
    config = HybridConfig.from_mapping({"route_table_path": str(table)})
    code, out, _ = run(capsys, "routes", config=config)
    assert code == ExitCode.OK
    rows = {
        line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:7]]
        for line in out.splitlines()
        if line.startswith("│")
    }
    assert rows == {
        "content.*": ["auto", "cloud", "no", "compute", "local"],
        "dm.send": ["cloud", "none", "yes", "api", "cloud"],
        "research.keyword": ["auto", "local", "no", "api", "cloud"],
    }
    code, out, _ = run(capsys, "routes", "--json", config=config)
    body = json.loads(out)
    assert body["source"] == str(table)
    assert body["routes"][0] == {
        "action": "content.*",
        "preferred_env": "auto",
        "fallback_env": "cloud",
        "side_effect": False,
        "classifier_kind": "compute",
        "hybrid_env": "local",
    }


def test_routes_with_a_broken_table_is_a_configuration_error(capsys, tmp_path):
    table = tmp_path / "routes.json"
    table.write_text('{"actions": {"dm.send": {"preferred_env": "moon"}}}')
    config = HybridConfig.from_mapping({"route_table_path": str(table)})
    code, out, err = run(capsys, "routes", config=config)
    assert code == ExitCode.USAGE and out == ""
    assert err.startswith("everreach: configuration error: ") and err.count("\n") == 1


def cli_process(tmp_path: Path, *argv: str, **variables: str) -> subprocess.Popen[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EVERREACH_", "CLOUD_", "LOCAL_", "COST_", "CACHE_", "SUPABASE_"))
        and k
        not in (
            "DATABASE_URL",
            "REDIS_URL",
            "OFFLINE_MODE",
            "DATA_DIR",
            "HOST",
            "PORT",
            "ROUTE_TABLE_PATH",
            "SCHEDULES_PATH",
        )
    }
    env.update({"PYTHONPATH": str(ROOT), "DATA_DIR": str(tmp_path / "data"), **variables})
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *argv],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


@pytest.mark.process
def test_serve_with_a_bad_env_variable_exits_2_with_one_line(tmp_path):
    code, out, err = finished(cli_process(tmp_path, "serve", EVERREACH_ENV="moon"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert err.startswith("everreach: configuration error: EVERREACH_ENV: ")
    assert "'moon'" in err


@pytest.mark.process
def test_serve_refuses_a_public_host_without_a_token(tmp_path):
    port = str(free_port())
    code, _, err = finished(cli_process(tmp_path, "serve", "--host", "0.0.0.0", "--port", port))
    assert code == 2 and err.count("\n") == 1
    assert "HOST=0.0.0.0" in err and "LOCAL_API_TOKEN is not set" in err
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


@pytest.mark.process
def test_serve_reports_a_start_up_config_error_without_a_traceback(tmp_path):
    (tmp_path / "schedules.json").write_text("{not json")
    code, _, err = finished(
        cli_process(tmp_path, "serve", "--port", str(free_port()), SCHEDULES_PATH="schedules.json")
    )
    assert code == 2
    assert "Traceback" not in err
    lines = [
        line
        for line in err.splitlines()
        if '"level": "ERROR"' in line or line.startswith("everreach:")
    ]
    assert lines == [lines[-1]] and "configuration error: SCHEDULES_PATH" in lines[-1]


@contextlib.contextmanager
def serving(
    tmp_path: Path, **variables: str
) -> Iterator[tuple[subprocess.Popen[str], int, httpx.Response]]:
    """``everreach serve`` on a free port, once ``/health`` answers; killed if still running."""
    port = free_port()
    proc = cli_process(tmp_path, "serve", "--port", str(port), **variables)
    try:
        deadline = time.monotonic() + 30  # only stops a hung test
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.05)
        yield proc, port, health
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@e2e
def test_serve_writes_no_access_lines_even_at_debug(tmp_path):
    variables = {"LOG_LEVEL": "DEBUG", "LOG_FORMAT": "json"}
    with serving(tmp_path, EVERREACH_SERVICES="tests.e2e_services", **variables) as served:
        proc, port, _ = served
        httpx.post(
            f"http://127.0.0.1:{port}/dispatch", json={"action": "system.heartbeat"}, timeout=10
        ).raise_for_status()
        proc.send_signal(signal.SIGINT)
        code, _, err = finished(proc)
    assert code == 0
    assert '"logger": "uvicorn.access"' not in err
    assert '"event": "dispatch"' in err  # the dispatch line says what an access line would


@e2e
def test_serve_answers_a_websocket_handshake_as_plain_http(tmp_path):
    handshake = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    with serving(tmp_path) as served:
        _, port, _ = served
        answer = httpx.get(f"http://127.0.0.1:{port}/health", headers=handshake, timeout=10)
    # No WebSocket protocol is loaded (the app has no WebSocket route): /health answers.
    assert answer.status_code == 200 and answer.json()["status"] in ("ok", "degraded")


@e2e
def test_serve_runs_the_configured_server_until_interrupted(tmp_path):
    with serving(tmp_path, PORT="1", EVERREACH_SERVICES="tests.e2e_services") as served:
        proc, port, health = served
        assert health.json()["env"] == "local"
        echo = httpx.post(
            f"http://127.0.0.1:{port}/dispatch",
            json={"action": "test.sync_add", "params": {"a": 2, "b": 3}},
            timeout=10,
        )
        assert echo.json()["result"]["sum"] == 5
        proc.send_signal(signal.SIGINT)
        code, _, err = finished(proc)
    assert code == 0
    assert f"everreach: EVERREACH_ENV=local serving at http://127.0.0.1:{port}" in err


def pair_with_a_wrong_cloud_key(server_factory: Any, **terminal: str) -> Any:
    """A cloud instance and a hybrid terminal whose EVERREACH_CLOUD_KEY the cloud refuses."""
    cloud = server_factory(
        name="cloud", EVERREACH_ENV="cloud", EVERREACH_CLOUD_KEY="right-key-1", ready=False
    )  # starts beside the terminal
    term = server_factory(
        name="terminal",
        EVERREACH_ENV="hybrid",
        CLOUD_ENDPOINT=cloud.url,
        EVERREACH_CLOUD_KEY="wrong-key-2",
        **terminal,
    )
    cloud.wait_ready()
    return term


@e2e
def test_dispatch_blames_the_cloud_key_not_the_token_when_the_cloud_refuses_it(
    server_factory, capsys
):
    term = pair_with_a_wrong_cloud_key(server_factory, LOCAL_API_TOKEN=TOKEN)
    with_token = HybridConfig.from_mapping({"local_api_token": TOKEN})
    code, out, err = run(
        capsys, "dispatch", "research.keyword", "--url", term.url, config=with_token
    )
    assert code == ExitCode.FAILED
    assert json.loads(out)["error"] == "unauthorized"
    assert "EVERREACH_CLOUD_KEY" in err
    assert "LOCAL_API_TOKEN was accepted" in err and "--token" not in err


@e2e
def test_health_says_the_cloud_refuses_the_key(server_factory):
    term = pair_with_a_wrong_cloud_key(server_factory, CONNECTIVITY_INTERVAL_SEC="0.2")
    deadline = time.monotonic() + 15
    health = httpx.get(f"{term.url}/health").json()
    while health["services"]["cloud"]["auth"] != "refused" and time.monotonic() < deadline:
        time.sleep(0.05)
        health = httpx.get(f"{term.url}/health").json()
    assert health["services"]["cloud"]["auth"] == "refused"
    assert health["status"] == "degraded"


# -- the first hour: version, help, batch failures, make ------------------------------------------


def test_version_prints_the_version_and_exits_0(capsys):
    from runtime import VERSION

    code, out, _ = run(capsys, "--version")
    assert code == ExitCode.OK and out == f"everreach {VERSION}\n"


def test_every_command_help_has_a_description_and_an_example(capsys):
    from cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) >= {"serve", "dispatch", "batch", "status", "cost", "routes"}
    for name in sub.choices:
        code, out, _ = run(capsys, name, "--help")
        rest = out.partition("\n\n")[2]
        assert code == ExitCode.OK
        assert rest.split("\n", 1)[0].strip()[:1].isupper(), f"{name}: no description\n{out}"
        _, found, example = out.partition("\nexample:\n  ")
        assert found and f"everreach {name}" in example, f"{name}: no example\n{out}"


@e2e
def test_batch_lists_failed_items_on_stderr_and_counts_one_item(local_server, capsys, tmp_path):
    server = local_server
    items = [{"action": "system.echo", "params": {}}, {"action": "nope.missing", "params": {}}]
    path = tmp_path / "items.json"
    path.write_text(json.dumps(items))
    code, _, err = run(capsys, "batch", str(path), "--url", server.url, "--no-progress")
    assert code == ExitCode.FAILED
    assert "everreach: item 1 (nope.missing) failed: unknown_action" in err
    assert "item 0" not in err
    path.write_text(json.dumps(items[:1]))
    code, _, err = run(capsys, "batch", str(path), "--url", server.url, "--no-progress")
    assert code == ExitCode.OK and "batch: 1 item, 1 ok" in err


@pytest.mark.process
def test_make_without_a_target_lists_every_target_with_its_comment():
    makefile = (ROOT / "Makefile").read_text()
    targets = re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.MULTILINE)
    done = subprocess.run(
        ["make", "--no-print-directory"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    listed = dict(
        line.strip().split(None, 1) for line in done.stdout.splitlines()[1:] if line.strip()
    )
    assert set(listed) == set(targets)
    assert all(comment.strip() for comment in listed.values())


@pytest.mark.process
def test_the_command_line_loads_rich_only_for_the_commands_that_draw():
    loaded = modules_loaded_by("import cli")
    assert {"cli", "cli_serve", "cli_client"} <= loaded
    assert loaded & {"rich", "pygments", "cli_commands", "cli_views"} == set()


@pytest.mark.process
def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = finished(cli_process(tmp_path, "serve", "--port", str(port)))
    assert code == ExitCode.FAILED and out == ""
    assert err.count("\n") == 1, err
    assert err.startswith(f"everreach: port {port} is in use")
    assert "PORT=" in err and "stop the other process" in err
    assert "Errno" not in err and "Traceback" not in err


def _outbox_rows(server: Any) -> list[tuple[str, str, str]]:
    """(id, status, idempotency_key) of the terminal's outbox, in queue order."""
    path = Path(server.env["DATA_DIR"]) / "hybrid.sqlite3"
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT id, status, idempotency_key FROM hybrid_outbox ORDER BY seq"
        ).fetchall()


def _set_status(server: Any, item_id: str, status: str) -> None:
    path = Path(server.env["DATA_DIR"]) / "hybrid.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE hybrid_outbox SET status = ? WHERE id = ?", (status, item_id))


def test_outbox_retry_and_drop_dead_letters_with_confirmation(
    app_server: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = terminal_offline(app_server)
    for _ in range(3):
        assert run(capsys, "dispatch", "dm.send", "--url", server.url)[0] == ExitCode.QUEUED
    (parked, _, parked_key), (dead, _, dead_key), (queued, _, _) = _outbox_rows(server)
    _set_status(server, parked, "indeterminate")
    _set_status(server, dead, "dead")

    code, out, _ = run(capsys, "outbox", "--url", server.url)
    assert "may have run" in out

    code, _, err = run(capsys, "outbox", "retry", "--all", "--url", server.url)
    assert code == ExitCode.OK
    assert f"retry each with: everreach outbox retry ID ({parked})" in err
    assert _outbox_rows(server)[1] == (dead, "pending", dead_key)  # same key: safe to replay

    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    code, _, err = run(capsys, "outbox", "retry", parked, "--url", server.url)
    assert code == ExitCode.FAILED and "may have run already; run it again? [y/N]" in err
    assert _outbox_rows(server)[0] == (parked, "indeterminate", parked_key)
    code, _, _ = run(capsys, "outbox", "retry", parked, "--yes", "--url", server.url)
    assert code == ExitCode.OK
    assert _outbox_rows(server)[0] == (parked, "pending", f"{parked_key}~r1")

    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    code, _, err = run(capsys, "outbox", "drop", queued, "--url", server.url)
    assert code == ExitCode.OK and "dropped" in err
    assert [row[0] for row in _outbox_rows(server)] == [parked, dead]
    code, _, err = run(capsys, "outbox", "drop", queued, "--yes", "--url", server.url)
    assert code == ExitCode.FAILED and "no item with id" in err
