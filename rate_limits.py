"""Load and look up the rate limits file (``RATE_LIMITS_PATH``): how often an action may run.

Format, keyed by action or by ``service.*`` family::

    {"linkedin.message": {"max": 20, "per_sec": 86400, "min_interval_sec": 90,
                          "jitter_sec": 30, "quiet_hours": "23:00-07:00"},
     "upwork.*": {"max": 10, "per_sec": 60},
     "dm.send": {"max": 3, "per_sec": 5}}

At most ``max`` runs in any sliding window of ``per_sec`` seconds; optionally at least
``min_interval_sec`` plus a random 0..``jitter_sec`` between two runs, and no run inside
``quiet_hours`` (local time in ``EVERREACH_TZ``; ``start-end``, may cross midnight). A family
entry is one budget shared by every action of the family; an exact entry wins over it. A missing
file means no limits; a malformed one raises ``ConfigError`` naming the file, the entry and the
reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo
from pathlib import Path
from typing import Any

from errors import ConfigError

_ENTRY_RE = re.compile(r"^[a-z][a-z0-9_]*\.([a-z][a-z0-9_]*|\*)\Z")
_QUIET_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)\Z")
_FIELDS = frozenset({"max", "per_sec", "min_interval_sec", "jitter_sec", "quiet_hours", "note"})


@dataclass(frozen=True, slots=True)
class QuietHours:
    """A daily span of local time ``[start, end)`` in which no run starts; may cross midnight."""

    start: time
    end: time

    @classmethod
    def parse(cls, text: str) -> QuietHours:
        """Parse ``"HH:MM-HH:MM"``; ``ValueError`` says what is wrong."""
        match = _QUIET_RE.match(text.strip())
        if not match:
            raise ValueError(f'quiet_hours must be "HH:MM-HH:MM" in 24-hour time, got {text!r}')
        h1, m1, h2, m2 = (int(part) for part in match.groups())
        if (h1, m1) == (h2, m2):
            raise ValueError(f"quiet_hours {text!r} starts and ends at the same time")
        return cls(time(h1, m1), time(h2, m2))

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"

    def spans(self, from_s: float, to_s: float, tz: tzinfo) -> list[tuple[float, float]]:
        """Every quiet span ``(start_s, end_s)`` in Unix seconds that overlaps ``[from_s, to_s]``.

        Spans are computed per local date, so they follow daylight-saving changes.
        """
        first = datetime.fromtimestamp(from_s, tz).date() - timedelta(days=1)
        last = datetime.fromtimestamp(to_s, tz).date()
        spans = []
        day: date = first
        while day <= last:
            begin = datetime.combine(day, self.start, tz).timestamp()
            end_day = day if self.end > self.start else day + timedelta(days=1)
            end = datetime.combine(end_day, self.end, tz).timestamp()
            if end > from_s and begin <= to_s:
                spans.append((begin, end))
            day += timedelta(days=1)
        return spans


@dataclass(frozen=True, slots=True)
class RateLimit:
    """One entry of the rate limits file; ``key`` is its name (``dm.send`` or ``upwork.*``)."""

    key: str
    max: int
    per_sec: float
    min_interval_sec: float = 0.0
    jitter_sec: float = 0.0
    quiet_hours: QuietHours | None = None

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"max": self.max, "per_sec": self.per_sec}
        if self.min_interval_sec:
            data["min_interval_sec"] = self.min_interval_sec
        if self.jitter_sec:
            data["jitter_sec"] = self.jitter_sec
        if self.quiet_hours is not None:
            data["quiet_hours"] = str(self.quiet_hours)
        return data


class RateLimits:
    """The exact and family entries of a rate limits file."""

    def __init__(self, limits: Mapping[str, RateLimit], *, source: str = "<memory>") -> None:
        self._exact = {k: v for k, v in limits.items() if not k.endswith(".*")}
        self._family = {k[:-2]: v for k, v in limits.items() if k.endswith(".*")}
        self.source = source

    @classmethod
    def load(cls, path: Path) -> RateLimits:
        """Read and validate ``path``; a missing file is an empty set of limits."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls({}, source=str(path))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"RATE_LIMITS_PATH {path}: cannot read: {exc}") from None
        try:
            raw = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"RATE_LIMITS_PATH {path}: not valid JSON: {exc}") from None
        return cls.from_dict(raw, source=f"RATE_LIMITS_PATH {path}")

    @classmethod
    def from_dict(cls, raw: Any, *, source: str = "<memory>") -> RateLimits:
        """Validate a parsed file; ``ConfigError`` names ``source``, the entry and the reason."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: must be a JSON object keyed by action or 'service.*'")
        limits = {}
        for key, entry in raw.items():
            if not isinstance(key, str) or not _ENTRY_RE.match(key):
                raise ConfigError(
                    f"{source}: entry {key!r}: the name must be 'service.topic' or 'service.*'"
                )
            try:
                limits[key] = _parse_entry(key, entry)
            except ValueError as exc:
                raise ConfigError(f"{source}: entry {key!r}: {exc}") from None
        return cls(limits, source=source)

    def limit_for(self, action: str) -> RateLimit | None:
        """The limit that governs ``action``: its exact entry, else its family's, else None."""
        limit = self._exact.get(action)
        if limit is None:
            service, dot, _ = action.partition(".")
            limit = self._family.get(service) if dot else None
        return limit

    def __iter__(self) -> Iterator[RateLimit]:
        yield from sorted([*self._exact.values(), *self._family.values()], key=lambda r: r.key)

    def __len__(self) -> int:
        return len(self._exact) + len(self._family)


def _number(entry: dict[str, Any], name: str, *, default: float | None = None) -> float:
    value = entry.get(name, default)
    if value is None:
        raise ValueError(f"{name} is required")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return float(value)


def _parse_entry(key: str, entry: Any) -> RateLimit:
    if not isinstance(entry, dict):
        raise ValueError('must be an object such as {"max": 3, "per_sec": 5}')
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(_FIELDS))}")
    count = entry.get("max")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"max must be a whole number of runs, 1 or more, got {count!r}")
    per_sec = _number(entry, "per_sec")
    if per_sec <= 0:
        raise ValueError(f"per_sec must be more than 0 seconds, got {entry['per_sec']!r}")
    quiet = entry.get("quiet_hours")
    if quiet is not None and not isinstance(quiet, str):
        raise ValueError(f'quiet_hours must be a string "HH:MM-HH:MM", got {quiet!r}')
    return RateLimit(
        key=key,
        max=count,
        per_sec=per_sec,
        min_interval_sec=_number(entry, "min_interval_sec", default=0),
        jitter_sec=_number(entry, "jitter_sec", default=0),
        quiet_hours=QuietHours.parse(quiet) if quiet is not None else None,
    )
