"""Terminal views of the command line: a ``/status`` body (or the route table) in, rich out.

Pure functions, no I/O. Server strings are plain ``str`` cells on a console with markup off, so
text such as ``[bold]`` in an error message is shown as written, never interpreted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

SOURCES = ("local", "cloud", "local_fallback", "cache", "outbox")


def _kv(title: str, pairs: Sequence[tuple[str, RenderableType]]) -> Table:
    table = Table(
        title=title, title_justify="left", show_header=False, box=None, padding=(0, 2, 0, 0)
    )
    table.add_column(style="dim")
    table.add_column()
    for key, value in pairs:
        table.add_row(key, value)
    return table


def _usd(value: Any) -> str:
    return "-" if value is None else f"${value}"


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _duration(seconds: float) -> str:
    left, parts = round(abs(seconds)), []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if left >= size:
            parts.append(f"{left // size} {unit}")
            left %= size
    if len(parts) < 2 and (left or not parts):
        parts.append(f"{left} s")
    return " ".join(parts[:2])


def _when(iso: Any, now: datetime | None = None) -> str:
    """A past time as ``42 s ago``; a future one (a next run) as its time and ``(in 1 h)``."""
    if not iso:
        return "-"
    try:
        at = datetime.fromisoformat(str(iso))
    except ValueError:
        return str(iso)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    delta = (at - (now or datetime.now(UTC))).total_seconds()
    if delta < 0:
        return f"{_duration(delta)} ago"
    return f"{at.isoformat(timespec='seconds')} (in {_duration(delta)})"


def short_id(value: Any, keep: int = 8) -> str:
    """The first characters of a long id (``3f2a9c1e…``): enough to tell rows apart."""
    text = str(value)
    return text if len(text) <= keep + 2 else text[:keep] + "…"


def cost_bar(spent: float, soft: float, hard: float, *, width: int = 40, style: str = "") -> Text:
    """``█████░░░░|░`` : spend against the hard cap, with ``|`` where the soft cap is."""
    filled = round(width * min(spent / hard, 1.0)) if hard > 0 else (width if spent > 0 else 0)
    soft_at = round(width * min(soft / hard, 1.0)) if hard > 0 else width
    cells = ["█" if i < filled else "░" for i in range(width)]
    if 0 < soft_at < width:
        cells[soft_at] = "|"
    percent = f" {100 * spent / hard:.1f}% of the hard cap" if hard > 0 else ""
    return Text("".join(cells), style=style) + Text(percent)


def _cost_table(cost: Mapping[str, Any]) -> Table:
    spent, hard = _num(cost.get("spent_usd")), _num(cost.get("hard_cap_usd"))
    if cost.get("hard_cap_reached"):
        state, style = "hard cap reached: no cloud calls until next month", "red"
    elif cost.get("soft_cap_reached"):
        state, style = "soft cap reached: work with a local handler runs locally", "yellow"
    else:
        state, style = "under the soft cap", "green"
    bar = cost_bar(spent, _num(cost.get("soft_cap_usd")), hard, style=style)
    pairs: list[tuple[str, RenderableType]] = [
        ("spent", Text(f"{_usd(cost.get('spent_usd'))} of {_usd(cost.get('hard_cap_usd'))}")),
        ("", bar),
        ("reserved", _usd(cost.get("reserved_usd"))),
        ("remaining", _usd(cost.get("remaining_usd"))),
        ("soft cap", _usd(cost.get("soft_cap_usd"))),
        ("hard cap", _usd(cost.get("hard_cap_usd"))),
        ("state", Text(state, style=style)),
        (
            "ledger",
            f"{cost.get('store', '-')}"
            + ("" if cost.get("healthy", True) else f" (unhealthy: {cost.get('error')})"),
        ),
    ]
    month = f"{cost.get('month', '?')}, {cost.get('timezone', 'UTC')}"
    return _kv(f"Cost this month ({month})", pairs)


def _counts_table(counts: Mapping[str, Any]) -> RenderableType:
    if not counts:
        return Text("Dispatches: none yet.")
    seen = {key for row in counts.values() if isinstance(row, dict) for key in row}
    failures = sorted(seen - set(SOURCES))  # failures are counted by error code
    columns = [k for k in SOURCES if k in seen] + failures
    table = Table(
        title="Dispatches by source" + (", failures (✗) by error code" if failures else ""),
        title_justify="left",
    )
    table.add_column("action")
    for column in columns:
        failed = column in failures
        table.add_column(
            ("✗ " if failed else "") + column.replace("_", " "),
            justify="right",
            style="red" if failed else "",
        )
    table.add_column("total", justify="right")
    for action in sorted(counts):
        row = counts[action] if isinstance(counts[action], dict) else {}
        table.add_row(
            action,
            *(str(row.get(k, "")) for k in columns),
            str(sum(int(_num(row.get(k))) for k in columns)),
        )
    return table


def status_view(status: Mapping[str, Any], now: datetime | None = None) -> list[RenderableType]:
    """Tables of a /status body: env, online, cost vs caps, counts, circuits, outbox, rate
    limits, the last alerts, jobs."""
    env = str(status.get("env", "?"))
    if status.get("connectivity"):
        online = "cloud online" if status.get("online") else "cloud offline"
    else:
        online = "serving as the cloud" if env == "cloud" else "no cloud configured"
    head = (
        f"EverReach  env {env} · {online}"
        + (" · OFFLINE_MODE" if status.get("offline_mode") else "")
        + f" · v{status.get('version', '?')} · up {_duration(_num(status.get('uptime_sec')))}"
    )
    parts: list[RenderableType] = [Text(head, style="bold")]
    parts.extend(_warnings(status))
    parts.append(_cost_table(status.get("cost") or {}))
    parts.append(_counts_table(status.get("dispatch_counts") or {}))
    circuits = status.get("circuits") or {}
    circuit_rows: list[tuple[str, RenderableType]] = [
        ("cloud", str(circuits.get("cloud") or "not configured"))
    ]
    local = circuits.get("local") or {}
    circuit_rows += [(f"local {action}", str(state)) for action, state in sorted(local.items())]
    if not local:
        circuit_rows.append(("local", "every handler closed"))
    parts.append(_kv("Circuits", circuit_rows))
    parts.extend(outbox_view(status, now))
    parts.extend(rate_limits_view(status.get("rate_limits"), now))
    parts.extend(alerts_view(status.get("alerts"), now))
    parts.append(_jobs_table(status.get("scheduler"), now))
    bus = status.get("bus") or {}
    cache = status.get("cache") or {}
    parts.append(
        _kv(
            "Bus and cache",
            [
                ("bus backend", str(bus.get("backend", "?"))),
                ("bus backlog", str(bus.get("backlog", 0))),
                ("cache entries", str(cache.get("entries", 0))),
            ],
        )
    )
    return parts


def _warnings(status: Mapping[str, Any]) -> list[RenderableType]:
    """Lines about set-up mistakes: a shared DATA_DIR, actions the cloud has no handler for."""
    lines: list[RenderableType] = []
    holder = status.get("data_dir_shared_with")
    if isinstance(holder, dict):
        lines.append(
            Text(
                f"! DATA_DIR is also used by the live instance pid {holder.get('pid')} "
                f"(port {holder.get('port')}): give each instance its own DATA_DIR",
                style="yellow",
            )
        )
    missing = status.get("cloud_missing_handlers") or {}
    if isinstance(missing, dict) and missing:
        names = ", ".join(
            f"{action} ({count} call{'' if count == 1 else 's'})"
            for action, count in sorted(missing.items())
        )
        lines.append(
            Text(
                f"! the cloud has no handler for {names}; they ran here instead",
                style="yellow",
            )
        )
    return lines


def _jobs_table(scheduler: Any, now: datetime | None) -> RenderableType:
    if not isinstance(scheduler, dict):
        return Text("Jobs: the scheduler is not running.")
    table = Table(title=f"Jobs ({scheduler.get('timezone', '?')})", title_justify="left")
    for column in ("job", "action", "trigger", "next run", "runs", "last"):
        table.add_column(column, justify="right" if column == "runs" else "left")
    for job in scheduler.get("jobs") or []:
        table.add_row(
            str(job.get("id")) + (" (mirrored)" if job.get("mirrored") else ""),
            str(job.get("action")),
            str(job.get("trigger")),
            _when(job.get("next_run_time"), now),
            str(job.get("runs", 0)),
            str(job.get("last_outcome") or "-"),
        )
    return table


ALERTS_SHOWN = 5


def alerts_view(alerts: Any, now: datetime | None = None) -> list[RenderableType]:
    """The last alerts, newest first, with how each was delivered, and the last failure."""
    if not isinstance(alerts, dict) or not alerts.get("events"):
        return []
    sinks = " and ".join(str(sink) for sink in alerts.get("sinks") or []) or "no sink: recorded"
    table = Table(title=f"Alerts (to {sinks})", title_justify="left")
    for column in ("when", "event", "delivery", "detail"):
        table.add_column(column, no_wrap=column != "detail", overflow="fold")
    for event in alerts["events"][:ALERTS_SHOWN]:
        table.add_row(
            _when(event.get("at"), now),
            str(event.get("event")),
            str(event.get("status")),
            str(event.get("detail")),
        )
    failures = alerts.get("failures") or []
    if failures:
        last = failures[0]
        table.caption = (
            f"{len(failures)} delivery failed; the last: {last.get('event')} to the "
            f"{last.get('sink')}: {last.get('error')}"
        )
    return [table]


def rate_limits_view(pacing: Any, now: datetime | None = None) -> list[RenderableType]:
    """Each pacing limit: used / max in its window, next free slot, deferred items, backlog."""
    if not isinstance(pacing, dict) or not pacing.get("limits"):
        return []
    table = Table(title=f"Rate limits ({pacing.get('store', '?')} store)", title_justify="left")
    for column in ("limit", "used / max", "window", "next free", "deferred", "backlog"):
        table.add_column(column, justify="left" if column in ("limit", "next free") else "right")
    for limit in pacing["limits"]:
        up = limit.get("available", True)
        table.add_row(
            str(limit.get("key")),
            f"{limit.get('used', 0)} / {limit.get('max', '?')}" if up else "store down",
            _duration(_num(limit.get("per_sec"))),
            _when(limit.get("next_free_at"), now) if limit.get("next_free_at") else "now",
            str(limit.get("deferred", 0)),
            _duration(_num(limit.get("backlog_s"))),
        )
    return [table]


def outbox_view(status: Mapping[str, Any], now: datetime | None = None) -> list[RenderableType]:
    """The outbox: pending depth, the items waiting for their time (with the ids to cancel
    them by), dead letters and their errors."""
    outbox = status.get("outbox") or {}
    parts: list[RenderableType] = [
        _kv(
            "Outbox",
            [
                ("pending", str(outbox.get("depth", 0))),
                ("waiting for their time", str(outbox.get("deferred", 0))),
                ("dead letters", str(outbox.get("dead_letters", 0))),
                ("oldest pending", _when(outbox.get("oldest_pending_at"), now)),
            ],
        )
    ]
    waiting = status.get("waiting") or []
    if waiting:
        table = Table(title="Waiting for their time", title_justify="left")
        for column in ("id", "action", "sent at"):
            table.add_column(column, no_wrap=True)
        for item in waiting:
            table.add_row(
                str(item.get("id")), str(item.get("action")), _when(item.get("not_before"), now)
            )
        table.caption = "cancel one before its time: everreach outbox cancel ID"
        parts.append(table)
    dead = status.get("dead_letters") or []
    if dead:
        table = Table(title="Dead letters", title_justify="left")
        for column in ("id", "action", "attempts", "error"):
            table.add_column(
                column,
                justify="right" if column == "attempts" else "left",
                no_wrap=column != "error",
                overflow="fold",
            )
        for item in dead:
            table.add_row(
                short_id(item.get("id")),
                str(item.get("action")),
                str(item.get("attempts")),
                ("may have run: retry re-runs it, or drop; " if item.get("indeterminate") else "")
                + str(item.get("error")),
            )
        parts.append(table)
    return parts


def _day(iso: Any) -> str:
    try:
        day = date.fromisoformat(str(iso))
    except ValueError:
        return str(iso)
    return f"{day.day} {day:%b}"


def forecast_lines(forecast: Mapping[str, Any]) -> list[RenderableType]:
    """``cost.forecast`` in two lines: the month's daily spend as a sparkline, and where the
    month is heading at the current pace (projected month-end, the days the caps are reached).
    """
    from spend_forecast import sparkline

    try:
        daily = [Decimal(str(usd)) for usd in forecast.get("daily_usd") or []]
    except InvalidOperation:
        daily = []

    def cap(name: str) -> str:
        iso = forecast.get(f"{name}_cap_date")
        return f"{name} cap {_day(iso) if iso else 'not this month'}"

    spark = Text("daily spend ") + Text(sparkline(daily), style="cyan")
    spark += Text(f" 1-{_day(forecast.get('as_of'))}, max {_usd(str(max(daily, default=0)))}")
    sentence = (
        f"Projected {_usd(forecast.get('projected_usd'))} by {_day(forecast.get('month_end'))} "
        f"at {_usd(forecast.get('pace_usd_per_day'))}/day (the last "
        f"{forecast.get('pace_days', 7)} days' pace); {cap('soft')}; {cap('hard')}."
    )
    return [spark, Text(sentence)]


def cost_view(cost: Mapping[str, Any] | None, rates: Mapping[str, str]) -> list[RenderableType]:
    """The cost section of /status (if known), its forecast and the $/call table."""
    parts: list[RenderableType] = []
    if cost is not None:
        parts.append(_cost_table(cost))
        if isinstance(cost.get("forecast"), Mapping):
            parts.extend(forecast_lines(cost["forecast"]))
        by_action = cost.get("by_action") or {}
        if by_action:
            spend = Table(title="Spent by action", title_justify="left")
            spend.add_column("action")
            spend.add_column("spent", justify="right")
            for action, usd in sorted(by_action.items(), key=lambda kv: -_num(kv[1])):
                spend.add_row(action, _usd(usd))
            parts.append(spend)
    table = Table(
        title="Rates ($/cloud call)",
        title_justify="left",
        caption="* is the default",
        caption_justify="left",
    )
    table.add_column("action")
    table.add_column("$/call", justify="right")
    for key, usd in rates.items():
        table.add_row(key, _usd(usd))
    parts.append(table)
    return parts


def routes_view(rows: Sequence[Mapping[str, Any]], source: str) -> Table:
    """The route table with the classifier's kind and where hybrid mode sends each action."""
    table = Table(
        title=f"Routes ({source})",
        title_justify="left",
        caption="actions not listed: auto (the classifier decides), fallback local, "
        "side effect assumed",
        caption_justify="left",
    )
    for column in ("action", "preferred", "fallback", "side effect", "classifier", "hybrid"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["action"],
            row["preferred_env"],
            row["fallback_env"],
            "yes" if row["side_effect"] else "no",
            row["classifier_kind"],
            row["hybrid_env"],
        )
    return table
