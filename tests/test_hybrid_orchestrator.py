"""HybridOrchestrator in-process: the routing rules 1-6 on real parts.

Each world is built from a real ServiceRegistry (handlers defined here, counting their calls),
the bundled route table, a CloudExecutor whose network is ``httpx.MockTransport`` (counting the
requests the "cloud" receives), and real OfflineCache, Outbox and CostGuard on SQLite files
under ``tmp_path``. Backoff sleeps are recorded, never waited for.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from circuit_breaker import CircuitBreaker
from cloud_executor import CloudExecutor, RetryPolicy
from config.hybrid_config import HybridConfig
from connectivity_check import ConnectivityChecker
from cost_guard import CostGuard
from cost_rates import BUILTIN_RATES, CostRates
from envelope import Envelope
from errors import CloudUnavailable, Env, ErrorCode, InvalidParams, Source
from hybrid_orchestrator import HybridOrchestrator
from local_executor import LocalExecutor
from offline_cache import OfflineCache
from outbox import Outbox
from outbox_rows import OutboxStatus
from route_table import RouteTable
from service_registry import ServiceRegistry

pytestmark = pytest.mark.prd200

ENDPOINT = "http://cloud.test"
KEY = "test-cloud-key"
RETRIES = 2

Answer = httpx.Response | Exception


def ok(result: Any, **extra: Any) -> httpx.Response:
    return httpx.Response(200, json={"ok": True, "result": result, **extra})


def status(code: int, error: str = "cloud_unavailable") -> httpx.Response:
    return httpx.Response(code, json={"ok": False, "error": error, "detail": f"status {code}"})


class FakeCloud:
    """The cloud's network: answers from a script (the last one repeats), counts requests."""

    def __init__(self) -> None:
        self.answers: list[Answer] = [ok({"where": "cloud"})]
        self.requests: list[httpx.Request] = []

    def answer(self, *answers: Answer) -> None:
        self.answers = list(answers)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    @property
    def paths(self) -> list[str]:
        return [r.url.path for r in self.requests]

    @property
    def keys(self) -> list[str | None]:
        return [r.headers.get("Idempotency-Key") for r in self.requests]


class CacheClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    orchestrator: HybridOrchestrator
    cloud: FakeCloud
    calls: Counter[str]
    guard: CostGuard
    cache: OfflineCache
    outbox: Outbox
    cache_clock: CacheClock
    connectivity: ConnectivityChecker | None
    sleeps: list[float]

    async def route(self, action: str, params: Any = None, force_env: Any = None) -> Envelope:
        return await self.orchestrator.route(action, params, force_env)

    async def spend(self, amount_usd: str) -> None:
        """Put real committed spend in the ledger: a reservation and its commit."""
        reservation = await self.guard.reserve("claude.generate", Decimal(amount_usd), "seed")
        await self.guard.commit(reservation, Decimal(amount_usd))

    async def spent(self) -> dict[str, Any]:
        return await self.guard.snapshot()


Build = Callable[..., Awaitable[World]]


@pytest.fixture
async def build(tmp_path: Path) -> AsyncIterator[Build]:
    """Build worlds; every store, guard, checker and client is closed afterwards."""
    closers: list[Callable[[], Awaitable[None]]] = []

    async def factory(
        *,
        env: str = "hybrid",
        local: tuple[str, ...] = (),
        handlers: dict[str, Any] | None = None,
        with_cloud: bool | None = None,
        with_connectivity: bool = False,
        breaker: CircuitBreaker | None = None,
        rates: dict[str, str] | None = None,
        **variables: Any,
    ) -> World:
        data_dir = tmp_path / f"world{len(closers)}"
        config = HybridConfig.from_mapping(
            {
                "EVERREACH_ENV": env,
                "DATA_DIR": str(data_dir),
                "EVERREACH_TZ": "UTC",
                **(
                    {"CLOUD_ENDPOINT": ENDPOINT, "EVERREACH_CLOUD_KEY": KEY}
                    if env != "local"
                    else {}
                ),
                **variables,
            }
        )
        calls: Counter[str] = Counter()

        def counting(action: str) -> Callable[[dict[str, Any]], Awaitable[Any]]:
            async def handler(params: dict[str, Any]) -> dict[str, Any]:
                calls[action] += 1
                return {"where": "local", "action": action, "params": params}

            return handler

        table = {action: counting(action) for action in local}
        for action, handler in (handlers or {}).items():
            table[action] = handler
        registry = ServiceRegistry(table)

        cloud = FakeCloud()
        client = httpx.AsyncClient(transport=httpx.MockTransport(cloud))
        closers.append(client.aclose)
        sleeps: list[float] = []

        async def sleep(delay_s: float) -> None:
            sleeps.append(delay_s)

        executor = None
        if with_cloud if with_cloud is not None else config.cloud_endpoint is not None:
            executor = CloudExecutor(
                endpoint=config.cloud_endpoint or ENDPOINT,
                api_key=config.secret("everreach_cloud_key"),
                client=client,
                policy=RetryPolicy(retries=RETRIES),
                breaker=breaker or CircuitBreaker(failure_threshold=100),
                sleep=sleep,
                rng=lambda: 0.5,
            )
        connectivity = None
        if with_connectivity:
            connectivity = ConnectivityChecker(endpoint=ENDPOINT, client=client, offline_after=3)
            closers.append(connectivity.close)

        cache_clock = CacheClock()
        cache = OfflineCache(data_dir / "hybrid.sqlite3", ttl_s=3600.0, clock=cache_clock)
        outbox = Outbox(data_dir / "hybrid.sqlite3")
        for store in (cache, outbox):
            await store.open()
            closers.append(store.close)
        guard = CostGuard.from_config(config)
        await guard.open()
        closers.append(guard.close)

        orchestrator = HybridOrchestrator(
            config,
            local=LocalExecutor(registry),
            cloud=executor,
            route_table=RouteTable.load(),
            cost_guard=guard,
            rates=CostRates({**BUILTIN_RATES, **{k: Decimal(v) for k, v in (rates or {}).items()}}),
            connectivity=connectivity,
            cache=cache,
            outbox=outbox,
        )
        closers.append(orchestrator.drain)
        return World(
            orchestrator, cloud, calls, guard, cache, outbox, cache_clock, connectivity, sleeps
        )

    yield factory
    for closer in reversed(closers):
        await closer()


# -- env detection and _select_env (rules 1-3) ---------------------------------------------------


@pytest.mark.parametrize("env", ["local", "cloud", "hybrid"])
async def test_the_env_comes_from_everreach_env(build: Build, env: str) -> None:
    world = await build(env=env)
    assert world.orchestrator.env is Env(env)


@pytest.mark.parametrize(
    "action",
    ["dm.send", "research.keyword", "content.analyze_video", "claude.generate", "widget.spin"],
)
async def test_env_local_selects_local_for_every_action(build: Build, action: str) -> None:
    world = await build(env="local")
    assert world.orchestrator._select_env(action) is Env.LOCAL


@pytest.mark.parametrize("action", ["dm.send", "content.analyze_video", "widget.spin"])
async def test_env_cloud_selects_cloud_for_every_action(build: Build, action: str) -> None:
    world = await build(env="cloud")
    assert world.orchestrator._select_env(action) is Env.CLOUD


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ("content.analyze_video", Env.LOCAL),  # preferred local
        ("feedback.analysis", Env.LOCAL),
        ("feedback.new_thing", Env.LOCAL),  # family entry feedback.*: local
        ("system.heartbeat", Env.LOCAL),
        ("dm.send", Env.CLOUD),  # preferred cloud
        ("research.keyword", Env.CLOUD),
        ("linkedin.whatever", Env.CLOUD),  # family entry linkedin.*: cloud
        ("claude.generate", Env.CLOUD),  # auto, classifier: api
        ("revenue.dashboard", Env.CLOUD),  # auto, classifier: api family
        ("content.generate", Env.LOCAL),  # auto, classifier: compute
        ("content.embed", Env.LOCAL),
        ("widget.spin", Env.LOCAL),  # unknown: classifier default compute
    ],
)
async def test_hybrid_selects_by_route_table_and_classifier(
    build: Build, action: str, expected: Env
) -> None:
    world = await build()
    assert world.orchestrator._select_env(action) is expected


@pytest.mark.parametrize("env", ["local", "cloud", "hybrid"])
async def test_force_env_wins_over_everything(build: Build, env: str) -> None:
    world = await build(env=env)
    assert world.orchestrator._select_env("dm.send", "local") is Env.LOCAL
    assert world.orchestrator._select_env("content.analyze_video", "cloud") is Env.CLOUD


@pytest.mark.parametrize("force_env", ["hybrid", "LOCAL", "", "moon"])
async def test_an_invalid_force_env_is_invalid_params(build: Build, force_env: str) -> None:
    world = await build(local=("dm.send",))
    with pytest.raises(InvalidParams):
        world.orchestrator._select_env("dm.send", force_env)
    envelope = await world.route("dm.send", {}, force_env)
    assert envelope.error is ErrorCode.INVALID_PARAMS
    assert envelope.http_status == 422
    assert "force_env" in (envelope.detail or "")
    assert world.calls["dm.send"] == 0
    assert world.cloud.requests == []


async def test_force_env_local_runs_a_cloud_action_here(build: Build) -> None:
    world = await build(local=("dm.send",))
    envelope = await world.route("dm.send", {"to": "ann"}, "local")
    assert envelope.source is Source.LOCAL
    assert world.calls["dm.send"] == 1
    assert world.cloud.requests == []


async def test_force_env_cloud_sends_a_local_action_to_the_cloud(build: Build) -> None:
    world = await build(local=("content.analyze_video",))
    envelope = await world.route("content.analyze_video", {}, "cloud")
    assert envelope.source is Source.CLOUD
    assert world.cloud.paths == ["/api/services/content/analyze_video"]
    assert world.calls["content.analyze_video"] == 0


# -- where actions run ---------------------------------------------------------------------------


async def test_env_cloud_routes_dm_send_to_the_cloud(build: Build) -> None:
    world = await build(env="cloud", local=("dm.send",))
    world.cloud.answer(ok({"sent": True}))
    envelope = await world.route("dm.send", {"to": "ann", "text": "hi"})
    assert envelope.ok is True
    assert envelope["source"] == "cloud"
    assert envelope.result == {"sent": True}
    assert world.cloud.paths == ["/api/services/dm/send"]
    assert world.cloud.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    assert world.cloud.keys == [envelope.request_id]
    assert world.calls["dm.send"] == 0


async def test_an_instance_that_is_the_cloud_runs_cloud_calls_on_its_own_registry(
    build: Build,
) -> None:
    world = await build(env="cloud", local=("dm.send",), CLOUD_ENDPOINT="")
    envelope = await world.route("dm.send", {"to": "ann"})
    assert envelope.source is Source.CLOUD
    assert world.calls["dm.send"] == 1


async def test_env_local_runs_content_analyze_video_locally(build: Build) -> None:
    world = await build(env="local", local=("content.analyze_video",))
    envelope = await world.route("content.analyze_video", {"url": "v.mp4"})
    assert envelope.ok is True
    assert envelope["source"] == "local"
    assert envelope.result["params"] == {"url": "v.mp4"}
    assert world.calls["content.analyze_video"] == 1
    assert world.cloud.requests == []


async def test_hybrid_sends_api_actions_to_the_cloud_and_compute_actions_local(
    build: Build,
) -> None:
    world = await build(local=("dm.send", "content.analyze_video", "content.generate"))
    api = await world.route("dm.send", {"to": "ann"})
    compute = await world.route("content.analyze_video", {"url": "v.mp4"})
    auto_compute = await world.route("content.generate", {"n": 1})
    assert (api.source, compute.source, auto_compute.source) == (
        Source.CLOUD,
        Source.LOCAL,
        Source.LOCAL,
    )
    assert world.cloud.paths == ["/api/services/dm/send"]
    assert world.calls == Counter({"content.analyze_video": 1, "content.generate": 1})


async def test_an_unknown_action_in_hybrid_runs_locally(build: Build) -> None:
    world = await build(local=("widget.spin",))
    envelope = await world.route("widget.spin", {"rpm": 3})
    assert envelope.source is Source.LOCAL
    assert envelope.env is Env.LOCAL
    assert world.calls["widget.spin"] == 1
    assert world.cloud.requests == []


async def test_an_unknown_action_without_a_handler_is_unknown_action(build: Build) -> None:
    world = await build()
    envelope = await world.route("widget.spin", {})
    assert envelope.error is ErrorCode.UNKNOWN_ACTION
    assert envelope.http_status == 404
    assert world.cloud.requests == []


async def test_a_local_read_only_action_that_fails_locally_falls_back_to_the_cloud(
    build: Build,
) -> None:
    async def broken(params: dict[str, Any]) -> None:
        raise RuntimeError("ffmpeg missing")

    world = await build(handlers={"content.analyze_video": broken})
    envelope = await world.route("content.analyze_video", {"url": "v.mp4"})
    assert envelope.ok is True
    assert envelope.source is Source.CLOUD
    assert world.cloud.paths == ["/api/services/content/analyze_video"]


async def test_a_local_action_failing_here_and_in_the_cloud_runs_its_handler_once(
    build: Build,
) -> None:
    calls: list[dict[str, Any]] = []

    async def broken(params: dict[str, Any]) -> None:
        calls.append(params)
        raise RuntimeError("ffmpeg missing")

    world = await build(handlers={"content.analyze_video": broken})
    world.cloud.answer(status(500))
    envelope = await world.route("content.analyze_video", {"url": "v.mp4"})
    assert envelope.error is ErrorCode.CLOUD_UNAVAILABLE
    assert len(calls) == 1  # not run again as a "local fallback" of its own cloud fallback
    for _ in range(2):
        await world.route("content.analyze_video", {"url": "v.mp4"})
    # three calls, three failures: degraded exactly at the threshold, not before
    assert len(calls) == 3
    assert world.orchestrator.local.is_degraded("content.analyze_video")


# -- route() never raises -------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["Not An Action", "dm", "dm.send\n", "", "a.b.c", 42, None])
async def test_a_bad_action_name_is_an_invalid_params_envelope(build: Build, action: Any) -> None:
    world = await build()
    envelope = await world.route(action, {})
    assert envelope.ok is False
    assert envelope.error is ErrorCode.INVALID_PARAMS
    assert envelope.http_status == 422
    assert world.cloud.requests == []


@pytest.mark.parametrize("params", [[1, 2], "text", 3])
async def test_params_that_are_not_an_object_are_invalid_params(build: Build, params: Any) -> None:
    world = await build(local=("dm.send",))
    envelope = await world.route("dm.send", params)
    assert envelope.error is ErrorCode.INVALID_PARAMS
    assert world.calls["dm.send"] == 0


async def test_counts_by_action_and_source(build: Build) -> None:
    world = await build(local=("content.analyze_video",))
    await world.route("content.analyze_video", {})
    await world.route("content.analyze_video", {})
    await world.route("research.keyword", {})
    assert world.orchestrator.snapshot() == {
        "content.analyze_video": {"local": 2},
        "research.keyword": {"cloud": 1},
    }


# -- rule 4: the cost guard ---------------------------------------------------------------------


@pytest.mark.parametrize("action", ["claude.generate", "research.keyword", "revenue.dashboard"])
async def test_at_the_soft_cap_an_action_with_a_local_handler_runs_locally(
    build: Build, action: str
) -> None:
    world = await build(local=(action,))
    await world.spend("380")
    envelope = await world.route(action, {"prompt": "hi"})
    assert envelope.ok is True
    assert envelope.source is Source.LOCAL
    assert envelope.cost_guard_triggered is True
    assert envelope.to_dict()["cost_guard_triggered"] is True
    assert world.calls[action] == 1
    assert world.cloud.requests == []


async def test_below_the_soft_cap_the_same_action_goes_to_the_cloud(build: Build) -> None:
    world = await build(local=("claude.generate",))
    await world.spend("379.99")
    envelope = await world.route("claude.generate", {})
    assert envelope.source is Source.CLOUD
    assert envelope.cost_guard_triggered is False
    assert world.calls["claude.generate"] == 0


async def test_at_the_soft_cap_an_action_without_a_local_handler_still_uses_the_cloud(
    build: Build,
) -> None:
    world = await build()
    await world.spend("380")
    envelope = await world.route("research.platform", {})
    assert envelope.ok is True
    assert envelope.source is Source.CLOUD
    assert len(world.cloud.requests) == 1


async def test_at_the_hard_cap_no_cloud_call_is_made_and_the_answer_is_429(build: Build) -> None:
    world = await build()
    await world.spend("400")
    envelope = await world.route("research.platform", {"q": "x"})
    assert envelope.ok is False
    assert envelope.error is ErrorCode.COST_CAP_REACHED
    assert envelope.http_status == 429
    assert envelope.cost_guard_triggered is True
    assert world.cloud.requests == []
    assert (await world.spent())["spent_usd"] == "400.00"


async def test_at_the_hard_cap_an_action_with_a_local_handler_still_runs_locally(
    build: Build,
) -> None:
    world = await build(local=("research.platform",))
    await world.spend("400")
    envelope = await world.route("research.platform", {})
    assert envelope.source is Source.LOCAL
    assert envelope.cost_guard_triggered is True
    assert world.cloud.requests == []


async def test_at_the_hard_cap_force_env_cloud_is_refused_not_run_locally(build: Build) -> None:
    world = await build(local=("research.platform",))
    await world.spend("400")
    envelope = await world.route("research.platform", {}, "cloud")
    assert envelope.error is ErrorCode.COST_CAP_REACHED
    assert world.calls["research.platform"] == 0
    assert world.cloud.requests == []


async def test_a_call_that_would_pass_the_cap_is_refused(build: Build) -> None:
    world = await build()
    await world.spend("399.995")
    envelope = await world.route("claude.complete", {})  # claude.* costs $0.01
    assert envelope.error is ErrorCode.COST_CAP_REACHED
    assert world.cloud.requests == []


async def test_the_ledger_records_the_cost_the_cloud_reports_exactly(build: Build) -> None:
    world = await build()
    world.cloud.answer(ok({"rows": 3}, cost_usd=0.0123))
    envelope = await world.route("research.platform", {"q": "x"})
    assert envelope.cost_usd == Decimal("0.0123")
    snapshot = await world.spent()
    assert snapshot["by_action"] == {"research.platform": "0.0123"}
    assert snapshot["spent_usd"] == "0.0123"
    assert snapshot["reserved_usd"] == "0.00"


async def test_ten_cent_calls_add_up_exactly(build: Build) -> None:
    world = await build()
    world.cloud.answer(ok("r", cost_usd=0.01))
    for _ in range(10):
        await world.route("claude.generate", {})  # rate $0.01: no cost above its reservation
    assert (await world.spent())["spent_usd"] == "0.10"


async def test_without_a_reported_cost_the_rate_is_recorded(build: Build) -> None:
    world = await build()
    envelope = await world.route("dm.send", {"to": "ann"})
    assert envelope.cost_usd == Decimal("0.001")
    assert (await world.spent())["by_action"] == {"dm.send": "0.001"}


async def test_a_cloud_call_that_never_ran_releases_its_reservation(build: Build) -> None:
    world = await build()
    world.cloud.answer(httpx.ConnectError("refused"))
    await world.route("research.platform", {})
    snapshot = await world.spent()
    assert snapshot["spent_usd"] == "0.00"
    assert snapshot["reserved_usd"] == "0.00"


async def test_an_ambiguous_cloud_failure_is_charged_the_estimate(build: Build) -> None:
    world = await build()
    world.cloud.answer(status(500))
    await world.route("research.platform", {})
    snapshot = await world.spent()
    assert snapshot["spent_usd"] == "0.002"
    assert snapshot["reserved_usd"] == "0.00"


# -- rule 5: offline ----------------------------------------------------------------------------


@pytest.fixture(params=["offline_mode", "connectivity"])
def build_offline(request: pytest.FixtureRequest, build: Build) -> Build:
    """Worlds that are offline by OFFLINE_MODE=true, or by a checker that saw 3 failures."""

    async def factory(**options: Any) -> World:
        if request.param == "offline_mode":
            return await build(OFFLINE_MODE="true", **options)
        world = await build(with_connectivity=True, **options)
        assert world.connectivity is not None
        for _ in range(3):
            world.connectivity.record_failure()
        assert world.connectivity.online is False
        return world

    return factory


async def test_offline_a_cloud_action_with_a_local_handler_is_a_local_fallback(
    build_offline: Build,
) -> None:
    world = await build_offline(local=("research.keyword",))
    envelope = await world.route("research.keyword", {"q": "x"})
    assert envelope.ok is True
    assert envelope["source"] == "local_fallback"
    assert world.calls["research.keyword"] == 1
    assert world.cloud.requests == []


async def test_offline_a_side_effect_action_with_a_local_handler_runs_it_locally(
    build_offline: Build,
) -> None:
    world = await build_offline(local=("dm.send",))
    envelope = await world.route("dm.send", {"to": "ann"})
    assert envelope.source is Source.LOCAL_FALLBACK
    assert world.calls["dm.send"] == 1
    assert await world.outbox.depth() == 0
    assert world.cloud.requests == []


async def test_offline_without_a_handler_a_fresh_cache_entry_is_served(
    build_offline: Build,
) -> None:
    world = await build_offline()
    await world.cache.put("research.platform", {"q": "x", "n": 1}, {"rows": [1, 2]})
    world.cache_clock.now += 3599
    envelope = await world.route("research.platform", {"n": 1, "q": "x"})
    body = envelope.to_dict()
    assert body["ok"] is True
    assert body["source"] == "cache"
    assert body["result"] == {"rows": [1, 2]}
    assert body["cached_at"].startswith("2023-11-14T22:13:20")
    assert world.cloud.requests == []


async def test_offline_a_side_effect_action_without_a_handler_is_queued(
    build_offline: Build,
) -> None:
    world = await build_offline()
    envelope = await world.route("dm.send", {"to": "ann", "text": "hi"})
    body = envelope.to_dict()
    assert envelope.http_status == 202
    assert body["queued"] is True
    assert body["source"] == "outbox"
    assert body["ok"] is False
    (item,) = await world.outbox.pending()
    assert body["outbox_id"] == item.id
    assert item.action == "dm.send"
    assert item.params == {"to": "ann", "text": "hi"}
    assert item.idempotency_key == envelope.request_id
    assert world.cloud.requests == []


async def test_offline_with_nothing_to_serve_is_offline_with_the_stale_entry(
    build_offline: Build,
) -> None:
    world = await build_offline()
    await world.cache.put("research.platform", {"q": "x"}, {"rows": "old"})
    world.cache_clock.now += 3600
    envelope = await world.route("research.platform", {"q": "x"})
    body = envelope.to_dict()
    assert body["ok"] is False
    assert body["error"] == "offline"
    assert body["cached"] == {"rows": "old"}
    assert "cached_at" in body
    assert envelope.http_status == 503
    assert world.cloud.requests == []


async def test_offline_with_no_entry_at_all_is_offline_without_cached(
    build_offline: Build,
) -> None:
    world = await build_offline()
    envelope = await world.route("research.platform", {"q": "never seen"})
    body = envelope.to_dict()
    assert body["error"] == "offline"
    assert "cached" not in body
    assert envelope.http_status == 503


async def test_offline_a_local_action_still_runs_locally(build_offline: Build) -> None:
    world = await build_offline(local=("content.analyze_video",))
    envelope = await world.route("content.analyze_video", {})
    assert envelope.source is Source.LOCAL


async def test_two_failures_are_not_yet_offline_and_one_success_is_online(build: Build) -> None:
    world = await build(with_connectivity=True, local=("research.keyword",))
    assert world.connectivity is not None
    for _ in range(2):
        world.connectivity.record_failure()
    assert (await world.route("research.keyword", {})).source is Source.CLOUD
    world.connectivity.record_failure()
    assert (await world.route("research.keyword", {})).source is Source.LOCAL_FALLBACK
    world.connectivity.record_success()
    assert (await world.route("research.keyword", {})).source is Source.CLOUD
    assert len(world.cloud.requests) == 2


# -- rule 6: cloud failures ---------------------------------------------------------------------


async def test_a_read_only_action_whose_cloud_answers_500_falls_back_locally(
    build: Build,
) -> None:
    world = await build(local=("research.keyword",))
    world.cloud.answer(status(500))
    envelope = await world.route("research.keyword", {"q": "x"})
    assert envelope.ok is True
    assert envelope.source is Source.LOCAL_FALLBACK
    assert len(world.cloud.requests) == RETRIES + 1
    assert envelope.attempts == RETRIES + 2
    assert world.sleeps == [1.0, 3.0]
    assert world.calls["research.keyword"] == 1


async def test_a_read_only_action_without_a_handler_is_served_from_a_fresh_cache(
    build: Build,
) -> None:
    world = await build()
    await world.cache.put("research.platform", {"q": "x"}, {"rows": 7})
    world.cloud.answer(status(503))
    envelope = await world.route("research.platform", {"q": "x"})
    assert envelope.source is Source.CACHE
    assert envelope.result == {"rows": 7}


async def test_a_read_only_action_with_nothing_to_serve_is_the_cloud_error(build: Build) -> None:
    world = await build()
    world.cloud.answer(status(502))
    envelope = await world.route("research.platform", {"q": "x"})
    assert envelope.error is ErrorCode.CLOUD_UNAVAILABLE
    assert envelope.http_status == 502
    assert await world.outbox.depth() == 0


@pytest.mark.parametrize(
    "refusal",
    [httpx.ConnectError("refused"), httpx.ConnectTimeout("connect timed out")],
    ids=["connect-error", "connect-timeout"],
)
async def test_a_side_effect_action_that_never_reached_the_cloud_runs_locally(
    build: Build, refusal: Exception
) -> None:
    world = await build(local=("dm.send",))
    world.cloud.answer(refusal)
    envelope = await world.route("dm.send", {"to": "ann"})
    assert envelope.ok is True
    assert envelope.source is Source.LOCAL_FALLBACK
    assert world.calls["dm.send"] == 1
    assert await world.outbox.depth() == 0


async def test_a_side_effect_action_with_the_cloud_circuit_open_runs_locally(
    build: Build,
) -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_after_s=3600)
    breaker.record_failure()
    world = await build(local=("dm.send",), breaker=breaker)
    envelope = await world.route("dm.send", {"to": "ann"})
    assert envelope.source is Source.LOCAL_FALLBACK
    assert world.cloud.requests == []
    assert world.calls["dm.send"] == 1


@pytest.mark.parametrize(
    "ambiguous",
    [httpx.ReadTimeout("no answer"), status(500), status(503), status(409)],
    ids=["read-timeout", "500", "503", "409"],
)
async def test_a_side_effect_action_with_an_ambiguous_failure_is_queued_not_run_locally(
    build: Build, ambiguous: Answer
) -> None:
    world = await build(local=("dm.send",))
    world.cloud.answer(ambiguous)
    envelope = await world.route("dm.send", {"to": "ann"})
    assert envelope.queued is True
    assert envelope.http_status == 202
    assert envelope.source is Source.OUTBOX
    assert world.calls["dm.send"] == 0
    (item,) = await world.outbox.pending()
    assert item.id == envelope.outbox_id
    assert item.idempotency_key == envelope.request_id
    assert set(world.cloud.keys) == {envelope.request_id}


async def test_an_ambiguous_failure_then_a_refusal_is_still_ambiguous(build: Build) -> None:
    world = await build(local=("dm.send",))
    world.cloud.answer(httpx.ReadTimeout("maybe ran"), httpx.ConnectError("refused"))
    envelope = await world.route("dm.send", {"to": "ann"})
    assert envelope.queued is True
    assert world.calls["dm.send"] == 0


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (status(401, "unauthorized"), ErrorCode.UNAUTHORIZED),
        (status(422, "invalid_params"), ErrorCode.INVALID_PARAMS),
        (status(500, "handler_error"), ErrorCode.HANDLER_ERROR),
        (status(404, "unknown_action"), ErrorCode.UNKNOWN_ACTION),
    ],
)
async def test_definite_cloud_errors_of_side_effect_actions_are_not_queued(
    build: Build, answer: httpx.Response, code: ErrorCode
) -> None:
    world = await build()
    world.cloud.answer(answer)
    envelope = await world.route("dm.send", {"to": "ann"})
    assert envelope.ok is False
    assert envelope.queued is False
    assert envelope.error is code
    assert await world.outbox.depth() == 0
    assert len(world.cloud.requests) == 1


async def test_a_refused_key_is_answered_not_papered_over_locally(
    build: Build,
) -> None:
    world = await build(local=("dm.send",))
    world.cloud.answer(status(401, "unauthorized"))
    envelope = await world.route("dm.send", {"to": "ann"})
    assert envelope.error is ErrorCode.UNAUTHORIZED and envelope.http_status == 401
    assert world.calls["dm.send"] == 0
    assert await world.outbox.depth() == 0


async def test_a_failing_local_fallback_of_a_side_effect_is_not_queued_too(
    build: Build,
) -> None:
    async def half_sent(params: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("sent to one of two recipients, then failed")

    world = await build(handlers={"dm.send": half_sent})
    world.cloud.answer(httpx.ConnectError("refused"))
    envelope = await world.route("dm.send", {"to": "ann"})
    assert envelope.error is ErrorCode.HANDLER_ERROR
    assert envelope.source is Source.LOCAL_FALLBACK
    assert await world.outbox.depth() == 0


async def test_a_cloud_handler_error_of_a_side_effect_action_is_not_run_locally(
    build: Build,
) -> None:
    world = await build(local=("dm.send",))
    world.cloud.answer(status(500, "handler_error"))
    envelope = await world.route("dm.send", {"to": "ann"})
    assert envelope.error is ErrorCode.HANDLER_ERROR
    assert world.calls["dm.send"] == 0
    assert await world.outbox.depth() == 0


async def test_a_callers_request_id_is_the_cloud_idempotency_key(build: Build) -> None:
    world = await build()
    envelope = await world.orchestrator.route("dm.send", {"to": "ann"}, request_id="client-7")
    assert envelope.request_id == "client-7"
    assert world.cloud.keys == ["client-7"]


async def test_a_retried_request_is_queued_once(build: Build) -> None:
    world = await build()
    world.cloud.answer(httpx.ReadTimeout("no answer"))
    first = await world.orchestrator.route("dm.send", {"to": "ann"}, request_id="client-8")
    again = await world.orchestrator.route("dm.send", {"to": "ann"}, request_id="client-8")
    assert first.outbox_id == again.outbox_id
    assert await world.outbox.depth() == 1


async def test_force_env_cloud_still_falls_back_when_the_cloud_fails(build: Build) -> None:
    # force_env picks where the call goes first; rule 6 still applies when that fails.
    world = await build(local=("research.keyword",))
    world.cloud.answer(status(500))
    envelope = await world.route("research.keyword", {}, "cloud")
    assert envelope.source is Source.LOCAL_FALLBACK


async def test_send_queued_replays_with_the_original_key(build: Build) -> None:
    world = await build()
    world.cloud.answer(status(500))
    queued = await world.route("dm.send", {"to": "ann"})
    (item,) = await world.outbox.pending()
    world.cloud.answer(ok({"sent": True}))
    result = await world.orchestrator.send_queued(item.action, item.params, item.idempotency_key)
    assert result == {"sent": True}
    assert world.cloud.keys == [queued.request_id] * (RETRIES + 2)
    assert world.cloud.requests[-1].read() == b'{"params":{"to":"ann"}}'


async def test_send_queued_raises_while_the_cloud_still_fails(build: Build) -> None:
    world = await build()
    world.cloud.answer(status(503))
    with pytest.raises(CloudUnavailable):
        await world.orchestrator.send_queued("dm.send", {"to": "ann"}, "key-1")
    assert set(world.cloud.keys) == {"key-1"}


# -- the cache fills from the cloud's successes -------------------------------------------------


async def test_a_read_only_cloud_result_fills_the_cache(build: Build) -> None:
    world = await build()
    world.cloud.answer(ok({"rank": 1}))
    await world.route("research.platform", {"q": "x", "page": 2})
    await world.orchestrator.drain()
    entry = await world.cache.get("research.platform", {"page": 2, "q": "x"})
    assert entry is not None
    assert entry.response == {"rank": 1}


async def test_a_side_effect_cloud_result_is_never_cached(build: Build) -> None:
    world = await build()
    await world.route("dm.send", {"to": "ann"})
    await world.orchestrator.drain()
    assert await world.cache.size() == 0


async def test_a_failed_cloud_call_caches_nothing(build: Build) -> None:
    world = await build()
    world.cloud.answer(status(500))
    await world.route("research.platform", {"q": "x"})
    await world.orchestrator.drain()
    assert await world.cache.size() == 0


async def test_a_cached_cloud_result_is_served_when_the_cloud_dies(build: Build) -> None:
    world = await build()
    world.cloud.answer(ok({"rank": 9}))
    first = await world.route("research.platform", {"q": "x"})
    await world.orchestrator.drain()
    world.cloud.answer(httpx.ConnectError("refused"))
    second = await world.route("research.platform", {"q": "x"})
    assert first.source is Source.CLOUD
    assert second.source is Source.CACHE
    assert second.result == {"rank": 9}


async def test_a_cloud_without_the_handler_is_counted_logged_and_said_in_the_detail(
    build: Build, caplog: pytest.LogCaptureFixture
) -> None:
    world = await build(local=("research.keyword",))
    world.cloud.answer(status(404, "unknown_action"))
    with caplog.at_level(logging.WARNING, logger="everreach.orchestrator"):
        first = await world.route("research.keyword", {"keyword": "ai"})
        await world.route("research.keyword", {"keyword": "ml"})
    assert (first.ok, first.source) == (True, Source.LOCAL_FALLBACK)
    assert first.detail is not None and "cloud has no handler for research.keyword" in first.detail
    assert first.to_dict()["detail"] == first.detail
    assert world.orchestrator.cloud_missing_handlers == {"research.keyword": 2}
    assert "cloud has no handler for research.keyword" in caplog.text


async def test_an_ordinary_local_fallback_says_nothing_about_missing_handlers(
    build: Build,
) -> None:
    world = await build(local=("research.keyword",))
    world.cloud.answer(status(503))
    envelope = await world.route("research.keyword", {"keyword": "ai"})
    assert envelope.source is Source.LOCAL_FALLBACK and envelope.detail is None
    assert world.orchestrator.cloud_missing_handlers == {}


async def test_failures_are_counted_by_error_code_whatever_their_source(build: Build) -> None:
    world = await build(local=("widget.spin",))
    await world.route("widget.spin", {})
    await world.route("widget.spin", {}, force_env="nowhere")
    world.cloud.answer(status(404, "unknown_action"))
    await world.route("dm.send", {"to": "ana"})
    counts = world.orchestrator.snapshot()
    assert counts["widget.spin"] == {"local": 1, "invalid_params": 1}
    assert counts["other"] == {"unknown_action": 1}
    assert not any(key.endswith("_error") for row in counts.values() for key in row)


# -- the reservation bounds what a cloud call may cost -----------------------------------------


def refused_at(price_usd: str) -> httpx.Response:
    """The cloud's answer to a Cost-Limit below its price: nothing ran."""
    body = {"ok": False, "error": "cost_limit_exceeded", "detail": "dearer", "price_usd": price_usd}
    return httpx.Response(402, json=body)


def cost_limits(cloud: FakeCloud) -> list[str | None]:
    return [r.headers.get("Cost-Limit") for r in cloud.requests]


async def test_every_cloud_call_carries_its_reservation_as_cost_limit(build: Build) -> None:
    world = await build()
    await world.route("claude.generate", {})
    await world.route("dm.send", {"to": "ann"})
    assert cost_limits(world.cloud) == ["0.01", "0.001"]


async def test_a_dearer_cloud_is_reserved_at_its_price_and_asked_once_more(build: Build) -> None:
    world = await build()
    world.cloud.answer(refused_at("0.05"), ok("r", cost_usd=0.05))
    envelope = await world.route("claude.generate", {})
    assert envelope.ok and envelope.cost_usd == Decimal("0.05")
    assert cost_limits(world.cloud) == ["0.01", "0.05"]
    assert len(set(world.cloud.keys)) == 1  # the same request, asked again
    spent = await world.spent()
    assert (spent["spent_usd"], spent["reserved_usd"], spent["budget_closed"]) == (
        "0.05",
        "0.00",
        False,
    )


async def test_a_price_the_cap_cannot_take_is_cost_cap_reached(build: Build) -> None:
    world = await build(MONTHLY_COST_CAP="0.03", COST_SOFT_CAP="0.03")
    world.cloud.answer(refused_at("0.05"))
    envelope = await world.route("claude.generate", {})
    assert (envelope.error, envelope.http_status) == (ErrorCode.COST_CAP_REACHED, 429)
    assert envelope.cost_guard_triggered
    assert len(world.cloud.requests) == 1
    spent = await world.spent()
    assert (spent["spent_usd"], spent["reserved_usd"]) == ("0.00", "0.00")


async def test_a_cost_above_the_reservation_is_recorded_and_closes_the_budget(
    build: Build, caplog: pytest.LogCaptureFixture
) -> None:
    world = await build()
    world.cloud.answer(ok("r", cost_usd=0.05))  # a cloud that ignores Cost-Limit
    first = await world.route("claude.generate", {})
    assert first.ok and first.cost_usd == Decimal("0.05")
    spent = await world.spent()
    assert spent["spent_usd"] == "0.05" and spent["budget_closed"] is True
    assert spent["overruns"] == [
        {
            "action": "claude.generate",
            "request_id": first.request_id,
            "reserved_usd": "0.01",
            "cost_usd": "0.05",
        }
    ]
    assert "closed" in caplog.text and first.request_id in caplog.text
    second = await world.route("claude.generate", {})
    assert second.error is ErrorCode.COST_CAP_REACHED and "closed" in (second.detail or "")
    assert len(world.cloud.requests) == 1


# -- every way out of a reserved call settles it --------------------------------------------------


JUNK_PARAMS = [
    pytest.param({"x": float("nan")}, id="nan"),
    pytest.param({"x": float("inf")}, id="infinity"),
    pytest.param({"x": "\ud800"}, id="lone-surrogate"),
]


@pytest.mark.parametrize("junk", JUNK_PARAMS)
async def test_params_that_cannot_be_sent_are_invalid_params_and_hold_nothing(
    build: Build, junk: dict[str, Any]
) -> None:
    world = await build()
    envelope = await world.route("claude.generate", junk)
    assert (envelope.error, envelope.http_status) == (ErrorCode.INVALID_PARAMS, 422)
    assert world.cloud.requests == []
    spent = await world.spent()
    assert (spent["spent_usd"], spent["reserved_usd"]) == ("0.00", "0.00")


async def test_three_junk_requests_leave_the_budget_for_a_real_call(build: Build) -> None:
    world = await build(rates={"claude.*": "0.02"}, MONTHLY_COST_CAP="0.05", COST_SOFT_CAP="0.05")
    for junk in ({"x": float("nan")}, {"x": float("-inf")}, {"x": "\udfff"}):
        assert (await world.route("claude.generate", junk)).error is ErrorCode.INVALID_PARAMS
    envelope = await world.route("claude.generate", {"x": 1})
    assert envelope.ok and envelope.source is Source.CLOUD


async def test_an_outbox_replay_of_junk_holds_nothing(build: Build) -> None:
    world = await build()
    with pytest.raises(InvalidParams):
        await world.orchestrator.send_queued("dm.send", {"x": float("nan")}, "key-0001")
    spent = await world.spent()
    assert (spent["spent_usd"], spent["reserved_usd"]) == ("0.00", "0.00")


async def test_a_side_effect_the_cloud_says_may_have_run_is_parked_not_replayed(
    build: Build,
) -> None:
    world = await build(local=("dm.send",))
    world.cloud.answer(status(409, "indeterminate"))
    envelope = await world.route("dm.send", {"to": "ann"})
    assert envelope.queued is True and envelope.http_status == 202
    assert "may have run" in (envelope.detail or "")
    assert world.calls["dm.send"] == 0  # never run locally: it may have run in the cloud
    assert await world.outbox.depth() == 0
    (parked,) = await world.outbox.dead_letters()
    assert parked.id == envelope.outbox_id and parked.status is OutboxStatus.INDETERMINATE
    assert len(world.cloud.requests) == 1  # a definite answer: not retried
