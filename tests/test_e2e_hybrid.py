"""End to end: a cloud instance and a terminal, two real uvicorn processes on loopback."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_until
from tests.fault_proxy import FaultProxy

pytestmark = [pytest.mark.prd200, pytest.mark.e2e]

KEY = "e2e-cloud-key-123"


def dispatch(server, action: str, params: dict | None = None, **extra) -> httpx.Response:
    return httpx.post(
        f"{server.url}/dispatch",
        json={"action": action, "params": params or {}, **extra},
        timeout=60,
    )


def executions(log: Path, action: str | None = None) -> list[dict]:
    if not log.exists():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in rows if action is None or r["action"] == action]


@pytest.fixture(scope="module")
def cloud(module_server_factory):
    """One cloud the module's tests share; a test that kills its cloud uses ``own_cloud``."""
    return module_server_factory(name="cloud", EVERREACH_ENV="cloud", EVERREACH_CLOUD_KEY=KEY)


@pytest.fixture
def own_cloud(server_factory):
    return server_factory(name="cloud", EVERREACH_ENV="cloud", EVERREACH_CLOUD_KEY=KEY)


def terminal(server_factory, cloud_url: str, **variables):
    settings = {
        "EVERREACH_ENV": "hybrid",
        "CLOUD_ENDPOINT": cloud_url,
        "EVERREACH_CLOUD_KEY": KEY,
        "CLOUD_BACKOFF_SEC": "0.05",
        "CONNECTIVITY_INTERVAL_SEC": "0.5",
    }
    settings.update(variables)
    return server_factory(name=settings.pop("name", "terminal"), **settings)


def test_env_cloud_sends_dm_send_to_the_cloud_instance(server_factory, cloud, tmp_path):
    term = terminal(server_factory, cloud.url, EVERREACH_ENV="cloud")
    log = tmp_path / "dm.log"
    answer = dispatch(term, "dm.send", {"to": "ana", "id": "m1", "log": str(log)})
    body = answer.json()
    assert answer.status_code == 200, body
    assert body["source"] == "cloud"
    assert body["result"]["pid"] == cloud.proc.pid
    assert len(executions(log)) == 1


def test_env_local_runs_analyze_video_in_the_terminal(server_factory):
    term = server_factory(name="local", EVERREACH_ENV="local")
    body = dispatch(term, "content.analyze_video", {"url": "v.mp4"}).json()
    assert body["ok"] and body["source"] == "local"
    assert body["result"] == {"analyzed": "v.mp4", "pid": term.proc.pid}


def test_hybrid_sends_api_actions_to_the_cloud_and_compute_actions_local(server_factory, cloud):
    term = terminal(server_factory, cloud.url)
    api = dispatch(term, "research.keyword", {"keyword": "ai"}).json()
    compute = dispatch(term, "content.analyze_video", {"url": "v.mp4"}).json()
    assert (api["ok"], api["source"], api["result"]["pid"]) == (True, "cloud", cloud.proc.pid)
    assert (compute["ok"], compute["source"], compute["result"]["pid"]) == (
        True,
        "local",
        term.proc.pid,
    )
    assert api["cost_usd"] > 0
    status = httpx.get(f"{term.url}/status", timeout=10).json()
    assert status["dispatch_counts"]["research.keyword"] == {"cloud": 1}
    assert status["dispatch_counts"]["content.analyze_video"] == {"local": 1}


def test_force_env_overrides_the_route_table(server_factory, cloud):
    term = terminal(server_factory, cloud.url)
    body = dispatch(term, "content.analyze_video", {"url": "x"}, force_env="cloud").json()
    assert body["source"] == "cloud" and body["result"]["pid"] == cloud.proc.pid
    bad = dispatch(term, "content.analyze_video", {}, force_env="mars")
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_params"


def test_killed_cloud_gives_local_fallback_for_read_only_actions(server_factory, own_cloud):
    cloud = own_cloud
    term = terminal(server_factory, cloud.url, CLOUD_RETRIES="1")
    assert dispatch(term, "research.platform", {"platform": "x"}).json()["source"] == "cloud"
    cloud.kill(signal.SIGKILL)
    for _ in range(3):
        body = dispatch(term, "research.platform", {"platform": "x"}).json()
        assert body["ok"] and body["source"] == "local_fallback"
        assert body["result"]["pid"] == term.proc.pid


def test_batch_of_ten_content_pieces_returns_ten_results_in_order(server_factory):
    term = server_factory(name="local", EVERREACH_ENV="local")
    items = [{"action": "content.generate", "params": {"n": n, "sleep_s": 0.05}} for n in range(10)]
    answer = httpx.post(f"{term.url}/batch", json={"items": items, "max_concurrent": 3}, timeout=60)
    body = answer.json()
    assert answer.status_code == 200
    assert [r["result"]["piece"] for r in body["results"]] == list(range(10))
    assert body["summary"]["ok"] == 10 and body["summary"]["total"] == 10


def test_a_retried_side_effect_runs_exactly_once_on_the_cloud(server_factory, cloud, tmp_path):
    # The proxy lets the first attempt reach the cloud, then loses its answer (500): the
    # terminal must retry with the same Idempotency-Key and get the stored result.
    proxy = FaultProxy(cloud.url, free_port(), ["500_after", "500"]).start()
    try:
        term = terminal(server_factory, proxy.url)
        log = tmp_path / "dm.log"
        body = dispatch(term, "dm.send", {"to": "bo", "id": "once", "log": str(log)}).json()
    finally:
        proxy.stop()
    assert body["ok"] and body["source"] == "cloud", body
    assert body["attempts"] == 3
    assert len(executions(log, "dm.send")) == 1
    services = [fault for path, fault in proxy.seen if path.startswith("api/services")]
    assert services == ["500_after", "500", "pass"]


def test_answer_after_client_timeout_still_runs_once(server_factory, cloud, tmp_path):
    # The answer comes back 1 s after the cloud ran the call: always past the 0.5 s timeout,
    # however slow the machine (stopping the proxy waits out that second too).
    proxy = FaultProxy(cloud.url, free_port(), ["slow_after"], slow_s=1.0).start()
    try:
        term = terminal(server_factory, proxy.url, CLOUD_TIMEOUT_SEC="0.5")
        log = tmp_path / "dm.log"
        body = dispatch(term, "dm.send", {"to": "cy", "id": "t1", "log": str(log)}).json()
    finally:
        proxy.stop()
    assert body["ok"] and body["source"] == "cloud", body
    assert body["attempts"] == 2
    assert len(executions(log, "dm.send")) == 1


def test_cloud_role_requires_the_bearer_key(cloud):
    url = f"{cloud.url}/api/services/research/platform"
    assert httpx.post(url, json={"params": {}}, timeout=10).status_code == 401
    wrong = httpx.post(
        url, json={"params": {}}, headers={"Authorization": "Bearer nope"}, timeout=10
    )
    assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
    ok = httpx.post(
        url, json={"params": {}}, headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    )
    assert ok.status_code == 200 and ok.json()["source"] == "cloud"


def test_same_idempotency_key_with_other_params_is_refused(cloud):
    url = f"{cloud.url}/api/services/research/platform"
    headers = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": "key-0000001"}
    first = httpx.post(url, json={"params": {"platform": "a"}}, headers=headers, timeout=10)
    again = httpx.post(url, json={"params": {"platform": "a"}}, headers=headers, timeout=10)
    other = httpx.post(url, json={"params": {"platform": "b"}}, headers=headers, timeout=10)
    assert first.status_code == 200 and again.json() == first.json()
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert other.status_code == 422


def test_idempotency_survives_a_cloud_restart(own_cloud, tmp_path):
    cloud = own_cloud
    log = tmp_path / "dm.log"
    url = f"{cloud.url}/api/services/dm/send"
    headers = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": "restart-key-1"}
    params = {"params": {"to": "di", "id": "r", "log": str(log)}}
    first = httpx.post(url, json=params, headers=headers, timeout=10).json()
    cloud.kill(signal.SIGKILL)
    cloud.start()
    again = httpx.post(url, json=params, headers=headers, timeout=10).json()
    assert again["result"] == first["result"]
    assert len(executions(log)) == 1


def test_same_key_while_the_first_call_runs_is_409_with_retry_after(server_factory, tmp_path):
    import concurrent.futures

    cloud = server_factory(
        name="busy-cloud", EVERREACH_ENV="cloud", EVERREACH_CLOUD_KEY=KEY, CLOUD_TIMEOUT_SEC="0.3"
    )
    log = tmp_path / "dm.log"
    url = f"{cloud.url}/api/services/dm/send"
    headers = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": "busy-key-0001"}
    held = tmp_path / "held"  # the first call's handler runs until the file goes
    held.touch()
    params = {"id": "slow", "log": str(log), "sleep_s": 30, "sleep_while": str(held)}
    state = f"{cloud.url}/api/idempotency/busy-key-0001"

    def running() -> bool:
        answer = httpx.get(state, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        return bool(answer.json()["state"] == "running")

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, url, json={"params": params}, headers=headers, timeout=60)
        wait_until(running, what="the first call holds the key")
        second = httpx.post(url, json={"params": params}, headers=headers, timeout=30)
        held.unlink()
        answers = [first.result(), second]
    assert sorted(a.status_code for a in answers) == [200, 409]
    busy = next(a for a in answers if a.status_code == 409)
    assert busy.headers["Retry-After"] == "1"
    assert busy.json()["error"] == "conflict" and busy.json()["request_id"] == "busy-key-0001"
    assert len(executions(log)) == 1


def test_status_counts_the_actions_the_cloud_has_no_handler_for(server_factory):
    cloud = server_factory(
        name="cloud",
        EVERREACH_ENV="cloud",
        EVERREACH_CLOUD_KEY=KEY,
        EVERREACH_SERVICES="tests.e2e_terminal_services",  # no research.keyword
    )
    term = terminal(server_factory, cloud.url)
    body = dispatch(term, "research.keyword", {"keyword": "ai"}).json()
    assert (body["ok"], body["source"]) == (True, "local_fallback")
    assert "cloud has no handler for research.keyword" in body["detail"]
    status = httpx.get(f"{term.url}/status").json()
    assert status["cloud_missing_handlers"] == {"research.keyword": 1}
    assert "cloud has no handler for research.keyword" in term.log()
