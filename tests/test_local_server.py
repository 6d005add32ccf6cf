"""In-process tests of local_server: the app's lifespan, fault mapping and body limit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from config.hybrid_config import HybridConfig
from errors import ConfigError
from idempotency import Holder, IdempotencyStore
from local_server import create_app
from params_digest import params_hash
from tests.conftest import modules_loaded_by

pytestmark = pytest.mark.prd200


# The test client sends "Host: testserver", a name the server must be told it answers to.
IN_PROCESS = {"ALLOWED_HOSTS": "testserver"}


@pytest.fixture
def client(tmp_path):
    config = HybridConfig.from_mapping({"DATA_DIR": str(tmp_path / "data"), **IN_PROCESS})
    # The server answers faults itself; don't let the test client re-raise them.
    with TestClient(create_app(config), raise_server_exceptions=False) as test_client:
        yield test_client


def test_lifespan_opens_and_closes_every_resource(tmp_path):
    config = HybridConfig.from_mapping({"DATA_DIR": str(tmp_path / "data"), **IN_PROCESS})
    app = create_app(config)
    with TestClient(app) as client:
        assert client.get("/health").json()["env"] == "local"
        runtime = app.state.runtime
        assert runtime.client is not None and not runtime.client.is_closed
    assert runtime.client.is_closed
    assert app.state.runtime is None
    assert (tmp_path / "data" / "hybrid.sqlite3").exists()


def test_an_unexpected_fault_is_an_envelope_not_a_page_and_never_a_202(client, monkeypatch):
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a store went away")

    monkeypatch.setattr(client.app.state.runtime.orchestrator, "route", broken)
    answer = client.post("/dispatch", json={"action": "dm.send", "params": {}})
    assert answer.status_code == 500
    body = answer.json()
    assert body["ok"] is False and body["error"] == "handler_error"
    assert "a store went away" in body["detail"]
    assert client.post("/dispatch", json={"action": "system.echo"}).status_code == 500


def test_a_full_disk_is_storage_unavailable_not_a_handler_error(client, monkeypatch):
    async def disk_full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(client.app.state.runtime.orchestrator, "route", disk_full)
    answer = client.post("/dispatch", json={"action": "dm.send", "params": {}})
    assert answer.status_code == 503
    body = answer.json()
    assert body["ok"] is False and body["error"] == "storage_unavailable"
    assert "No space left on device" in body["detail"] and "DATA_DIR" in body["detail"]
    assert body["action"] == "dm.send"  # the fault handler knows what the request named


def test_a_chunked_body_over_the_limit_is_refused(client):
    def chunks():
        for _ in range(17):
            yield b"x" * 65536

    answer = client.post("/dispatch", content=chunks())
    assert answer.status_code == 413


def test_the_status_page_is_html(client):
    answer = client.get("/")
    assert answer.status_code == 200 and "text/html" in answer.headers["content-type"]


# -- the serving side refuses a call dearer than the caller's Cost-Limit --------------------------

CLOUD_KEY = "serving-key-123"


@pytest.fixture
def cloud_client(tmp_path):
    rates = tmp_path / "rates.json"
    rates.write_text('{"claude.*": "0.05"}')
    config = HybridConfig.from_mapping(
        {
            "EVERREACH_ENV": "cloud",
            "EVERREACH_CLOUD_KEY": CLOUD_KEY,
            "EVERREACH_SERVICES": "tests.e2e_services",
            "COST_RATES_FILE": str(rates),
            "DATA_DIR": str(tmp_path / "data"),
            "ALLOWED_HOSTS": "testserver",
        }
    )
    with TestClient(create_app(config), raise_server_exceptions=False) as test_client:
        yield test_client


def serve(client: TestClient, log: Path, key: str, **headers: str) -> Any:
    return client.post(
        "/api/services/claude/complete",
        json={"params": {"log": str(log)}},
        headers={"Authorization": f"Bearer {CLOUD_KEY}", "Idempotency-Key": key, **headers},
    )


def test_a_call_dearer_than_its_cost_limit_is_refused_with_the_price(cloud_client, tmp_path):
    log = tmp_path / "runs.log"
    refused = serve(cloud_client, log, "key-00001", **{"Cost-Limit": "0.01"})
    assert refused.status_code == 402
    body = refused.json()
    assert (body["ok"], body["error"], body["price_usd"]) == (False, "cost_limit_exceeded", "0.05")
    assert not log.exists()  # nothing ran
    ran = serve(cloud_client, log, "key-00001", **{"Cost-Limit": "0.05"})
    assert ran.status_code == 200 and ran.json()["cost_usd"] == 0.05
    assert len(log.read_text().splitlines()) == 1


def test_a_call_without_cost_limit_runs_as_before(cloud_client, tmp_path):
    assert serve(cloud_client, tmp_path / "runs.log", "key-00002").status_code == 200


@pytest.mark.parametrize("limit", ["cheap", "NaN", "-1", "Infinity", ""])
def test_a_malformed_cost_limit_is_invalid_params(cloud_client, tmp_path, limit):
    log = tmp_path / "runs.log"
    answer = serve(cloud_client, log, "key-00003", **{"Cost-Limit": limit})
    assert answer.status_code == 422 and answer.json()["error"] == "invalid_params"
    assert not log.exists()


# -- storage: a read-only DATA_DIR stops start-up clearly; a full disk is storage_unavailable ------


def test_a_read_only_data_dir_is_a_config_error_at_start_up(tmpfs) -> None:
    config = HybridConfig.from_mapping({"DATA_DIR": str(tmpfs(read_only=True))})
    with pytest.raises(ConfigError) as info, TestClient(create_app(config)):
        pass
    assert "DATA_DIR" in str(info.value) and "Read-only file system" in str(info.value)


def test_a_database_file_that_cannot_be_opened_is_a_config_error_at_start_up(tmp_path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "hybrid.sqlite3").mkdir(parents=True)  # in the way, for root too
    config = HybridConfig.from_mapping({"DATA_DIR": str(data_dir)})
    with pytest.raises(ConfigError) as info, TestClient(create_app(config)):
        pass
    assert f"DATA_DIR {data_dir}" in str(info.value)


def fill(path: Path) -> None:
    """Write ``path`` until the file system is full (unbuffered: nothing left to flush)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"x" * 4096)
    finally:
        os.close(fd)


def test_a_full_disk_answers_storage_unavailable_and_recovers(tmpfs) -> None:
    data_dir = tmpfs(size="2m") / "data"
    config = HybridConfig.from_mapping(
        {
            "EVERREACH_ENV": "hybrid",
            "CLOUD_ENDPOINT": "http://127.0.0.1:9",
            "EVERREACH_CLOUD_KEY": "key-12345678",
            "OFFLINE_MODE": "true",  # dm.send has no local handler: it must go to the outbox
            "DATA_DIR": str(data_dir),
            "ALLOWED_HOSTS": "testserver",
        }
    )
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        fill(data_dir / "filler")
        answers = [
            client.post(
                "/dispatch", json={"action": "dm.send", "params": {"n": n, "pad": "y" * 65536}}
            )
            for n in range(8)
        ]
        codes = {(a.status_code, a.json()["error"]) for a in answers}
        assert (503, "storage_unavailable") in codes, codes
        assert codes <= {(503, "storage_unavailable"), (202, None)}, codes
        failed = next(a.json() for a in answers if a.status_code == 503)
        assert "DATA_DIR" in failed["detail"]
        (data_dir / "filler").unlink()
        again = client.post("/dispatch", json={"action": "dm.send", "params": {"n": 99}})
        assert again.status_code == 202, again.json()


def test_the_guard_asks_this_cloud_and_reports_overruns_to_metrics(tmp_path) -> None:
    config = HybridConfig.from_mapping(
        {
            "EVERREACH_ENV": "hybrid",
            "CLOUD_ENDPOINT": "http://127.0.0.1:9",
            "EVERREACH_CLOUD_KEY": "key-12345678",
            "DATA_DIR": str(tmp_path / "data"),
            "ALLOWED_HOSTS": "testserver",
        }
    )
    app = create_app(config)
    with TestClient(app) as client:
        runtime = app.state.runtime
        guard = runtime.cost_guard
        assert guard.request_state == runtime.cloud.request_state
        assert guard.on_overrun is not None
        guard.on_overrun()
        assert "everreach_cost_overruns_total 1.0" in client.get("/metrics").text


def test_an_unknown_action_is_404_whatever_the_cost_limit(cloud_client):
    answer = cloud_client.post(
        "/api/services/claude/nothing_here",
        json={"params": {}},
        headers={"Authorization": f"Bearer {CLOUD_KEY}", "Cost-Limit": "0"},
    )
    assert answer.status_code == 404 and answer.json()["error"] == "unknown_action"


# -- idempotency on the serving side, and the outbox for a person ------------------------------

CLOUD_KEY = "cloud-key-for-tests"
AUTH = {"Authorization": f"Bearer {CLOUD_KEY}"}


def _cloud(tmp_path: Path, **extra: str) -> TestClient:
    config = HybridConfig.from_mapping(
        {
            "DATA_DIR": str(tmp_path / "data"),
            "ALLOWED_HOSTS": "testserver",
            "EVERREACH_ENV": "cloud",
            "EVERREACH_CLOUD_KEY": CLOUD_KEY,
            "EVERREACH_SERVICES": "tests.e2e_services",
            **extra,
        }
    )
    return TestClient(create_app(config), raise_server_exceptions=False)


def _claim_by_a_dead_holder(data_dir: Path, key: str, action: str, params: dict[str, Any]):
    """Leave ``key`` claimed by a process that died mid-handler (its heartbeat long stopped)."""

    async def claim() -> None:
        store = IdempotencyStore(
            data_dir / "hybrid.sqlite3", holder=Holder("node-gone", 1, "1"), clock=lambda: 0.0
        )
        await store.open()
        await store.claim(key, action, params_hash(params))
        await store.close()

    asyncio.run(claim())


def test_a_handler_gets_the_idempotency_key_of_its_call(tmp_path: Path) -> None:
    with _cloud(tmp_path) as client:
        headers = {**AUTH, "Idempotency-Key": "whoami-key-0001"}
        answer = client.post("/api/services/test/whoami", json={"params": {}}, headers=headers)
        assert answer.json()["result"]["key"] == "whoami-key-0001"
        local = client.post(
            "/dispatch", json={"action": "test.whoami", "idempotency_key": "dispatch-key-01"}
        )
        assert local.json()["result"]["key"] == "dispatch-key-01"


def test_lookup_says_whether_a_key_ever_reached_a_handler(tmp_path: Path) -> None:
    with _cloud(tmp_path) as client:
        assert client.get("/api/idempotency/never-sent-01").status_code == 401
        unknown = client.get("/api/idempotency/never-sent-01", headers=AUTH)
        assert unknown.json() == {"key": "never-sent-01", "state": "unknown"}
        headers = {**AUTH, "Idempotency-Key": "sent-once-0001"}
        client.post("/api/services/system/echo", json={"params": {"a": 1}}, headers=headers)
        done = client.get("/api/idempotency/sent-once-0001", headers=AUTH)
        assert done.json() == {"key": "sent-once-0001", "state": "done"}


def test_a_side_effect_key_whose_holder_died_is_409_indeterminate_and_not_run(
    tmp_path: Path,
) -> None:
    log = tmp_path / "dm.log"
    params = {"to": "ann", "log": str(log)}
    _claim_by_a_dead_holder(tmp_path / "data", "dead-dm-key-01", "dm.send", params)
    with _cloud(tmp_path) as client:
        headers = {**AUTH, "Idempotency-Key": "dead-dm-key-01"}
        for _ in range(2):
            answer = client.post("/api/services/dm/send", json={"params": params}, headers=headers)
            assert answer.status_code == 409
            assert answer.json()["error"] == "indeterminate"
            assert "may have run" in answer.json()["detail"]
        assert not log.exists()
        state = client.get("/api/idempotency/dead-dm-key-01", headers=AUTH).json()["state"]
        assert state == "indeterminate"


def test_an_idempotent_key_whose_holder_died_is_run_again(tmp_path: Path) -> None:
    _claim_by_a_dead_holder(tmp_path / "data", "dead-echo-key-1", "system.echo", {"a": 1})
    with _cloud(tmp_path) as client:
        headers = {**AUTH, "Idempotency-Key": "dead-echo-key-1"}
        answer = client.post(
            "/api/services/system/echo", json={"params": {"a": 1}}, headers=headers
        )
        assert answer.status_code == 200 and answer.json()["result"] == {"a": 1}


def test_outbox_endpoints_need_the_local_token(tmp_path: Path) -> None:
    with _cloud(tmp_path, LOCAL_API_TOKEN="local-token-123") as client:
        assert client.post("/outbox/abc/retry").status_code == 401
        assert client.delete("/outbox/abc").status_code == 401
        bearer = {"Authorization": "Bearer local-token-123"}
        missing = client.post("/outbox/abc/retry", headers=bearer)
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        assert client.delete("/outbox/abc", headers=bearer).status_code == 404


def test_a_person_retries_or_drops_dead_letters_over_http(tmp_path: Path) -> None:
    with _cloud(tmp_path) as client:
        outbox = client.app.state.runtime.outbox  # type: ignore[attr-defined]
        portal = client.portal
        assert portal is not None
        parked = portal.call(outbox.enqueue, "dm.send", {"to": "ann"}, "parked-key-001")
        dead = portal.call(outbox.enqueue, "dm.send", {"to": "bob"}, "dead-key-0001")
        queued = portal.call(outbox.enqueue, "dm.send", {"to": "cy"}, "queued-key-001")
        portal.call(outbox.park, parked.id, "indeterminate: may have run")
        portal.call(lambda: outbox.fail(dead.id, "invalid_params", permanent=True))
        letters = client.get("/status").json()["dead_letters"]
        assert {(d["id"], d["indeterminate"]) for d in letters} == {
            (parked.id, True),
            (dead.id, False),
        }

        unconfirmed = client.post(f"/outbox/{parked.id}/retry")
        assert unconfirmed.status_code == 409 and unconfirmed.json()["error"] == "indeterminate"
        rerun = client.post(f"/outbox/{parked.id}/retry", json={"rerun": True})
        assert rerun.status_code == 200
        assert rerun.json()["idempotency_key"] == "parked-key-001~r1"
        retried = client.post(f"/outbox/{dead.id}/retry")
        assert retried.json()["idempotency_key"] == "dead-key-0001"

        assert client.delete(f"/outbox/{queued.id}").json()["dropped"] == "pending"
        pending = portal.call(outbox.pending)
        assert [item.id for item in pending] == [parked.id, dead.id]
        assert client.delete(f"/outbox/{queued.id}").status_code == 404


def test_an_unexpected_fault_quoting_a_secret_does_not_answer_it(tmp_path, monkeypatch):
    secret = "pg-pass-0001"
    config = HybridConfig.from_mapping(
        {
            "DATA_DIR": str(tmp_path / "data"),
            "REDIS_URL": f"redis://:{secret}@127.0.0.1:1/0",
            **IN_PROCESS,
        }
    )
    app = create_app(config)
    with TestClient(app, raise_server_exceptions=False) as client:

        async def leaky(*args: Any, **kwargs: Any) -> Any:
            raise ConnectionError(f"could not reach redis://:{secret}@127.0.0.1:1/0")

        monkeypatch.setattr(app.state.runtime.orchestrator, "route", leaky)
        answer = client.post("/dispatch", json={"action": "system.echo"})
    assert answer.status_code == 500 and "could not reach" in answer.json()["detail"]
    assert secret not in answer.text


# -- one serving path, one record per call ------------------------------------------------------


def _dispatch_on(client: TestClient, log: Path) -> Any:
    return client.post("/dispatch", json={"action": "claude.complete", "params": {"log": str(log)}})


def test_a_dispatch_on_the_cloud_is_priced_like_a_served_call(cloud_client, tmp_path):
    log = tmp_path / "runs.log"
    served = serve(cloud_client, log, "key-00003").json()
    dispatched = _dispatch_on(cloud_client, log).json()
    assert (served["source"], served["cost_usd"]) == ("cloud", 0.05)
    assert (dispatched["source"], dispatched["cost_usd"]) == ("cloud", 0.05)


def test_served_and_dispatched_calls_are_counted_once_in_status_and_metrics(cloud_client, tmp_path):
    log = tmp_path / "runs.log"
    assert serve(cloud_client, log, "key-00004").status_code == 200
    assert _dispatch_on(cloud_client, log).status_code == 200
    status = cloud_client.get("/status").json()
    assert status["dispatch_counts"]["claude.complete"] == {"cloud": 2}
    metrics = cloud_client.get("/metrics").text
    series = 'everreach_dispatch_total{action="claude.complete",outcome="ok",source="cloud"} 2.0'
    assert series in metrics


@pytest.mark.process
def test_importing_the_server_loads_no_cli_rich_or_optional_database_clients() -> None:
    loaded = modules_loaded_by("import local_server")
    assert "httpx" in loaded and "fastapi" in loaded
    unwanted = {"rich", "pygments", "click", "supabase", "psycopg", "cli", "cli_commands", "redis"}
    assert loaded & unwanted == set()


# Opens and closes the lifespan; modules loaded meanwhile stay in sys.modules to be listed.
_OPEN_AND_CLOSE = """
import asyncio
from config.hybrid_config import HybridConfig
from local_server import create_app

app = create_app(HybridConfig.from_mapping({"DATA_DIR": sys.argv[1], "EVERREACH_ENV": "local"}))

async def main() -> None:
    async with app.router.lifespan_context(app):
        pass

asyncio.run(main())
"""


@pytest.mark.process
def test_a_server_without_redis_or_a_cloud_does_not_load_their_clients(tmp_path: Path) -> None:
    loaded = modules_loaded_by(_OPEN_AND_CLOSE, str(tmp_path / "data"))
    assert {"local_server", "runtime", "httpx"} <= loaded  # the lifespan did run
    assert loaded & {"redis", "aiohttp", "httpx_aiohttp"} == set()


@pytest.mark.parametrize(("setting", "lines"), [("true", 1), ("false", 0)])
def test_log_dispatch_turns_the_dispatch_line_on_or_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, setting: str, lines: int
) -> None:
    config = HybridConfig.from_mapping(
        {"DATA_DIR": str(tmp_path / "data"), "LOG_DISPATCH": setting, **IN_PROCESS}
    )
    with TestClient(create_app(config)) as test_client:
        with caplog.at_level(logging.INFO, logger="everreach.dispatch"):
            answer = test_client.post("/dispatch", json={"action": "system.heartbeat"})
        assert answer.json()["ok"] is True
    assert len([r for r in caplog.records if r.name == "everreach.dispatch"]) == lines


def _batch_bound(tmp_path: Path, **variables: str) -> TestClient:
    config = HybridConfig.from_mapping(
        {"DATA_DIR": str(tmp_path / "data"), **IN_PROCESS, **variables}
    )
    return TestClient(create_app(config), raise_server_exceptions=False)


def test_batch_accepts_256_in_flight_by_default(tmp_path: Path) -> None:
    with _batch_bound(tmp_path) as client:
        assert client.post("/batch", json={"items": [], "max_concurrent": 256}).status_code == 200
        refused = client.post("/batch", json={"items": [], "max_concurrent": 257})
    assert refused.status_code == 422 and "between 1 and 256" in refused.text


def test_batch_max_concurrent_bounds_what_a_batch_may_ask_for(tmp_path: Path) -> None:
    with _batch_bound(tmp_path, BATCH_MAX_CONCURRENT="4") as client:
        assert client.post("/batch", json={"items": [], "max_concurrent": 4}).status_code == 200
        refused = client.post("/batch", json={"items": [], "max_concurrent": 5})
    assert refused.status_code == 422 and "between 1 and 4" in refused.text


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        ("Bearer local-token-123", 200),
        ("bearer local-token-123", 200),
        ("BEARER   local-token-123  ", 200),
        ("Bearer local-token-12", 401),
        ("Bearer local-token-1234", 401),
        ("Bearer ", 401),
        ("Basic local-token-123", 401),
        ("local-token-123", 401),
        (None, 401),
    ],
)
def test_the_local_token_is_read_in_any_spelling_of_the_bearer_scheme(
    tmp_path: Path, authorization: str | None, status: int
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    with _cloud(tmp_path, LOCAL_API_TOKEN="local-token-123") as client:
        assert client.get("/status", headers=headers).status_code == status
