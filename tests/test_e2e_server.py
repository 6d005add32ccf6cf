"""End to end: the server's own edges — auth, limits, bad input, /metrics, start-up refusals."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import httpx
import pytest

from tests.conftest import ROOT, free_port, service_missing

pytestmark = [pytest.mark.prd200, pytest.mark.e2e]


@pytest.fixture(scope="module")
def server(module_server_factory):
    """One local server the module's tests share: none of them needs fresh state."""
    return module_server_factory(name="local", EVERREACH_ENV="local")


def post(server, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/dispatch", timeout=30, **body, **kwargs)


def test_bad_input_gets_a_clear_answer_and_the_server_keeps_serving(server):
    unknown = post(server, {"json": {"action": "content.analyse_video"}})
    assert unknown.status_code == 404
    assert "content.analyze_video" in unknown.json()["detail"]
    assert post(server, {"json": {"action": "not-an-action"}}).status_code == 422
    assert post(server, {"json": {"action": "system.echo", "params": [1]}}).status_code == 422
    assert post(server, {"content": b"{broken"}).status_code == 422
    failing = post(server, {"json": {"action": "test.fail"}})
    assert failing.status_code == 500
    assert failing.json()["error"] == "handler_error"
    assert "RuntimeError: boom" in failing.json()["detail"]
    big = post(
        server,
        {"content": b'{"action": "system.echo", "params": {"x": "' + b"a" * (1 << 20) + b'"}}'},
    )
    assert big.status_code == 413
    assert post(server, {"json": {"action": "system.echo", "params": {"a": 1}}}).json()[
        "result"
    ] == {"a": 1}


def test_sync_handlers_run_in_a_thread(server):
    body = post(server, {"json": {"action": "test.sync_add", "params": {"a": 2, "b": 3}}}).json()
    assert body["ok"] and body["result"]["sum"] == 5


def test_local_api_token_guards_dispatch_and_status(server_factory):
    server = server_factory(name="guarded", LOCAL_API_TOKEN="t0ken-for-tests")
    assert post(server, {"json": {"action": "system.echo"}}).status_code == 401
    wrong = post(server, {"json": {"action": "system.echo"}}, headers={"Authorization": "Bearer x"})
    assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
    good = post(
        server,
        {"json": {"action": "system.echo"}},
        headers={"Authorization": "Bearer t0ken-for-tests"},
    )
    assert good.status_code == 200
    assert httpx.get(f"{server.url}/status", timeout=10).status_code == 401
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert "t0ken-for-tests" not in server.log()


def test_dispatch_idempotency_key_runs_once_and_replays(server, tmp_path):
    log = tmp_path / "dm.log"
    body = {
        "action": "dm.send",
        "params": {"id": "x", "log": str(log)},
        "idempotency_key": "client-key-001",
    }
    first = post(server, {"json": body}).json()
    again = post(server, {"json": body}).json()
    assert again == first
    assert len(log.read_text().splitlines()) == 1
    other = post(server, {"json": {**body, "params": {"id": "y"}}})
    assert other.status_code == 422


def test_self_test_reports_each_component(server):
    body = post(server, {"json": {"action": "system.self_test"}}).json()
    report = body["result"]
    assert {"registry", "stores", "bus", "cost_ledger", "cloud"} <= set(report)
    assert report["ok"] is True


def test_metrics_scrape_is_valid_prometheus_text(server):
    for action in ("system.echo", "content.analyze_video", "nosuch.thing", "nosuch.other"):
        post(server, {"json": {"action": action}})
    scrape = httpx.get(f"{server.url}/metrics", timeout=10)
    assert scrape.status_code == 200
    text = scrape.text
    assert 'everreach_dispatch_total{action="system.echo",outcome="ok",source="local"}' in text
    assert "nosuch" not in text  # free-form action names never become label values
    promtool = shutil.which("promtool")
    if promtool is None:
        service_missing("promtool (Debian package: prometheus)")
    assert promtool is not None
    check = subprocess.run(
        [promtool, "check", "metrics"],
        input=scrape.content,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, (check.stdout + check.stderr).decode()


def _start_and_expect_refusal(tmp_path, **variables: str) -> str:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("EVERREACH_", "CLOUD_", "LOCAL_"))
    }
    env.update({"PYTHONPATH": str(ROOT), "DATA_DIR": str(tmp_path / "data"), **variables})
    proc = subprocess.run(
        [sys.executable, "-m", "uvicorn", "local_server:app", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def test_binding_beyond_loopback_without_a_token_is_refused(tmp_path):
    output = _start_and_expect_refusal(tmp_path, HOST="0.0.0.0")
    assert "LOCAL_API_TOKEN" in output


def test_a_wrong_env_value_stops_start_up_naming_the_variable(tmp_path):
    output = _start_and_expect_refusal(tmp_path, EVERREACH_ENV="prod")
    assert "EVERREACH_ENV" in output and "'local', 'cloud' or 'hybrid'" in output


def test_a_broken_services_module_stops_start_up_naming_it(tmp_path):
    (tmp_path / "broken_services.py").write_text("raise ImportError('missing dependency xyz')\n")
    env_path = f"{ROOT}{os.pathsep}{tmp_path}"
    output = _start_and_expect_refusal(
        tmp_path, EVERREACH_SERVICES="broken_services", PYTHONPATH=env_path
    )
    assert "broken_services" in output and "missing dependency xyz" in output


def test_credentials_in_cloud_endpoint_never_appear_in_answers_pages_or_logs(server_factory):
    password = "s3cret-pw-in-url"
    term = server_factory(
        name="creds",
        EVERREACH_ENV="hybrid",
        CLOUD_ENDPOINT=f"http://someone:{password}@127.0.0.1:{free_port()}",
        EVERREACH_CLOUD_KEY="cloud-key-0001",
        CLOUD_RETRIES="0",
    )
    answers = [
        httpx.post(
            f"{term.url}/dispatch",
            json={"action": "system.echo", "params": {}, "force_env": "cloud"},
            timeout=30,
        ),
        httpx.get(f"{term.url}/status", timeout=30),
        httpx.get(f"{term.url}/health", timeout=30),
        httpx.get(f"{term.url}/", timeout=30),
        httpx.get(f"{term.url}/metrics", timeout=30),
    ]
    assert answers[1].status_code == 200
    assert answers[1].json()["connectivity"]["endpoint"].startswith("http://***@127.0.0.1:")
    for answer in answers:
        assert password not in answer.text, answer.request.url
    term.stop()
    assert "127.0.0.1" in term.log() and password not in term.log()
