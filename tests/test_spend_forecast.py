"""Tests of spend_forecast.py: the projection, the cap dates, the report and the sparkline."""

from __future__ import annotations

from datetime import date
from decimal import Decimal as D

import pytest

from spend_forecast import day_starts, forecast, report, sparkline


def every_day(usd: str, first: date, last: date) -> list[tuple[date, D]]:
    return [(first.replace(day=n), D(usd)) for n in range(first.day, last.day + 1)]


MARCH_10 = date(2026, 3, 10)


@pytest.mark.parametrize(
    ("daily", "today", "spent", "pace", "projected", "soft_date", "hard_date"),
    [
        # $10 a day: 310 by the 31st, neither cap this month.
        (every_day("10", date(2026, 3, 1), MARCH_10), MARCH_10, "100", "10", "310", None, None),
        # $20 a day: 380 after the 19th, 400 after the 20th.
        (
            every_day("20", date(2026, 3, 1), MARCH_10),
            MARCH_10,
            "200",
            "20",
            "620",
            date(2026, 3, 19),
            date(2026, 3, 20),
        ),
        # Already past both: the days they were crossed.
        (
            every_day("100", date(2026, 3, 1), date(2026, 3, 5)),
            date(2026, 3, 5),
            "500",
            "100",
            "3100",
            date(2026, 3, 4),
            date(2026, 3, 4),
        ),
        # The pace is the last 7 days: an early burst that stopped projects nothing more.
        (
            every_day("50", date(2026, 3, 1), date(2026, 3, 3)),
            MARCH_10,
            "150",
            "0",
            "150",
            None,
            None,
        ),
        # Nothing spent yet.
        ([], date(2026, 2, 1), "0", "0", "0", None, None),
        # Two entries of one day add up; missing days are 0; other months and later days are out.
        (
            [
                (date(2026, 3, 1), D("5")),
                (date(2026, 3, 1), D("5")),
                (date(2026, 3, 3), D("11")),
                (date(2026, 2, 28), D("999")),
                (date(2026, 3, 4), D("999")),
            ],
            date(2026, 3, 3),
            "21",
            "7",
            "217",
            None,
            None,
        ),
        # A leap-year February ends on the 29th.
        (
            every_day("1", date(2028, 2, 1), date(2028, 2, 28)),
            date(2028, 2, 28),
            "28",
            "1",
            "29",
            None,
            None,
        ),
    ],
)
def test_forecast(
    daily: list[tuple[date, D]],
    today: date,
    spent: str,
    pace: str,
    projected: str,
    soft_date: date | None,
    hard_date: date | None,
) -> None:
    result = forecast(daily, today=today, soft_cap_usd=D("380"), hard_cap_usd=D("400"))
    assert result.spent_usd == D(spent)
    assert result.pace_usd_per_day == D(pace)
    assert result.projected_usd == D(projected)
    assert (result.soft_cap_date, result.hard_cap_date) == (soft_date, hard_date)


def test_forecast_keeps_cents_exact() -> None:
    daily = [(date(2026, 3, 1), D("0.10")), (date(2026, 3, 2), D("0.20"))]
    result = forecast(daily, today=date(2026, 3, 2), soft_cap_usd=D(1), hard_cap_usd=D(2))
    assert result.spent_usd == D("0.30")
    assert result.projected_usd == D("4.65")  # 0.30 + 0.15 x 29
    assert result.soft_cap_date == date(2026, 3, 7)  # 0.70 more at 0.15 a day: 5 days
    assert result.as_json()["projected_usd"] == "4.65"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], ""),
        ([0, 0, 0], "▁▁▁"),
        ([1, 2, 3, 4, 5, 6, 7, 8], "▂▃▄▅▅▆▇█"),
        ([0, 8], "▁█"),
        ([D("0.5"), D("1")], "▅█"),
        ([5, 5], "██"),
        ([-1, 2], "▁█"),
    ],
)
def test_sparkline(values: list[float], expected: str) -> None:
    assert sparkline(values) == expected


def test_day_starts_are_local_midnights_across_the_summer_time_change() -> None:
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    starts = day_starts("2026-03", ZoneInfo("America/New_York"))
    assert len(starts) == 32  # the 31 days of March, then 1 April
    assert starts[0] == datetime(2026, 3, 1, 5, tzinfo=UTC)  # EST, UTC-5
    assert starts[8] == datetime(2026, 3, 9, 4, tzinfo=UTC)  # EDT from the 8th, UTC-4
    assert starts[31] == datetime(2026, 4, 1, 4, tzinfo=UTC)
    assert day_starts("2026-02", UTC)[-1] == datetime(2026, 3, 1, tzinfo=UTC)


def test_report_lists_every_day_to_today_and_the_forecast() -> None:
    body = report(
        {2: D("1.5"), 4: D("0.000001"), 20: D("9")},  # the 20th is after today: left out
        today=date(2026, 3, 4),
        soft_cap_usd=D("3"),
        hard_cap_usd=D("400"),
    )
    assert body["daily_usd"] == ["0.00", "1.50", "0.00", "0.000001"]
    assert body["spent_usd"] == "1.500001" and body["pace_days"] == 7
    assert body["soft_cap_date"] == "2026-03-08" and body["hard_cap_date"] is None
