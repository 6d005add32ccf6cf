"""Schedules: the entries of a schedules file, their validation and their triggers.

A schedules file (``SCHEDULES_PATH``, default ``schedules.json``) is a JSON list of
``{"id", "action", "params", "cron" | "interval_sec", "mirror"}``; every instance serves its
list at ``GET /api/schedules`` and a terminal mirrors the cloud's ``mirror: true`` entries.
``interval_sec`` entries fire on multiples of the interval since the Unix epoch, so replicas
started at different times agree on every fire time.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from errors import ConfigError
from service_registry import ACTION_RE

DAILY_ROUTINE_ID = "daily_routine"  # built in; no entry may take this id
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_INTERVAL_SEC = 1.0

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_KEYS = frozenset({"id", "action", "params", "cron", "interval_sec", "mirror"})


@dataclass(frozen=True)
class Schedule:
    """One entry of a schedules file."""

    id: str
    action: str
    params: dict[str, Any]
    cron: str | None
    interval_sec: float | None
    mirror: bool

    def to_dict(self) -> dict[str, Any]:
        """Return the entry as it appears in a schedules file and ``GET /api/schedules``."""
        body: dict[str, Any] = {"id": self.id, "action": self.action, "params": self.params}
        if self.cron is not None:
            body["cron"] = self.cron
        else:
            body["interval_sec"] = self.interval_sec
        body["mirror"] = self.mirror
        return body


def parse_schedules(data: Any, *, source: str) -> list[Schedule]:
    """Validate a decoded schedules list; ``ConfigError`` names the source, entry and reason."""
    if isinstance(data, Mapping) and "schedules" in data:
        data = data["schedules"]
    if not isinstance(data, list):
        raise ConfigError(f"{source}: must be a JSON list of schedules, got {type(data).__name__}")
    schedules: list[Schedule] = []
    seen: set[str] = set()
    for index, entry in enumerate(data):
        schedule = _parse_entry(entry, f"{source}: entry {index}")
        if schedule.id in seen:
            raise ConfigError(f"{source}: entry {index} ({schedule.id!r}): duplicate id")
        seen.add(schedule.id)
        schedules.append(schedule)
    return schedules


def _parse_entry(entry: Any, where: str) -> Schedule:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: must be a JSON object, got {type(entry).__name__}")
    job_id = entry.get("id")
    if not isinstance(job_id, str) or not _ID_RE.match(job_id):
        raise ConfigError(
            f"{where}: 'id' must be 1-64 letters, digits, '_', '.', ':' or '-', got {job_id!r}"
        )
    where = f"{where} ({job_id!r})"
    if job_id == DAILY_ROUTINE_ID:
        raise ConfigError(f"{where}: the id {DAILY_ROUTINE_ID!r} is the built-in daily routine")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
    action = entry.get("action")
    if not isinstance(action, str) or not ACTION_RE.match(action):
        raise ConfigError(f"{where}: 'action' must be 'service.topic', got {action!r}")
    params = entry.get("params", {})
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}: 'params' must be a JSON object, got {type(params).__name__}")
    mirror = entry.get("mirror", False)
    if not isinstance(mirror, bool):
        raise ConfigError(f"{where}: 'mirror' must be true or false, got {mirror!r}")
    cron, interval = entry.get("cron"), entry.get("interval_sec")
    if (cron is None) == (interval is None):
        raise ConfigError(f"{where}: give exactly one of 'cron' and 'interval_sec'")
    if cron is not None:
        if not isinstance(cron, str):
            raise ConfigError(f"{where}: 'cron' must be a string such as '0 6 * * *'")
        try:
            CronTrigger.from_crontab(cron, timezone=UTC)
        except ValueError as exc:
            raise ConfigError(f"{where}: 'cron' {cron!r} is not a 5-field crontab: {exc}") from None
    else:
        if isinstance(interval, bool) or not isinstance(interval, int | float):
            raise ConfigError(f"{where}: 'interval_sec' must be a number, got {interval!r}")
        if not math.isfinite(interval) or interval < MIN_INTERVAL_SEC:
            raise ConfigError(
                f"{where}: 'interval_sec' must be at least {MIN_INTERVAL_SEC:g}, got {interval!r}"
            )
        interval = float(interval)
    return Schedule(job_id, action, dict(params), cron, interval, mirror)


def load_schedules(path: Path) -> list[Schedule]:
    """Read a schedules file; a missing file is an empty list."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"SCHEDULES_PATH {path}: cannot read: {exc}") from None
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        raise ConfigError(f"SCHEDULES_PATH {path}: not valid JSON: {exc}") from None
    return parse_schedules(data, source=f"SCHEDULES_PATH {path}")


# -- triggers --------------------------------------------------------------------------------------


def aligned_interval_trigger(interval_sec: float, tz: tzinfo) -> IntervalTrigger:
    """Fire at every multiple of ``interval_sec`` since the Unix epoch (the same on replicas)."""
    return IntervalTrigger(seconds=interval_sec, start_date=EPOCH, timezone=tz)


def schedule_trigger(schedule: Schedule, tz: tzinfo) -> BaseTrigger:
    if schedule.cron is not None:
        return CronTrigger.from_crontab(schedule.cron, timezone=tz)
    assert schedule.interval_sec is not None
    return aligned_interval_trigger(schedule.interval_sec, tz)
