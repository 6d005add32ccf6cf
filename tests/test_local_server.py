"""In-process tests of local_server: the app's lifespan, fault mapping and body limit."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from config.hybrid_config import HybridConfig
from local_server import create_app

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
