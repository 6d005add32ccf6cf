"""LocalCron: schedules files, fire-time alignment, the daily routine, mirrored-job gating,
the replica lock on real Redis and the missed-run policy on a real AsyncIOScheduler.

No test sleeps until a fire time: jobs are run directly with a given fire time, or the real
scheduler is handed a job whose next run time is already due."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis

from config.hybrid_config import HybridConfig
from errors import ConfigError
from local_cron import (
    DAILY_ROUTINE_ID,
    DAILY_ROUTINE_STEPS,
    TOPIC_DAILY_ROUTINE,
    JobOutcome,
    LocalCron,
    Schedule,
    aligned_interval_trigger,
    load_schedules,
    lock_key,
)
from sync_bus import SyncBus
from tests.conftest import free_port, until

pytestmark = pytest.mark.prd200

BERLIN = ZoneInfo("Europe/Berlin")
HYBRID = {
    "EVERREACH_ENV": "hybrid",
    "CLOUD_ENDPOINT": "http://127.0.0.1:9",
    "EVERREACH_CLOUD_KEY": "k",
}


class FakeRoute:
    """route() that records its calls; ``fail`` maps an action to 'raise' or 'error'."""

    def __init__(self, fail: dict[str, str] | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail or {}

    async def __call__(self, action: str, params: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((action, params))
        if self.fail.get(action) == "raise":
            raise RuntimeError(f"{action} exploded")
        ok = self.fail.get(action) != "error"
        return {
            "ok": ok,
            "action": action,
            "source": "local",
            "result": {"n": len(self.calls)} if ok else None,
            "error": None if ok else "handler_error",
            "detail": None if ok else "it failed",
            "duration_ms": 1.0,
        }

    def actions(self) -> list[str]:
        return [action for action, _ in self.calls]


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def make_cron(tmp_path: Path) -> AsyncIterator[Callable[..., LocalCron]]:
    """Build LocalCron instances on tmp_path (closed at the end)."""
    made: list[LocalCron] = []

    def make(
        *,
        settings: dict[str, Any] | None = None,
        route: FakeRoute | None = None,
        reachable: bool = True,
        **kwargs: Any,
    ) -> LocalCron:
        config = HybridConfig.from_mapping(
            {
                "DATA_DIR": str(tmp_path / "data"),
                "SCHEDULES_PATH": str(tmp_path / "schedules.json"),
                "EVERREACH_TZ": "Europe/Berlin",
                **(settings or {}),
            }
        )
        kwargs.setdefault("bus", None)
        cron = LocalCron(
            config,
            route=route or FakeRoute(),
            is_cloud_reachable=lambda: reachable,
            instance_id=f"replica-{len(made)}",
            **kwargs,
        )
        made.append(cron)
        return cron

    yield make
    for cron in made:
        await cron.close()


# -- schedules file ------------------------------------------------------------------------------


def test_missing_schedules_file_is_no_schedules(tmp_path: Path) -> None:
    assert load_schedules(tmp_path / "nope.json") == []


def test_schedules_file_round_trips(tmp_path: Path) -> None:
    entries = [
        {"id": "morning", "action": "research.keyword", "params": {"q": "x"}, "cron": "0 6 * * *"},
        {"id": "poll", "action": "dm.conversations", "interval_sec": 60, "mirror": True},
    ]
    path = tmp_path / "schedules.json"
    path.write_text(json.dumps(entries))
    schedules = load_schedules(path)
    assert schedules == [
        Schedule("morning", "research.keyword", {"q": "x"}, "0 6 * * *", None, False),
        Schedule("poll", "dm.conversations", {}, None, 60.0, True),
    ]
    path.write_text(json.dumps([s.to_dict() for s in schedules]))
    assert load_schedules(path) == schedules


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "not valid JSON"),
        ('{"id": "x"}', "must be a JSON list"),
        ('["x"]', "entry 0: must be a JSON object"),
        ('[{"action": "a.b", "cron": "* * * * *"}]', "entry 0: 'id' must be"),
        ('[{"id": "daily_routine", "action": "a.b", "cron": "* * * * *"}]', "built-in"),
        ('[{"id": "j", "action": "Bad", "cron": "* * * * *"}]', "'action' must be"),
        ('[{"id": "j", "action": "a.b"}]', "exactly one of 'cron' and 'interval_sec'"),
        ('[{"id": "j", "action": "a.b", "cron": "* * * * *", "interval_sec": 5}]', "exactly one"),
        ('[{"id": "j", "action": "a.b", "cron": "99 * * * *"}]', "not a 5-field crontab"),
        ('[{"id": "j", "action": "a.b", "cron": "* * *"}]', "not a 5-field crontab"),
        ('[{"id": "j", "action": "a.b", "interval_sec": 0}]', "at least 1"),
        ('[{"id": "j", "action": "a.b", "interval_sec": true}]', "must be a number"),
        ('[{"id": "j", "action": "a.b", "interval_sec": "60"}]', "must be a number"),
        ('[{"id": "j", "action": "a.b", "interval_sec": 5, "params": []}]', "'params' must be"),
        ('[{"id": "j", "action": "a.b", "interval_sec": 5, "mirror": "yes"}]', "'mirror' must"),
        ('[{"id": "j", "action": "a.b", "interval_sec": 5, "every": 1}]', "unknown key(s)"),
        (
            '[{"id": "j", "action": "a.b", "interval_sec": 5},'
            ' {"id": "j", "action": "a.c", "interval_sec": 9}]',
            "entry 1 ('j'): duplicate id",
        ),
    ],
)
def test_malformed_schedules_file_names_file_entry_and_reason(
    tmp_path: Path, content: str, reason: str
) -> None:
    path = tmp_path / "my-schedules.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_schedules(path)
    message = str(info.value)
    assert "my-schedules.json" in message
    assert reason in message


# -- fire times ----------------------------------------------------------------------------------


@pytest.mark.parametrize("interval_sec", [1, 7, 60, 90, 3600, 86400])
@pytest.mark.parametrize(
    "now",
    [
        datetime(2025, 3, 30, 1, 59, 59, 500_000, tzinfo=BERLIN),  # just before a DST change
        datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC),
        datetime(2031, 12, 31, 23, 59, 58, tzinfo=ZoneInfo("Asia/Kolkata")),
    ],
)
def test_interval_jobs_fire_on_multiples_of_the_interval_since_the_epoch(
    interval_sec: int, now: datetime
) -> None:
    fire = aligned_interval_trigger(interval_sec, BERLIN).get_next_fire_time(None, now)
    assert fire is not None
    assert fire.timestamp() % interval_sec == 0
    assert now.timestamp() <= fire.timestamp() < now.timestamp() + interval_sec


def test_replicas_started_at_different_times_agree_on_interval_fire_times() -> None:
    now = datetime(2025, 6, 1, 12, 0, 17, tzinfo=UTC)
    first = aligned_interval_trigger(90, UTC).get_next_fire_time(None, now)
    later = aligned_interval_trigger(90, BERLIN).get_next_fire_time(
        None, now + timedelta(seconds=41)
    )
    assert first == later


async def test_daily_routine_is_scheduled_at_the_configured_time_and_zone(
    make_cron: Callable[..., LocalCron],
) -> None:
    cron = make_cron(settings={"EVERREACH_TZ": "Asia/Tokyo", "DAILY_ROUTINE_TIME": "07:30"})
    await cron.start()
    [job] = [j for j in cron.snapshot()["jobs"] if j["id"] == DAILY_ROUTINE_ID]
    next_run = datetime.fromisoformat(job["next_run_time"])
    assert (next_run.hour, next_run.minute, next_run.second) == (7, 30, 0)
    assert next_run.utcoffset() == timedelta(hours=9)
    assert next_run > datetime.now(UTC)


# -- the daily routine ---------------------------------------------------------------------------


async def test_daily_routine_runs_every_step_even_when_some_fail(
    make_cron: Callable[..., LocalCron], tmp_path: Path
) -> None:
    bus = SyncBus(
        redis_url=None, sqlite_path=tmp_path / "bus.db", consumer_name="t", poll_interval_s=0.02
    )
    published: list[dict[str, Any]] = []

    async def collect(payload: dict[str, Any]) -> None:
        published.append(payload)

    bus.subscribe(TOPIC_DAILY_ROUTINE, collect)
    await bus.start()
    try:
        route = FakeRoute(fail={"feedback.twitter_cycle": "raise", "revenue.dashboard": "error"})
        cron = make_cron(route=route, bus=bus)
        result = await cron.daily_routine()
        await until(lambda: len(published) == 1, what="routine result on the bus")
    finally:
        await bus.close()
    assert route.actions() == list(DAILY_ROUTINE_STEPS)
    assert DAILY_ROUTINE_STEPS[0] == DAILY_ROUTINE_STEPS[-1] == "system.heartbeat"
    assert [step["ok"] for step in result["steps"]] == [True, False, False, True]
    assert result["steps"][1]["error"] == "handler_error"
    assert "exploded" in result["steps"][1]["detail"]
    assert result["ok"] is False
    assert published[0] == result
    assert cron.snapshot()["daily_routine"] == result


# -- mirrored schedules --------------------------------------------------------------------------

CLOUD_LIST: list[dict[str, Any]] = [
    {"id": "outreach", "action": "dm.process_outreach", "interval_sec": 300, "mirror": True},
    {"id": "cloud-only", "action": "research.keyword", "cron": "0 * * * *"},
]


@pytest.mark.parametrize(
    ("settings", "reachable", "expected"),
    [
        (HYBRID, True, JobOutcome.SKIPPED_CLOUD_REACHABLE),
        (HYBRID, False, JobOutcome.RAN),
        ({"EVERREACH_ENV": "local"}, True, JobOutcome.RAN),
        ({"EVERREACH_ENV": "local"}, False, JobOutcome.RAN),
    ],
)
async def test_mirrored_job_fires_here_only_when_the_cloud_cannot(
    make_cron: Callable[..., LocalCron],
    settings: dict[str, Any],
    reachable: bool,
    expected: JobOutcome,
) -> None:
    async def fetch() -> list[dict[str, Any]]:
        return CLOUD_LIST

    route = FakeRoute()
    cron = make_cron(
        settings=settings, route=route, reachable=reachable, fetch_cloud_schedules=fetch
    )
    assert await cron.refresh_mirrored() == 1
    record = await cron.run_job("cloud:outreach")
    assert record["outcome"] == expected.value
    assert route.actions() == (["dm.process_outreach"] if expected is JobOutcome.RAN else [])


async def test_own_schedules_fire_even_while_the_cloud_is_reachable(
    make_cron: Callable[..., LocalCron], tmp_path: Path
) -> None:
    entry = {"id": "mine", "action": "content.generate", "interval_sec": 60, "mirror": True}
    (tmp_path / "schedules.json").write_text(json.dumps([entry]))
    route = FakeRoute()
    cron = make_cron(settings=HYBRID, route=route, reachable=True)
    await cron.start()
    record = await cron.run_job("mine")
    assert record["outcome"] == "ran" and route.actions() == ["content.generate"]


async def test_cloud_instance_never_runs_mirrored_jobs(
    make_cron: Callable[..., LocalCron],
) -> None:
    async def fetch() -> list[dict[str, Any]]:
        return CLOUD_LIST

    cron = make_cron(settings={"EVERREACH_ENV": "cloud"}, fetch_cloud_schedules=fetch)
    assert cron.mirroring is False
    await cron.refresh_mirrored()
    assert (await cron.run_job("cloud:outreach"))["outcome"] == "skipped_cloud_instance"


async def test_mirror_follows_the_cloud_and_survives_an_offline_restart(
    make_cron: Callable[..., LocalCron],
) -> None:
    cloud: list[dict[str, Any]] = list(CLOUD_LIST)
    cloud_up = True

    async def fetch() -> list[dict[str, Any]]:
        if not cloud_up:
            raise ConnectionError("cloud unreachable")
        return cloud

    first = make_cron(settings=HYBRID, fetch_cloud_schedules=fetch)
    await first.start()
    await until(lambda: first.snapshot()["mirror"]["count"] == 1, what="first mirror")
    ids = {job["id"] for job in first.snapshot()["jobs"]}
    assert ids == {DAILY_ROUTINE_ID, "cloud:outreach"}

    cloud.append(
        {"id": "digest", "action": "feedback.analysis", "cron": "30 5 * * *", "mirror": True}
    )
    cloud.pop(0)
    await first.refresh_mirrored()
    ids = {job["id"] for job in first.snapshot()["jobs"]}
    assert ids == {DAILY_ROUTINE_ID, "cloud:digest"}
    await first.close()

    cloud_up = False
    second = make_cron(settings=HYBRID, fetch_cloud_schedules=fetch, reachable=False)
    await second.start()
    await until(lambda: second.snapshot()["mirror"]["last_error"] is not None, what="fetch fail")
    snapshot = second.snapshot()
    assert {job["id"] for job in snapshot["jobs"]} == {DAILY_ROUTINE_ID, "cloud:digest"}
    assert "cloud unreachable" in snapshot["mirror"]["last_error"]
    [digest] = [job for job in snapshot["jobs"] if job["id"] == "cloud:digest"]
    assert datetime.fromisoformat(digest["next_run_time"]).time().isoformat() == "05:30:00"


async def test_malformed_own_schedules_stop_start_up(
    make_cron: Callable[..., LocalCron], tmp_path: Path
) -> None:
    (tmp_path / "schedules.json").write_text('[{"id": "x", "action": "a.b"}]')
    with pytest.raises(ConfigError, match=r"schedules\.json"):
        await make_cron().start()


# -- replicas ------------------------------------------------------------------------------------

FIRE = datetime(2025, 6, 2, 6, 0, tzinfo=BERLIN)


@pytest.mark.redis
async def test_two_replicas_sharing_redis_run_the_daily_routine_once_per_fire_time(
    make_cron: Callable[..., LocalCron], redis_url: str
) -> None:
    routes = [FakeRoute(), FakeRoute()]
    replicas = [make_cron(route=route, redis_url=redis_url) for route in routes]
    for replica in replicas:
        await replica.start()
    records = await asyncio.gather(
        *(replica.run_job(DAILY_ROUTINE_ID, fire_time=FIRE) for replica in replicas)
    )
    assert sorted(r["outcome"] for r in records) == ["ran", "skipped_other_replica"]
    assert sum(len(route.calls) for route in routes) == len(DAILY_ROUTINE_STEPS)
    ttl_ms = redis.Redis.from_url(redis_url).pttl(lock_key(DAILY_ROUTINE_ID, FIRE))
    assert 12 * 3600 * 1000 < ttl_ms <= (12 * 3600 + 60) * 1000

    tomorrow = await replicas[1].run_job(DAILY_ROUTINE_ID, fire_time=FIRE + timedelta(days=1))
    assert tomorrow["outcome"] == "ran"


@pytest.mark.redis
async def test_two_running_schedulers_fire_a_due_job_once(
    make_cron: Callable[..., LocalCron], redis_url: str
) -> None:
    routes = [FakeRoute(), FakeRoute()]
    replicas = [make_cron(route=route, redis_url=redis_url) for route in routes]
    due = datetime.now(BERLIN).replace(microsecond=0)
    for replica in replicas:
        await replica.start()
    for replica in replicas:
        assert replica._scheduler is not None
        replica._scheduler.modify_job(DAILY_ROUTINE_ID, next_run_time=due)

    def outcomes() -> list[str | None]:
        return [
            next(j for j in r.snapshot()["jobs"] if j["id"] == DAILY_ROUTINE_ID)["last_outcome"]
            for r in replicas
        ]

    await until(lambda: None not in outcomes(), what="both schedulers fired")
    assert sorted(o or "" for o in outcomes()) == ["ran", "skipped_other_replica"]
    assert sum(len(route.calls) for route in routes) == len(DAILY_ROUTINE_STEPS)


async def test_without_redis_a_single_instance_fires_alone(
    make_cron: Callable[..., LocalCron],
) -> None:
    route = FakeRoute()
    cron = make_cron(route=route)
    await cron.start()
    assert (await cron.run_job(DAILY_ROUTINE_ID, fire_time=FIRE))["outcome"] == "ran"
    assert cron.snapshot()["replica_lock"].startswith("none")


async def test_unreachable_lock_store_fails_open(make_cron: Callable[..., LocalCron]) -> None:
    route = FakeRoute()
    cron = make_cron(route=route, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    await cron.start()
    assert (await cron.run_job(DAILY_ROUTINE_ID, fire_time=FIRE))["outcome"] == "ran"
    assert len(route.calls) == len(DAILY_ROUTINE_STEPS)


async def test_direct_run_uses_the_interval_slot_of_the_fake_clock(
    make_cron: Callable[..., LocalCron], tmp_path: Path
) -> None:
    (tmp_path / "schedules.json").write_text(
        json.dumps([{"id": "tick", "action": "system.echo", "interval_sec": 600}])
    )
    clock = FakeClock(datetime(2025, 6, 2, 6, 17, 42, tzinfo=BERLIN))
    cron = make_cron(clock=clock)
    await cron.start()
    record = await cron.run_job("tick")
    assert datetime.fromisoformat(record["fire_time"]) == datetime(2025, 6, 2, 6, 10, tzinfo=BERLIN)
    job = next(j for j in cron.snapshot()["jobs"] if j["id"] == "tick")
    assert job["last_run_at"] == clock.now.isoformat() and job["runs"] == 1


# -- missed runs ---------------------------------------------------------------------------------


async def routine_overdue(
    make_cron: Callable[..., LocalCron], overdue: timedelta
) -> tuple[LocalCron, FakeRoute, datetime]:
    """Start a scheduler whose routine was due ``overdue`` ago, as after a sleeping machine.

    The routine time is set an hour ahead, so its last regular fire time (23 h ago) is older
    than the injected one and only that one is due.
    """
    route = FakeRoute()
    routine_time = (datetime.now(BERLIN) + timedelta(hours=1)).strftime("%H:%M")
    cron = make_cron(route=route, settings={"DAILY_ROUTINE_TIME": routine_time})
    await cron.start()
    assert cron._scheduler is not None
    due = datetime.now(BERLIN) - overdue
    cron._scheduler.modify_job(DAILY_ROUTINE_ID, next_run_time=due)
    return cron, route, due


async def test_routine_missed_within_grace_runs_once_on_wake(
    make_cron: Callable[..., LocalCron],
) -> None:
    cron, route, slept_through = await routine_overdue(make_cron, timedelta(hours=2))
    await until(lambda: len(route.calls) == len(DAILY_ROUTINE_STEPS), what="catch-up run")
    job = next(j for j in cron.snapshot()["jobs"] if j["id"] == DAILY_ROUTINE_ID)
    assert job["last_outcome"] == "ran" and job["runs"] == 1
    assert datetime.fromisoformat(job["last_fire_time"]) == slept_through
    assert datetime.fromisoformat(job["next_run_time"]) > datetime.now(UTC)


async def test_routine_missed_beyond_grace_is_skipped_and_counted(
    make_cron: Callable[..., LocalCron],
) -> None:
    cron, route, _due = await routine_overdue(make_cron, timedelta(hours=13))
    job: dict[str, Any] = {}

    def missed() -> bool:
        job.update(next(j for j in cron.snapshot()["jobs"] if j["id"] == DAILY_ROUTINE_ID))
        return bool(job["missed"])

    await until(missed, what="the miss to be recorded")
    assert route.calls == [] and job["last_outcome"] == "missed" and job["runs"] == 0


async def test_many_missed_interval_runs_coalesce_into_one(
    make_cron: Callable[..., LocalCron], tmp_path: Path
) -> None:
    (tmp_path / "schedules.json").write_text(
        json.dumps([{"id": "tick", "action": "system.echo", "interval_sec": 60}])
    )
    route = FakeRoute()
    cron = make_cron(route=route)
    await cron.start()
    assert cron._scheduler is not None
    slot = (int(time.time()) // 60 - 10) * 60  # ten slots ago: the machine slept 10 minutes
    cron._scheduler.modify_job("tick", next_run_time=datetime.fromtimestamp(slot, BERLIN))
    await until(lambda: len(route.calls) >= 1, what="the coalesced run")
    await asyncio.sleep(0)  # let a second (wrong) run start, if the scheduler made one
    job = next(j for j in cron.snapshot()["jobs"] if j["id"] == "tick")
    assert route.actions() == ["system.echo"] and job["runs"] == 1
    assert job["missed"] == 0 and job["skips"] == 0  # not ten runs, nine of them missed
    next_run = datetime.fromisoformat(job["next_run_time"])
    assert next_run.timestamp() % 60 == 0 and next_run > datetime.now(UTC)


async def test_close_is_idempotent_and_cancels_a_running_job(
    make_cron: Callable[..., LocalCron],
) -> None:
    started = asyncio.Event()

    class Hanging(FakeRoute):
        async def __call__(self, action: str, params: dict[str, Any]) -> dict[str, Any]:
            started.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    cron = make_cron(route=Hanging())
    await cron.start()
    assert cron._scheduler is not None
    cron._scheduler.modify_job(DAILY_ROUTINE_ID, next_run_time=datetime.now(BERLIN))
    await asyncio.wait_for(started.wait(), timeout=10)
    await cron.close()
    await cron.close()
    assert cron.snapshot()["running"] is False
