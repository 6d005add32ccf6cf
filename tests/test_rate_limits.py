"""Tests of rate_limits.py: the limits file, its validation and the action lookup."""

from __future__ import annotations

import json
from datetime import UTC, datetime, time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from errors import ConfigError
from rate_limits import QuietHours, RateLimit, RateLimits

EXAMPLE = {
    "linkedin.message": {
        "max": 20,
        "per_sec": 86400,
        "min_interval_sec": 90,
        "jitter_sec": 30,
        "quiet_hours": "23:00-07:00",
    },
    "upwork.*": {"max": 10, "per_sec": 60},
    "dm.send": {"max": 3, "per_sec": 5},
}


def test_the_example_file_loads_with_every_field(tmp_path: Path) -> None:
    path = tmp_path / "rate_limits.json"
    path.write_text(json.dumps(EXAMPLE))
    limits = RateLimits.load(path)
    assert len(limits) == 3
    assert limits.limit_for("linkedin.message") == RateLimit(
        "linkedin.message", 20, 86400.0, 90.0, 30.0, QuietHours(time(23), time(7))
    )


def test_a_missing_file_means_no_limits(tmp_path: Path) -> None:
    limits = RateLimits.load(tmp_path / "absent.json")
    assert len(limits) == 0
    assert limits.limit_for("dm.send") is None


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ("dm.send", "dm.send"),
        ("upwork.proposal", "upwork.*"),
        ("upwork.search", "upwork.*"),
        ("linkedin.message", "linkedin.message"),
        ("linkedin.connect", None),
        ("research.keyword", None),
        ("nodot", None),
    ],
)
def test_limit_for_prefers_the_exact_entry_then_the_family(
    action: str, expected: str | None
) -> None:
    limits = RateLimits.from_dict({**EXAMPLE, "dm.*": {"max": 100, "per_sec": 1}})
    found = limits.limit_for(action)
    assert (found.key if found else None) == expected


@pytest.mark.parametrize(
    ("raw", "entry", "reason"),
    [
        ([], None, "JSON object"),
        ({"DM.send": {"max": 1, "per_sec": 1}}, "DM.send", "service.topic"),
        ({"dm.send": 3}, "dm.send", "must be an object"),
        ({"dm.send": {"per_sec": 5}}, "dm.send", "max must be a whole number"),
        ({"dm.send": {"max": 0, "per_sec": 5}}, "dm.send", "1 or more"),
        ({"dm.send": {"max": 2.5, "per_sec": 5}}, "dm.send", "whole number"),
        ({"dm.send": {"max": True, "per_sec": 5}}, "dm.send", "whole number"),
        ({"dm.send": {"max": 3}}, "dm.send", "per_sec is required"),
        ({"dm.send": {"max": 3, "per_sec": 0}}, "dm.send", "more than 0"),
        ({"dm.send": {"max": 3, "per_sec": "5"}}, "dm.send", "per_sec must be a number"),
        ({"dm.send": {"max": 3, "per_sec": 5, "jitter_sec": -1}}, "dm.send", "negative"),
        ({"dm.send": {"max": 3, "per_sec": 5, "per_min": 1}}, "dm.send", "unknown field 'per_min'"),
        ({"dm.send": {"max": 3, "per_sec": 5, "quiet_hours": "23-07"}}, "dm.send", "HH:MM-HH:MM"),
        ({"dm.send": {"max": 3, "per_sec": 5, "quiet_hours": "24:00-07:00"}}, "dm.send", "HH:MM"),
        ({"dm.send": {"max": 3, "per_sec": 5, "quiet_hours": "07:00-07:00"}}, "dm.send", "same"),
        ({"dm.send": {"max": 3, "per_sec": 5, "quiet_hours": 7}}, "dm.send", "string"),
    ],
)
def test_a_malformed_file_names_the_file_the_entry_and_the_reason(
    tmp_path: Path, raw: object, entry: str | None, reason: str
) -> None:
    path = tmp_path / "limits.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as caught:
        RateLimits.load(path)
    message = str(caught.value)
    assert str(path) in message
    if entry is not None:
        assert repr(entry) in message
    assert reason in message


def test_a_file_that_is_not_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "limits.json"
    path.write_text("{max: 3")
    with pytest.raises(ConfigError, match="not valid JSON") as caught:
        RateLimits.load(path)
    assert str(path) in str(caught.value)


BERLIN = ZoneInfo("Europe/Berlin")


def _berlin(year: int, month: int, day: int, hour: int, minute: int) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=BERLIN).timestamp()


@pytest.mark.parametrize(
    ("text", "from_s", "to_s", "expected"),
    [
        # Across midnight: the span that began yesterday and the one that begins tonight.
        (
            "23:00-07:00",
            _berlin(2026, 3, 10, 6, 0),
            _berlin(2026, 3, 11, 12, 0),
            [
                (_berlin(2026, 3, 9, 23, 0), _berlin(2026, 3, 10, 7, 0)),
                (_berlin(2026, 3, 10, 23, 0), _berlin(2026, 3, 11, 7, 0)),
            ],
        ),
        # Within one day.
        (
            "12:00-13:30",
            _berlin(2026, 3, 10, 12, 15),
            _berlin(2026, 3, 10, 12, 20),
            [(_berlin(2026, 3, 10, 12, 0), _berlin(2026, 3, 10, 13, 30))],
        ),
        # The night clocks go forward (29 March 2026): local 23:00 to 07:00 is 7 hours.
        (
            "23:00-07:00",
            _berlin(2026, 3, 29, 0, 30),
            _berlin(2026, 3, 29, 1, 0),
            [(_berlin(2026, 3, 28, 23, 0), _berlin(2026, 3, 29, 7, 0))],
        ),
    ],
)
def test_quiet_hours_spans_follow_local_time(
    text: str, from_s: float, to_s: float, expected: list[tuple[float, float]]
) -> None:
    spans = QuietHours.parse(text).spans(from_s, to_s, BERLIN)
    assert spans == expected
    if text == "23:00-07:00" and len(spans) == 1:
        assert spans[0][1] - spans[0][0] == 7 * 3600


def test_quiet_hours_in_utc() -> None:
    noon = datetime(2026, 1, 1, 12, tzinfo=UTC).timestamp()
    assert QuietHours.parse("12:00-12:30").spans(noon, noon, UTC) == [(noon, noon + 1800)]
