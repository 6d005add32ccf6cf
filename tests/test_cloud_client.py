"""CloudClient: one place for the cloud's auth, timeouts and the mapping of HTTPX failures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from cloud_client import CloudClient, CloudTimeouts, raise_for_status, was_refused
from config.hybrid_config import HybridConfig
from errors import ActionError, CloudTimeout, CloudUnavailable, InvalidParams, Unauthorized
from local_server import create_app

ENDPOINT = "http://cloud.test"
KEY = "k-0123456789"

Handler = Callable[[httpx.Request], httpx.Response]
MakeClient = Callable[[Handler], CloudClient]


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    opened: list[httpx.AsyncClient] = []

    def make(handler: Handler) -> CloudClient:
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        opened.append(http)
        return CloudClient(
            endpoint=ENDPOINT + "/", api_key=KEY, http=http, timeouts=CloudTimeouts(7.0)
        )

    yield make
    for http in opened:
        await http.aclose()


def _raises(exc: Exception) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


@pytest.mark.parametrize(
    ("raised", "expected", "never_ran", "refused"),
    [
        (httpx.ConnectError("refused"), CloudUnavailable, True, True),
        (httpx.ConnectTimeout("slow connect"), CloudTimeout, True, False),
        (httpx.PoolTimeout("no free connection"), CloudTimeout, True, False),
        (httpx.ReadTimeout("slow answer"), CloudTimeout, False, False),
        (httpx.WriteTimeout("slow upload"), CloudTimeout, False, False),
        (httpx.RemoteProtocolError("server hung up"), CloudUnavailable, False, False),
        (httpx.ReadError("connection reset"), CloudUnavailable, False, False),
        (httpx.DecodingError("bad gzip"), CloudUnavailable, False, False),
        (httpx.LocalProtocolError("bad header"), InvalidParams, True, False),
    ],
)
async def test_each_httpx_failure_maps_to_one_error_with_its_cause(
    make_client: MakeClient,
    raised: Exception,
    expected: type[ActionError],
    never_ran: bool,
    refused: bool,
) -> None:
    client = make_client(_raises(raised))
    with pytest.raises(ActionError) as caught:
        await client.send("POST", client.url("/api/services/a/b"), content=b"{}")
    assert type(caught.value) is expected
    assert caught.value.never_ran is never_ran
    assert caught.value.__cause__ is raised
    assert was_refused(caught.value) is refused


@pytest.mark.parametrize(
    ("status", "expected", "never_ran"),
    [
        (401, Unauthorized, True),
        (403, Unauthorized, True),
        (400, InvalidParams, True),
        (413, InvalidParams, True),
        (422, InvalidParams, True),
        (404, CloudUnavailable, True),
        (500, CloudUnavailable, False),
        (503, CloudUnavailable, False),
    ],
)
def test_each_non_2xx_answer_maps_to_one_error(
    status: int, expected: type[ActionError], never_ran: bool
) -> None:
    response = httpx.Response(status, request=httpx.Request("GET", ENDPOINT))
    with pytest.raises(ActionError) as caught:
        raise_for_status(response, "GET /x")
    assert type(caught.value) is expected
    assert caught.value.never_ran is never_ran
    assert "GET /x" in caught.value.detail


async def test_every_request_carries_the_key_and_the_per_call_timeout(
    make_client: MakeClient,
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    client = make_client(handler)
    assert await client.request_json("POST", "/api/sync/state", body={"changes": []}) == {
        "ok": True
    }
    await client.request_json("GET", "/api/sync/state", timeout_s=2.0)
    assert [r.headers["Authorization"] for r in seen] == [f"Bearer {KEY}"] * 2
    assert [str(r.url) for r in seen] == [f"{ENDPOINT}/api/sync/state"] * 2
    assert [r.extensions["timeout"]["read"] for r in seen] == [7.0, 2.0]
    assert [r.extensions["timeout"]["connect"] for r in seen] == [5.0, 2.0]


async def test_a_body_that_is_not_json_is_cloud_unavailable(make_client: MakeClient) -> None:
    client = make_client(lambda request: httpx.Response(200, text="<html>"))
    with pytest.raises(CloudUnavailable, match="not JSON"):
        await client.request_json("GET", "/api/sync/state")


async def test_the_schedule_list_is_read_from_either_shape(make_client: MakeClient) -> None:
    entry: dict[str, Any] = {"id": "a", "action": "x.y", "interval_sec": 60, "mirror": True}
    wrapped = make_client(lambda request: httpx.Response(200, json={"schedules": [entry]}))
    bare = make_client(lambda request: httpx.Response(200, json=[entry]))
    assert await wrapped.schedules() == [entry]
    assert await bare.schedules() == [entry]


async def test_request_state_is_none_whenever_the_cloud_cannot_say(
    make_client: MakeClient,
) -> None:
    answers = {
        "known": httpx.Response(200, json={"key": "known", "state": "done"}),
        "other": httpx.Response(200, json={"key": "someone-else", "state": "unknown"}),
        "gone": httpx.Response(404, json={"error": "not_found"}),
        "junk": httpx.Response(200, text="nope"),
    }

    def handler(request: httpx.Request) -> httpx.Response:
        return answers[request.url.path.rsplit("/", 1)[1]]

    client = make_client(handler)
    assert await client.request_state("known") == "done"
    for key in ("other", "gone", "junk"):
        assert await client.request_state(key) is None
    refused = make_client(_raises(httpx.ConnectError("refused")))
    assert await refused.request_state("known") is None


def test_without_an_endpoint_there_is_no_client() -> None:
    config = HybridConfig.from_mapping({"EVERREACH_ENV": "local"})
    assert CloudClient.from_config(config, httpx.AsyncClient()) is None


def test_one_instance_talks_to_its_cloud_through_one_client(tmp_path) -> None:
    config = HybridConfig.from_mapping(
        {
            "EVERREACH_ENV": "hybrid",
            "CLOUD_ENDPOINT": "http://127.0.0.1:9",
            "EVERREACH_CLOUD_KEY": KEY,
            "CLOUD_TIMEOUT_SEC": "4",
            "DATA_DIR": str(tmp_path / "data"),
            "ALLOWED_HOSTS": "testserver",
        }
    )
    app = create_app(config)
    with TestClient(app):
        runtime = app.state.runtime
        cloud = runtime.cloud_client
        assert cloud is not None and cloud.http is runtime.client
        assert cloud.auth_headers == {"Authorization": f"Bearer {KEY}"}
        assert cloud.timeouts.total_s == 4.0
        assert runtime.cloud.cloud_client is cloud
        assert runtime.state_sync.cloud is cloud
        assert runtime.connectivity._client is cloud.http


async def test_each_url_goes_out_as_given_many_times_over_and_past_the_parsed_bound(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cloud_client

    monkeypatch.setattr(cloud_client, "_MAX_PARSED_URLS", 3)
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json={})

    client = make_client(handler)
    urls = [client.url(f"/api/services/s/t{i % 5}?n={i % 2}") for i in range(12)]
    for url in urls:
        await client.send("POST", url, content=b"{}")
    assert seen == urls
    assert len(client._urls) <= 3
