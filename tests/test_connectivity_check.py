"""ConnectivityChecker: transitions from active and passive probes, OFFLINE_MODE, callbacks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from cloud_client import CloudClient
from config.hybrid_config import HybridConfig
from connectivity_check import CloudLink, ConnectivityChecker, cloud_link

pytestmark = pytest.mark.prd200

ENDPOINT = "http://cloud.test"


class FakeCloud:
    """MockTransport handler whose /health answers with whatever the test queues."""

    def __init__(self) -> None:
        self.answers: list[int | Exception] = []
        self.default: int | Exception = 200
        self.requests: list[httpx.Request] = []
        self.seen = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.seen.set()
        answer = self.answers.pop(0) if self.answers else self.default
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer, json={"ok": answer == 200})


@pytest.fixture
def cloud() -> FakeCloud:
    return FakeCloud()


@pytest.fixture
async def make_checker(
    cloud: FakeCloud,
) -> AsyncIterator[Callable[..., Awaitable[ConnectivityChecker]]]:
    """Build checkers on a client whose network is ``cloud``; close them all afterwards."""
    client = httpx.AsyncClient(transport=httpx.MockTransport(cloud))
    made: list[ConnectivityChecker] = []

    async def make(**options: Any) -> ConnectivityChecker:
        options.setdefault("endpoint", ENDPOINT)
        checker = ConnectivityChecker(client=client, **options)
        made.append(checker)
        return checker

    yield make
    for checker in made:
        await checker.close()
    await client.aclose()


async def test_starts_online_with_an_endpoint(make_checker: Any) -> None:
    checker = await make_checker()
    assert checker.online is True
    assert checker.is_cloud_reachable() is True


async def test_is_offline_without_an_endpoint_and_never_probes(
    make_checker: Any, cloud: FakeCloud
) -> None:
    checker = await make_checker(endpoint=None)
    assert checker.online is False
    assert await checker.probe() is False
    checker.record_success()
    assert checker.online is False
    assert cloud.requests == []


async def test_goes_offline_after_three_failed_probes(make_checker: Any, cloud: FakeCloud) -> None:
    cloud.default = 503
    checker = await make_checker()
    assert await checker.probe() is False
    assert await checker.probe() is False
    assert checker.online is True
    assert await checker.probe() is False
    assert checker.online is False


async def test_connection_errors_count_as_failed_probes(
    make_checker: Any, cloud: FakeCloud
) -> None:
    cloud.default = httpx.ConnectError("refused")
    checker = await make_checker(offline_after=2)
    await checker.probe()
    await checker.probe()
    assert checker.online is False
    assert checker.consecutive_failures == 2


async def test_one_successful_probe_brings_it_back_online(
    make_checker: Any, cloud: FakeCloud
) -> None:
    cloud.answers = [500, 500, 500]
    checker = await make_checker()
    for _ in range(3):
        await checker.probe()
    assert checker.online is False
    assert await checker.probe() is True
    assert checker.online is True
    assert checker.consecutive_failures == 0


async def test_a_success_resets_the_failure_count(make_checker: Any) -> None:
    checker = await make_checker()
    for outcome in ("fail", "fail", "ok", "fail", "fail"):
        checker.record_success() if outcome == "ok" else checker.record_failure()
    assert checker.online is True


async def test_passive_probes_drive_the_same_transitions(make_checker: Any) -> None:
    checker = await make_checker(offline_after=3)
    for _ in range(3):
        checker.record_failure()
    assert checker.online is False
    checker.record_success()
    assert checker.online is True


async def test_offline_mode_forces_offline_and_makes_no_request(
    make_checker: Any, cloud: FakeCloud
) -> None:
    checker = await make_checker(forced_offline=True)
    assert checker.online is False
    assert await checker.probe() is False
    checker.record_success()
    assert checker.is_cloud_reachable() is False
    await checker.start()
    await asyncio.sleep(0)
    assert cloud.requests == []
    assert checker.snapshot()["offline_mode"] is True


async def test_callbacks_fire_once_per_transition(make_checker: Any) -> None:
    checker = await make_checker()
    seen: list[bool] = []
    checker.on_transition(seen.append)
    for _ in range(6):
        checker.record_failure()
    checker.record_success()
    checker.record_success()
    for _ in range(3):
        checker.record_failure()
    assert seen == [False, True, False]


async def test_async_callbacks_run_with_the_new_state(make_checker: Any) -> None:
    checker = await make_checker(offline_after=1)
    seen: list[bool] = []
    done = asyncio.Event()

    async def callback(online: bool) -> None:
        seen.append(online)
        done.set()

    checker.on_transition(callback)
    checker.record_failure()
    await asyncio.wait_for(done.wait(), timeout=5)
    assert seen == [False]


async def test_a_raising_callback_does_not_break_the_checker(
    make_checker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    checker = await make_checker(offline_after=1)
    seen: list[bool] = []
    async_done = asyncio.Event()

    def broken(online: bool) -> None:
        raise RuntimeError("callback bug")

    async def broken_async(online: bool) -> None:
        async_done.set()
        raise RuntimeError("async callback bug")

    checker.on_transition(broken)
    checker.on_transition(broken_async)
    checker.on_transition(seen.append)
    checker.record_failure()
    await asyncio.wait_for(async_done.wait(), timeout=5)
    await asyncio.sleep(0)
    checker.record_success()
    assert seen == [False, True]
    assert checker.online is True
    assert "callback bug" in caplog.text
    assert "async callback bug" in caplog.text


async def test_probe_gets_health_with_timeout_and_headers(
    make_checker: Any, cloud: FakeCloud
) -> None:
    checker = await make_checker(
        endpoint=ENDPOINT + "/", probe_timeout_s=1.5, headers={"X-Probe": "yes"}
    )
    await checker.probe()
    (request,) = cloud.requests
    assert str(request.url) == f"{ENDPOINT}/health"
    assert request.method == "GET"
    assert request.headers["X-Probe"] == "yes"
    assert request.extensions["timeout"]["read"] == 1.5


async def test_start_probes_at_once_then_every_interval(
    make_checker: Any, cloud: FakeCloud
) -> None:
    sleeps: list[float] = []
    forever = asyncio.Event()

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) >= 3:
            await forever.wait()

    cloud.default = 503
    checker = await make_checker(interval_s=30.0, sleep=fake_sleep)
    await checker.start()
    await asyncio.wait_for(cloud.seen.wait(), timeout=5)
    for _ in range(50):
        if len(sleeps) >= 3:
            break
        await asyncio.sleep(0)
    assert len(cloud.requests) == 3
    assert sleeps == [30.0, 30.0, 30.0]
    assert checker.online is False


async def test_the_probe_loop_survives_an_unexpected_error(
    make_checker: Any, cloud: FakeCloud, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0
    forever = asyncio.Event()

    async def fake_sleep(seconds: float) -> None:
        nonlocal calls
        calls += 1
        if calls >= 2:
            await forever.wait()

    cloud.answers = [RuntimeError("transport bug")]
    checker = await make_checker(sleep=fake_sleep)
    await checker.start()
    for _ in range(50):
        if calls >= 2:
            break
        await asyncio.sleep(0)
    assert len(cloud.requests) == 2
    assert "connectivity probe crashed" in caplog.text
    assert checker.snapshot()["last_probe_ok"] is True


async def test_close_cancels_the_loop_and_is_idempotent(
    make_checker: Any, cloud: FakeCloud
) -> None:
    checker = await make_checker(interval_s=3600.0)
    await checker.start()
    await asyncio.wait_for(cloud.seen.wait(), timeout=5)
    task = checker._loop_task
    assert task is not None
    await checker.close()
    await checker.close()
    assert task.cancelled()
    with pytest.raises(RuntimeError):
        await checker.start()


async def test_snapshot_reports_the_state(make_checker: Any, cloud: FakeCloud) -> None:
    now = [100.0]
    cloud.default = 503
    checker = await make_checker(offline_after=1, clock=lambda: now[0], wall_clock=lambda: 0.0)
    await checker.probe()
    now[0] += 12.0
    snap = checker.snapshot()
    assert snap == {
        "online": False,
        "offline_mode": False,
        "consecutive_failures": 1,
        "offline_after": 1,
        "last_probe_at": "1970-01-01T00:00:00+00:00",
        "last_probe_ok": False,
        "last_change_at": "1970-01-01T00:00:00+00:00",
        "since_change_s": 12.0,
        "endpoint": ENDPOINT,
    }


async def test_from_config_reads_the_connectivity_settings() -> None:
    config = HybridConfig.from_mapping(
        {
            "EVERREACH_ENV": "hybrid",
            "CLOUD_ENDPOINT": ENDPOINT,
            "EVERREACH_CLOUD_KEY": "k",
            "CONNECTIVITY_INTERVAL_SEC": "7",
            "OFFLINE_AFTER_FAILURES": "5",
            "OFFLINE_MODE": "true",
            "CLOUD_TIMEOUT_SEC": "2",
        }
    )
    async with httpx.AsyncClient() as client:
        cloud = CloudClient.from_config(config, client)
        assert cloud is not None
        checker = ConnectivityChecker.from_config(config, cloud)
        assert checker.endpoint == ENDPOINT
        assert checker.interval_s == 7.0
        assert checker.offline_after == 5
        assert checker.forced_offline is True
        assert checker.probe_timeout_s == 2.0
        assert checker.online is False
        await checker.close()


async def test_a_probe_records_that_the_cloud_refuses_our_key(make_checker: Any) -> None:
    seen: list[tuple[str, str | None]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("Authorization")))
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        return httpx.Response(401, json={"ok": False, "error": "unauthorized"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        checker = ConnectivityChecker(
            endpoint=ENDPOINT, client=client, auth_headers={"Authorization": "Bearer wrong"}
        )
        assert checker.auth == "unknown"
        assert await checker.probe() is True  # reachable: the cloud answers
        assert checker.auth == "refused"
    assert seen == [("/health", None), ("/api/schedules", "Bearer wrong")]


async def test_a_probe_records_that_the_cloud_takes_our_key() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"schedules": []})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        checker = ConnectivityChecker(
            endpoint=ENDPOINT, client=client, auth_headers={"Authorization": "Bearer right"}
        )
        await checker.probe()
        assert checker.auth == "ok"


async def test_without_auth_headers_a_probe_only_asks_for_health(
    make_checker: Any, cloud: FakeCloud
) -> None:
    checker = await make_checker()
    await checker.probe()
    assert [r.url.path for r in cloud.requests] == ["/health"]
    assert checker.auth == "unknown"


@pytest.mark.parametrize(
    ("configured", "online", "offline_mode", "expected"),
    [
        (False, False, False, CloudLink.NONE),
        (False, False, True, CloudLink.OFFLINE),
        (True, True, False, CloudLink.ONLINE),
        (True, False, False, CloudLink.OFFLINE),
        (True, True, True, CloudLink.OFFLINE),
    ],
)
async def test_online_and_offline_are_decided_in_one_place(
    configured: bool, online: bool, offline_mode: bool, expected: CloudLink
) -> None:
    async with httpx.AsyncClient() as client:
        checker = ConnectivityChecker(endpoint=ENDPOINT, client=client, offline_after=1)
        if not online:
            checker.record_failure()
        assert checker.online is online
        link = cloud_link(checker if configured else None, offline_mode=offline_mode)
        assert link is expected
        await checker.close()
