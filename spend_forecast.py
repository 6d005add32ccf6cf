"""Spend forecast: where this month's cloud spend is heading, as numbers and as pictures.

``forecast(daily, today=..., soft_cap_usd=..., hard_cap_usd=...)`` takes the month's spend per day
and projects the month-end total at the current pace (the mean of the last ``pace_days`` days,
today included) and the dates the soft and hard caps would be reached. ``render_svg`` draws it
as a self-contained inline SVG (cumulative spend, the projection dashed, the caps as lines);
``sparkline`` is the one-line picture for a terminal. ``day_starts`` gives the ledger the
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
from xml.sax.saxutils import escape

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


def render_svg(
    daily: Iterable[tuple[date, Decimal]],
    result: Forecast,
    *,
    width: int = 640,
    height: int = 220,
) -> str:
    """An inline SVG: daily bars, cumulative spend, the projection dashed, both caps as lines."""
    series = daily_series(daily, result.as_of)
    days_in_month = result.month_end.day
    pad_left, pad_right, pad_top, pad_bottom = 48, 96, 12, 24
    plot_w = width - pad_left - pad_right
    plot_h = height - pad_top - pad_bottom
    top = float(max(result.hard_cap_usd, result.projected_usd, result.spent_usd, Decimal(1)))
    top *= 1.08

    def x(day: float) -> float:  # day 0 = the start of the 1st, day n = the end of the n-th
        return round(pad_left + plot_w * day / days_in_month, 1)

    def y(usd: Decimal | float) -> float:
        return round(pad_top + plot_h * (1 - float(usd) / top), 1)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" class="spend-forecast" '
        f'font-family="system-ui, sans-serif" '
        f'aria-label="{escape(_summary(result))}">',
        f"<title>{escape(_summary(result))}</title>",
        f'<rect x="{pad_left}" y="{pad_top}" width="{plot_w}" height="{plot_h}" '
        f'fill="none" stroke="#ccc"/>',
    ]
    bar_w = max(1.0, plot_w / days_in_month - 2)
    for index, usd in enumerate(series):
        if usd > 0:
            parts.append(
                f'<rect class="day" x="{x(index) + 1}" y="{y(usd)}" width="{bar_w:.1f}" '
                f'height="{round(y(0) - y(usd), 1)}" fill="#c9d7ea"/>'
            )
    points, total = [f"{x(0)},{y(0)}"], Decimal(0)
    for index, usd in enumerate(series):
        total += usd
        points.append(f"{x(index + 1)},{y(total)}")
    parts.append(
        f'<polyline class="spent" points="{" ".join(points)}" fill="none" '
        f'stroke="#1f5fbf" stroke-width="2"/>'
    )
    parts.append(
        f'<line class="projection" x1="{x(result.as_of.day)}" y1="{y(result.spent_usd)}" '
        f'x2="{x(days_in_month)}" y2="{y(result.projected_usd)}" stroke="#1f5fbf" '
        f'stroke-width="2" stroke-dasharray="6 4"/>'
    )
    # The hard cap's label sits above its line and the soft cap's below: close caps stay legible.
    for name, cap, colour, label_dy in (
        ("soft", result.soft_cap_usd, "#d98c00", 11),
        ("hard", result.hard_cap_usd, "#c62828", -3),
    ):
        parts.append(
            f'<line class="cap {name}" data-usd="{cap}" x1="{pad_left}" y1="{y(cap)}" '
            f'x2="{pad_left + plot_w}" y2="{y(cap)}" stroke="{colour}" stroke-dasharray="3 3"/>'
        )
        parts.append(
            f'<text x="{pad_left + plot_w + 4}" y="{y(cap) + label_dy}" font-size="11" '
            f'fill="{colour}">{name} cap ${cap:,.0f}</text>'
        )
    parts.append(
        f'<text x="{pad_left - 4}" y="{y(0)}" font-size="11" text-anchor="end">$0</text>'
        f'<text x="{x(0)}" y="{height - 6}" font-size="11">1</text>'
        f'<text x="{x(days_in_month)}" y="{height - 6}" font-size="11" '
        f'text-anchor="end">{days_in_month}</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _summary(result: Forecast) -> str:
    text = (
        f"Spent ${result.spent_usd:,.2f} by {result.as_of:%d %b}; "
        f"projected ${result.projected_usd:,.2f} at month end"
    )
    if result.hard_cap_date is not None:
        text += f"; hard cap reached {result.hard_cap_date:%d %b}"
    elif result.soft_cap_date is not None:
        text += f"; soft cap reached {result.soft_cap_date:%d %b}"
    return text
