"""Spend forecast: where this month's cloud spend is heading, as numbers and a sparkline.

``forecast(daily, today=..., soft_cap_usd=..., hard_cap_usd=...)`` takes the month's spend per day
and projects the month-end total at the current pace (the mean of the last ``pace_days`` days,
today included) and the dates the soft and hard caps would be reached (the status page draws
them in the browser, ``status_forecast.js``); ``sparkline`` is the one-line picture for a
terminal. ``day_starts`` gives the ledger the
instants a month's local days start; ``report`` is the ``cost.forecast`` of ``/status``.
All pure; money is ``Decimal``.
"""

from __future__ import annotations

import calendar
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from cost_reservation import usd as money_text

CENT = Decimal("0.01")
SPARKS = "▁▂▃▄▅▆▇█"
PACE_DAYS = 7


@dataclass(frozen=True, slots=True)
class Forecast:
    """The month so far and where it is heading at the current pace."""

    as_of: date
    month_end: date
    spent_usd: Decimal  # month to date
    pace_usd_per_day: Decimal
    projected_usd: Decimal  # at month end
    soft_cap_usd: Decimal
    hard_cap_usd: Decimal
    soft_cap_date: date | None  # when the soft cap is (or was) reached; None: not this month
    hard_cap_date: date | None

    def as_json(self) -> dict[str, Any]:
        """Dates as ISO text, money as exact decimal text, as everywhere in /status."""

        def day(value: date | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "as_of": self.as_of.isoformat(),
            "month_end": self.month_end.isoformat(),
            "spent_usd": money_text(self.spent_usd),
            "pace_usd_per_day": money_text(self.pace_usd_per_day),
            "projected_usd": money_text(self.projected_usd),
            "soft_cap_usd": money_text(self.soft_cap_usd),
            "hard_cap_usd": money_text(self.hard_cap_usd),
            "soft_cap_date": day(self.soft_cap_date),
            "hard_cap_date": day(self.hard_cap_date),
        }


def month_end(day: date) -> date:
    return day.replace(day=calendar.monthrange(day.year, day.month)[1])


def day_starts(month: str, tz: tzinfo) -> list[datetime]:
    """The UTC instants the days of ``month`` ('YYYY-MM') start in ``tz``, then the next month's.

    Local midnight, as ``month_of`` rolls months over; a day is ``[start n, start n+1)``.
    """
    year, number = (int(part) for part in month.split("-"))
    first = date(year, number, 1)
    days = [first + timedelta(days=n) for n in range(month_end(first).day + 1)]
    return [datetime(d.year, d.month, d.day, tzinfo=tz).astimezone(UTC) for d in days]


def report(
    per_day: Mapping[int, Decimal], *, today: date, soft_cap_usd: Decimal, hard_cap_usd: Decimal
) -> dict[str, Any]:
    """``cost.forecast`` of /status: the forecast and the spend of each day, 1st to ``today``.

    ``per_day`` maps a day of ``today``'s month to its spend (the ledger's ``daily``).
    """
    daily = [(today.replace(day=day), usd) for day, usd in per_day.items() if day <= today.day]
    result = forecast(daily, today=today, soft_cap_usd=soft_cap_usd, hard_cap_usd=hard_cap_usd)
    series = daily_series(daily, today)
    return {
        **result.as_json(),
        "pace_days": PACE_DAYS,
        "daily_usd": [money_text(spend) for spend in series],
    }


def daily_series(daily: Iterable[tuple[date, Decimal]], today: date) -> list[Decimal]:
    """Spend of each day from the 1st to ``today`` (missing days are 0; later ones ignored)."""
    series = [Decimal(0)] * today.day
    for day, usd in daily:
        if (day.year, day.month) == (today.year, today.month) and day <= today:
            series[day.day - 1] += Decimal(usd)
    return series


def _cap_date(
    cap_usd: Decimal, series: Sequence[Decimal], pace: Decimal, today: date, last: date
) -> date | None:
    total = Decimal(0)
    for index, usd in enumerate(series):
        total += usd
        if total >= cap_usd:
            return today.replace(day=index + 1)
    if pace <= 0:
        return None
    days = math.ceil((cap_usd - total) / pace)
    reached = today + timedelta(days=days)
    return reached if reached <= last else None


def forecast(
    daily: Iterable[tuple[date, Decimal]],
    *,
    today: date,
    soft_cap_usd: Decimal,
    hard_cap_usd: Decimal,
    pace_days: int = PACE_DAYS,
) -> Forecast:
    """Project the month from its spend per day up to ``today``."""
    series = daily_series(daily, today)
    spent = sum(series, Decimal(0))
    recent = series[-pace_days:]
    pace = sum(recent, Decimal(0)) / len(recent)
    last = month_end(today)
    projected = spent + pace * (last - today).days
    return Forecast(
        as_of=today,
        month_end=last,
        spent_usd=spent,
        pace_usd_per_day=pace.quantize(CENT, ROUND_HALF_UP),
        projected_usd=projected.quantize(CENT, ROUND_HALF_UP),
        soft_cap_usd=soft_cap_usd,
        hard_cap_usd=hard_cap_usd,
        soft_cap_date=_cap_date(soft_cap_usd, series, pace, today, last),
        hard_cap_date=_cap_date(hard_cap_usd, series, pace, today, last),
    )


def sparkline(values: Sequence[Decimal | float]) -> str:
    """One character per value, ``▁`` (nothing) to ``█`` (the largest)."""
    numbers = [max(0.0, float(v)) for v in values]
    top = max(numbers, default=0.0)
    if top <= 0:
        return SPARKS[0] * len(numbers)
    return "".join(SPARKS[round(n / top * (len(SPARKS) - 1))] for n in numbers)
