"""schedule_mirror: fetch the cloud's schedules, hand over and cache the mirrored ones."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from errors import ConfigError
from schedule_mirror import ScheduleMirror
from schedules import Schedule
from tests.conftest import until

NOW = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)

CLOUD = [
    {"id": "m1", "action": "system.heartbeat", "interval_sec": 60, "mirror": True},
    {"id": "c1", "action": "system.echo", "cron": "0 6 * * *", "mirror": False},
    {
        "id": "m2",
        "action": "system.echo",
        "params": {"a": 1},
        "cron": "*/5 * * * *",
        "mirror": True,
    },
    {"id": "c2", "action": "system.echo", "interval_sec": 30},
]


class Harness:
    def __init__(self, tmp_path: Path, replies: list[Any] | None = None) -> None:
        self.replies = list(replies or [CLOUD])
        self.applied: list[list[Schedule]] = []
        self.fetches = 0
        self.cache = tmp_path / "data" / "mirrored_schedules.json"
        self.mirror = ScheduleMirror(
            fetch=self.fetch,
            apply=self.applied.append,
            cache_path=self.cache,
            clock=lambda: NOW,
            interval_s=0.01,
        )

    async def fetch(self) -> list[dict[str, Any]]:
        self.fetches += 1
        reply = self.replies[min(self.fetches - 1, len(self.replies) - 1)]
        if isinstance(reply, Exception):
            raise reply
        return reply  # type: ignore[no-any-return]


def _ids(schedules: list[Schedule]) -> list[str]:
    return [s.id for s in schedules]


async def test_refresh_hands_over_and_caches_only_mirrored_schedules(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    assert await h.mirror.refresh() == 2
    assert [_ids(a) for a in h.applied] == [["m1", "m2"]]
    assert h.mirror.refreshed_at == NOW and h.mirror.last_error is None
    cached = json.loads(h.cache.read_text(encoding="utf-8"))
    assert [e["id"] for e in cached] == ["m1", "m2"]
    assert cached[1] == {
        "id": "m2",
        "action": "system.echo",
        "params": {"a": 1},
        "cron": "*/5 * * * *",
        "mirror": True,
    }
    assert list(h.cache.parent.glob("*.tmp")) == []  # the temporary file was renamed


async def test_a_restart_offline_loads_what_was_mirrored_last(tmp_path: Path) -> None:
    await Harness(tmp_path).mirror.refresh()
    restarted = Harness(tmp_path, [ConnectionError("offline")])
    await restarted.mirror.load_cached()
    assert [_ids(a) for a in restarted.applied] == [["m1", "m2"]]
    assert restarted.fetches == 0


async def test_no_cache_yet_hands_over_an_empty_list(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    await h.mirror.load_cached()
    assert h.applied == [[]]


@pytest.mark.parametrize(
    "text",
    ["{not json", '{"schedules": 5}', '[{"id": "x", "action": "Bad", "interval_sec": 1}]'],
)
async def test_an_unreadable_cache_is_ignored_with_a_warning(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(tmp_path)
    h.cache.parent.mkdir(parents=True)
    h.cache.write_text(text, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="local_cron"):
        await h.mirror.load_cached()
    assert h.applied == [[]]
    assert any("ignoring the mirrored-schedules cache" in r.getMessage() for r in caplog.records)


async def test_a_bad_cloud_list_raises_and_keeps_the_old_cache(tmp_path: Path) -> None:
    h = Harness(tmp_path, [CLOUD, [{"id": "x", "action": "system.echo"}]])
    await h.mirror.refresh()
    before = h.cache.read_text(encoding="utf-8")
    with pytest.raises(ConfigError, match="cloud schedules"):
        await h.mirror.refresh()
    assert h.cache.read_text(encoding="utf-8") == before
    assert len(h.applied) == 1  # nothing handed over from the bad list


async def test_an_empty_mirrored_list_empties_the_cache(tmp_path: Path) -> None:
    h = Harness(tmp_path, [CLOUD, []])
    await h.mirror.refresh()
    assert await h.mirror.refresh() == 0
    assert json.loads(h.cache.read_text(encoding="utf-8")) == []
    assert h.applied[-1] == []


async def test_refreshes_run_one_at_a_time_so_an_older_list_never_wins(tmp_path: Path) -> None:
    release_first = asyncio.Event()
    calls = 0
    applied: list[list[str]] = []

    async def fetch() -> list[dict[str, Any]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await release_first.wait()
            return [CLOUD[0]]  # the older answer, slow to arrive
        return [CLOUD[2]]

    mirror = ScheduleMirror(
        fetch=fetch,
        apply=lambda s: applied.append(_ids(s)),
        cache_path=tmp_path / "m.json",
        clock=lambda: NOW,
        interval_s=60,
    )
    first = asyncio.create_task(mirror.refresh())
    await until(lambda: calls == 1, what="the first fetch to start")
    second = asyncio.create_task(mirror.refresh())
    for _ in range(20):
        await asyncio.sleep(0)
    assert calls == 1  # the second refresh waits for the first
    release_first.set()
    await asyncio.gather(first, second)
    assert applied == [["m1"], ["m2"]]
    assert [e["id"] for e in json.loads((tmp_path / "m.json").read_text())] == ["m2"]


async def test_run_keeps_the_error_for_status_logs_once_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(tmp_path, [ConnectionError("offline"), ConnectionError("offline"), CLOUD])
    seen_errors: list[str | None] = []
    with caplog.at_level(logging.WARNING, logger="local_cron"):
        task = asyncio.create_task(h.mirror.run())
        await until(lambda: h.fetches >= 1 and h.mirror.last_error is not None, what="an error")
        seen_errors.append(h.mirror.last_error)
        await until(lambda: h.mirror.refreshed_at is not None, what="a successful refresh")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert seen_errors == ["ConnectionError: offline"]
    assert h.mirror.last_error is None
    assert h.fetches >= 3
    warnings = [
        r.getMessage() for r in caplog.records if "cannot refresh the cloud" in r.getMessage()
    ]
    assert warnings == ["LocalCron: cannot refresh the cloud's schedules: offline"]
    assert _ids(h.applied[-1]) == ["m1", "m2"]
