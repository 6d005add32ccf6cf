"""The command line's client: the server URL and token from the config, the batch sender."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from cli_client import NO_RESPONSE, Server, send_batch
from config.hybrid_config import HybridConfig

pytestmark = pytest.mark.prd200


@pytest.mark.parametrize(
    ("variables", "url"),
    [
        ({}, "http://127.0.0.1:8080"),
        ({"host": "0.0.0.0", "port": "9000", "local_api_token": "t"}, "http://127.0.0.1:9000"),
        ({"host": "::1"}, "http://[::1]:8080"),
        ({"local_endpoint": "http://box.lan:7000/"}, "http://box.lan:7000"),
    ],
)
def test_the_server_url_comes_from_the_config(variables, url):
    assert Server.from_config(HybridConfig.from_mapping(variables)).url == url


def test_the_token_comes_from_the_config_unless_given():
    config = HybridConfig.from_mapping({"local_api_token": "from-config"})
    assert Server.from_config(config).headers() == {"Authorization": "Bearer from-config"}
    assert Server.from_config(config, token="t2").headers() == {"Authorization": "Bearer t2"}
    assert Server.from_config(HybridConfig.from_mapping({})).headers() == {}


# -- serve ----------------------------------------------------------------------------------------


async def test_send_batch_keeps_at_most_max_concurrent_requests_in_flight():
    in_flight = peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        for _ in range(5):  # yield to the loop so the other items get their chance to start
            await asyncio.sleep(0)
        in_flight -= 1
        item = json.loads(request.content)
        return httpx.Response(
            200,
            json={
                "ok": True,
                "action": item["action"],
                "source": "local",
                "result": item["params"],
            },
        )

    seen: list[int] = []
    results = await send_batch(
        Server("http://test"),
        [{"action": "x.y", "params": {"i": i}} for i in range(10)],
        max_concurrent=3,
        on_result=lambda index, _: seen.append(index),
        transport=httpx.MockTransport(handler),
    )
    assert peak == 3
    assert [r["result"]["i"] for r in results] == list(range(10))
    assert sorted(seen) == list(range(10))


async def test_send_batch_turns_an_unusable_answer_into_a_failed_item():
    def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["params"]["i"] == 1:
            return httpx.Response(502, text="<html>bad gateway</html>")
        return httpx.Response(200, json={"ok": True, "action": "x.y", "source": "local"})

    results = await send_batch(
        Server("http://test"),
        [{"action": "x.y", "params": {"i": i}} for i in range(3)],
        transport=httpx.MockTransport(handler),
    )
    assert [r["ok"] for r in results] == [True, False, True]
    assert results[1]["error"] == NO_RESPONSE and "502" in results[1]["detail"]
