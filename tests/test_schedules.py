"""The schedules file: entries, their validation (one table) and their triggers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from errors import ConfigError
from schedules import (
    DAILY_ROUTINE_ID,
    Schedule,
    load_schedules,
    parse_schedules,
    schedule_trigger,
)

pytestmark = pytest.mark.prd200

BERLIN = ZoneInfo("Europe/Berlin")


def entry(**fields: Any) -> dict[str, Any]:
    return {"id": "job", "action": "system.echo", "interval_sec": 60, **fields}


def test_a_valid_list_becomes_schedules_that_write_back_the_same_entries() -> None:
    data = [
        {"id": "nightly", "action": "system.heartbeat", "cron": "30 2 * * *", "mirror": True},
        {"id": "tick", "action": "test.tick", "params": {"n": 1}, "interval_sec": 5},
    ]
    schedules = parse_schedules(data, source="test")
    assert schedules == [
        Schedule("nightly", "system.heartbeat", {}, "30 2 * * *", None, True),
        Schedule("tick", "test.tick", {"n": 1}, None, 5.0, False),
    ]
    assert [s.to_dict() for s in schedules] == [
        {**data[0], "params": {}},
        {**data[1], "mirror": False},
    ]


def test_a_wrapped_list_is_read_like_a_bare_one() -> None:
    wrapped = parse_schedules({"schedules": [entry()]}, source="test")
    assert wrapped == parse_schedules([entry()], source="test")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"not": "a list"}, "must be a JSON list"),
        (["text"], "entry 0: must be a JSON object"),
        ([entry(id="")], "'id' must be 1-64"),
        ([entry(id="has space")], "'id' must be 1-64"),
        ([entry(id="x" * 65)], "'id' must be 1-64"),
        ([entry(id=DAILY_ROUTINE_ID)], "built-in daily routine"),
        ([entry(), entry()], "entry 1 ('job'): duplicate id"),
        ([entry(when="now")], "unknown key(s) ['when']"),
        ([entry(action="noservice")], "'action' must be 'service.topic'"),
        ([entry(params=[1])], "'params' must be a JSON object"),
        ([entry(mirror="yes")], "'mirror' must be true or false"),
        ([entry(cron="0 6 * * *")], "exactly one of 'cron' and 'interval_sec'"),
        ([{"id": "job", "action": "system.echo"}], "exactly one of 'cron' and 'interval_sec'"),
        ([{"id": "j", "action": "system.echo", "cron": 6}], "'cron' must be a string"),
        ([{"id": "j", "action": "system.echo", "cron": "61 * * * *"}], "not a 5-field crontab"),
        ([entry(interval_sec="60")], "'interval_sec' must be a number"),
        ([entry(interval_sec=True)], "'interval_sec' must be a number"),
        ([entry(interval_sec=0.5)], "must be at least 1"),
        ([entry(interval_sec=float("inf"))], "must be at least 1"),
    ],
)
def test_a_bad_entry_is_a_config_error_naming_the_source_and_the_reason(
    data: Any, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_schedules(data, source="SCHEDULES_PATH s.json")
    assert str(caught.value).startswith("SCHEDULES_PATH s.json: ")
    assert message in str(caught.value)


def test_a_missing_or_empty_file_is_no_schedules(tmp_path: Path) -> None:
    assert load_schedules(tmp_path / "absent.json") == []
    (tmp_path / "empty.json").write_text("  \n")
    assert load_schedules(tmp_path / "empty.json") == []


def test_a_file_that_is_not_json_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("[{")
    with pytest.raises(ConfigError, match=r"SCHEDULES_PATH .*broken\.json: not valid JSON"):
        load_schedules(path)


def test_a_file_is_validated_like_a_list(tmp_path: Path) -> None:
    path = tmp_path / "schedules.json"
    path.write_text(json.dumps([entry(), entry()]))
    with pytest.raises(ConfigError, match="duplicate id"):
        load_schedules(path)


def test_a_cron_entry_fires_at_its_wall_clock_time_in_the_zone() -> None:
    schedule = parse_schedules([entry(interval_sec=None, cron="30 2 * * *")], source="t")[0]
    now = datetime(2026, 1, 15, 12, 0, tzinfo=BERLIN)
    fire = schedule_trigger(schedule, BERLIN).get_next_fire_time(None, now)
    assert fire == datetime(2026, 1, 16, 2, 30, tzinfo=BERLIN)
    assert fire.utcoffset() == timedelta(hours=1)


@pytest.mark.parametrize("started", [0, 7, 13])
def test_interval_entries_fire_on_multiples_of_the_interval_since_the_epoch(started: int) -> None:
    """Replicas started at different seconds agree on every fire time."""
    schedule = parse_schedules([entry(interval_sec=10)], source="t")[0]
    now = datetime(2026, 1, 15, 12, 0, started, tzinfo=UTC)
    fire = schedule_trigger(schedule, UTC).get_next_fire_time(None, now)
    assert fire is not None
    assert fire.timestamp() % 10 == 0
    assert now <= fire < now + timedelta(seconds=10)
