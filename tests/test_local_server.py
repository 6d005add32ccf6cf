"""In-process tests of local_server: the app's lifespan, fault mapping and body limit."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from config.hybrid_config import HybridConfig
from idempotency import Holder, IdempotencyStore
from local_server import create_app
from offline_cache import params_hash

pytestmark = pytest.mark.prd200


@pytest.fixture
def client(tmp_path):
    config = HybridConfig.from_mapping({"DATA_DIR": str(tmp_path / "data")})
    # The server answers faults itself; don't let the test client re-raise them.
    with TestClient(create_app(config), raise_server_exceptions=False) as test_client:
        yield test_client


def test_lifespan_opens_and_closes_every_resource(tmp_path):
    config = HybridConfig.from_mapping({"DATA_DIR": str(tmp_path / "data")})
    app = create_app(config)
    with TestClient(app) as client:
        assert client.get("/health").json()["env"] == "local"
        runtime = app.state.runtime
        assert runtime.client is not None and not runtime.client.is_closed
    assert runtime.client.is_closed
    assert app.state.runtime is None
    assert (tmp_path / "data" / "hybrid.sqlite3").exists()


def test_an_unexpected_fault_is_an_envelope_not_a_page_and_never_a_202(client, monkeypatch):
    async def disk_full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(client.app.state.runtime.orchestrator, "route", disk_full)
    answer = client.post("/dispatch", json={"action": "dm.send", "params": {}})
    assert answer.status_code == 500
    body = answer.json()
    assert body["ok"] is False and body["error"] == "handler_error"
    assert "No space left on device" in body["detail"]
    assert client.post("/dispatch", json={"action": "system.echo"}).status_code == 500


def test_a_chunked_body_over_the_limit_is_refused(client):
    def chunks():
        for _ in range(17):
            yield b"x" * 65536

    answer = client.post("/dispatch", content=chunks())
    assert answer.status_code == 413


def test_the_status_page_is_html(client):
    answer = client.get("/")
    assert answer.status_code == 200 and "text/html" in answer.headers["content-type"]


# -- idempotency on the serving side, and the outbox for a person ------------------------------

CLOUD_KEY = "cloud-key-for-tests"
AUTH = {"Authorization": f"Bearer {CLOUD_KEY}"}


def _cloud(tmp_path: Path, **extra: str) -> TestClient:
    config = HybridConfig.from_mapping(
        {
            "DATA_DIR": str(tmp_path / "data"),
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
