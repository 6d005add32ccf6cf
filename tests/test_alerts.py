"""Tests of alerts.py: dedupe per transition, rate limit, retries, and a real webhook listener."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import uvicorn

from alerts import Alerter, AlertEvent, Delivery
from tests.conftest import free_port, until

AT = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


class Listener:
    """A webhook receiver: a real uvicorn server on a loopback port, in this event loop."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.url = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        self.bodies.append(json.loads(b"".join(chunks)))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    app = Listener()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    await until(lambda: server.started, what="the webhook listener to start")
    app.url = f"http://127.0.0.1:{port}/hook"
    yield app
    server.should_exit = True
    await task


class Sleeps:
    """A sleep that only records how long it was asked to wait."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def alerter(**kwargs: Any) -> Alerter:
    defaults: dict[str, Any] = {
        "instance": "terminal-1",
        "clock": lambda: AT,
        "sleep": Sleeps(),
        "rng": random.Random(3),
    }
    return Alerter(**{**defaults, **kwargs})


def mock_client(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


async def test_one_alert_per_transition_reaches_a_real_webhook(listener: Listener) -> None:
    async with httpx.AsyncClient() as client:
        alerts = alerter(webhook_url=listener.url, client=client, sleep=asyncio.sleep)
        alerts.start()
        try:
            assert not alerts.emit("cloud_online", "up")  # nothing to recover from
            assert alerts.emit(AlertEvent.CLOUD_OFFLINE, "3 probes failed", failures=3)
            assert not alerts.emit(AlertEvent.CLOUD_OFFLINE, "still down")
            assert alerts.emit(AlertEvent.CLOUD_ONLINE, "probe answered")
            assert not alerts.emit(AlertEvent.CLOUD_ONLINE, "still up")
            await until(lambda: len(listener.bodies) == 2, what="two alerts")
        finally:
            await alerts.aclose()
    assert listener.bodies == [
        {
            "event": "cloud_offline",
            "at": AT.isoformat(),
            "instance": "terminal-1",
            "detail": "3 probes failed",
            "failures": 3,
        },
        {
            "event": "cloud_online",
            "at": AT.isoformat(),
            "instance": "terminal-1",
            "detail": "probe answered",
        },
    ]
    assert [e["status"] for e in alerts.snapshot()["events"]] == ["sent", "sent"]


async def test_a_problem_fires_again_only_after_it_was_resolved() -> None:
    alerts = alerter()
    assert alerts.emit("dead_letter", "outbox 7 gave up", subject="7")
    assert alerts.emit("dead_letter", "outbox 8 gave up", subject="8")
    assert not alerts.emit("dead_letter", "outbox 7 again", subject="7")
    assert alerts.emit("hard_cap_reached", "400 of 400 USD")
    assert not alerts.emit("hard_cap_reached", "400 of 400 USD")
    alerts.resolve("hard_cap_reached")  # a new month: the cap watch resolves the old one
    assert alerts.emit("hard_cap_reached", "400 of 400 USD")
    assert alerts.emit("circuit_open", "cloud breaker", subject="cloud")
    alerts.resolve("circuit_open", "cloud")
    assert alerts.emit("circuit_open", "cloud breaker again", subject="cloud")
    snap = alerts.snapshot()
    assert [e["event"] for e in snap["events"]][:2] == ["circuit_open", "circuit_open"]
    assert {e["status"] for e in snap["events"]} == {"recorded"}  # no sink configured


async def test_failed_attempts_are_retried_with_growing_backoff() -> None:
    answers = iter([503, 429, 200])
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(next(answers))

    sleeps = Sleeps()
    async with mock_client(handler) as client:
        alerts = alerter(webhook_url="https://hooks.example/x", client=client, sleep=sleeps)
        alerts.start()
        alerts.emit("soft_cap_reached", "380 of 400 USD")
        await alerts.aclose(drain_s=5)
    assert len(calls) == 3
    assert len(sleeps.delays) == 2 and sleeps.delays[0] < sleeps.delays[1]
    [event] = alerts.snapshot()["events"]
    assert (event["status"], event["attempts"]) == ("sent", 3)
    assert alerts.snapshot()["failures"] == []


async def test_an_undeliverable_alert_is_visible_and_a_4xx_is_not_retried() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/gone":
            return httpx.Response(404)
        raise httpx.ConnectError("connection refused", request=request)

    async with mock_client(handler) as client:
        down = alerter(webhook_url="https://hooks.example/token-abc", client=client, attempts=4)
        down.start()
        down.emit("circuit_open", "cloud breaker")
        await down.aclose(drain_s=5)
        gone = alerter(webhook_url="https://hooks.example/gone", client=client)
        gone.start()
        gone.emit("circuit_open", "cloud breaker")
        await gone.aclose(drain_s=5)
    assert seen.count("/token-abc") == 4
    assert seen.count("/gone") == 1
    [failure] = down.snapshot()["failures"]
    assert failure["sink"] == "webhook" and "ConnectError" in failure["error"]
    assert "token-abc" not in json.dumps(down.snapshot())
    assert gone.snapshot()["events"][0]["status"] == Delivery.FAILED.value


async def test_emit_never_blocks_on_a_stuck_sink() -> None:
    release = asyncio.Event()
    got: list[dict[str, Any]] = []

    async def stuck_action(payload: dict[str, Any]) -> None:
        got.append(payload)
        await release.wait()

    alerts = alerter(action=stuck_action)
    alerts.start()
    try:
        alerts.emit("cloud_offline", "down")
        await until(lambda: len(got) == 1, what="the action to be called")
        # The sink hangs; emitting more returns at once and just queues.
        assert alerts.emit("dead_letter", "outbox 1", subject="1")
        assert alerts.emit("dead_letter", "outbox 2", subject="2")
        assert alerts.snapshot()["pending"] == 2
        release.set()
        await until(lambda: len(got) == 3, what="the queued alerts")
    finally:
        await alerts.aclose()
    assert got[0] == {"text": "[terminal-1] cloud_offline: down", "event": "cloud_offline"}


async def test_an_action_that_raises_is_retried_then_reported() -> None:
    calls = 0

    async def broken(payload: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("telegram said no")

    alerts = alerter(action=broken, attempts=3)
    alerts.start()
    alerts.emit("rate_limit_backlog", "dm.send is 2 h behind", subject="dm.send")
    await alerts.aclose(drain_s=5)
    assert calls == 3
    [failure] = alerts.snapshot()["failures"]
    assert failure == {
        "event": "rate_limit_backlog",
        "at": AT.isoformat(),
        "sink": "action",
        "error": "RuntimeError: telegram said no",
    }


async def test_alerts_over_the_rate_limit_are_recorded_not_sent() -> None:
    sent: list[str] = []

    async def action(payload: dict[str, Any]) -> None:
        sent.append(payload["event"])

    now = [0.0]
    alerts = alerter(action=action, max_per_window=3, window_s=60, monotonic=lambda: now[0])
    alerts.start()
    for n in range(5):
        alerts.emit("dead_letter", f"outbox {n}", subject=str(n))
    now[0] = 61.0  # a new window
    alerts.emit("dead_letter", "outbox 9", subject="9")
    await alerts.aclose(drain_s=5)
    assert len(sent) == 4
    snap = alerts.snapshot()
    assert snap["suppressed"] == 2
    assert [e["status"] for e in reversed(snap["events"])] == [
        "sent", "sent", "sent", "suppressed", "suppressed", "sent",
    ]  # fmt: skip


async def test_emit_of_an_unknown_event_returns_false_and_does_not_raise() -> None:
    assert alerter().emit("cloud_exploded", "?") is False


async def test_aclose_is_idempotent_and_stops_the_task() -> None:
    alerts = alerter()
    alerts.start()
    await alerts.aclose()
    await alerts.aclose()
    assert alerts.snapshot()["pending"] == 0


def test_a_webhook_needs_the_shared_client() -> None:
    with pytest.raises(ValueError, match="AsyncClient"):
        Alerter(instance="x", webhook_url="https://hooks.example/x")


async def test_aclose_gives_up_on_a_stuck_sink_and_cancels_it() -> None:
    cancelled = asyncio.Event()

    async def stuck(payload: dict[str, Any]) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    alerts = alerter(action=stuck, timeout_s=3600)
    alerts.start()
    alerts.emit("cloud_offline", "down")
    await alerts.aclose(drain_s=0.05)
    assert cancelled.is_set()
    assert alerts.snapshot()["events"][0]["status"] == "pending"
