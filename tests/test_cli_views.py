"""The command line's terminal views of /status: pure functions, rendered to text here."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

import pytest
from rich.console import Console

from cli_views import cost_bar, forecast_lines, outbox_view, status_view

pytestmark = pytest.mark.prd200


def render(parts: list[Any]) -> str:
    console = Console(record=True, width=160, markup=False, file=io.StringIO())
    for part in parts:
        console.print(part)
    return console.export_text()


def test_outbox_view_lists_dead_letters_with_their_errors():
    text = render(
        outbox_view(
            {
                "outbox": {"depth": 0, "dead_letters": 1, "oldest_pending_at": None},
                "dead_letters": [
                    {
                        "id": "ob-1",
                        "action": "dm.send",
                        "attempts": 8,
                        "error": "HTTP 422 [bold]from the cloud[/bold]",
                    }
                ],
            }
        )
    )
    row = next(line for line in text.splitlines() if "ob-1" in line)
    assert "dm.send" in row and "8" in row
    assert "HTTP 422 [bold]from the cloud[/bold]" in row  # server text is never rich markup


def test_status_view_shows_open_circuits_caps_and_next_runs():
    now = datetime(2026, 3, 1, 5, 0, tzinfo=UTC)
    text = render(
        status_view(
            {
                "env": "hybrid",
                "online": False,
                "offline_mode": True,
                "connectivity": {"online": False},
                "version": "9",
                "uptime_sec": 3700,
                "cost": {
                    "month": "2026-03",
                    "spent_usd": "400.00",
                    "hard_cap_usd": "400.00",
                    "soft_cap_usd": "380.00",
                    "hard_cap_reached": True,
                    "soft_cap_reached": True,
                },
                "circuits": {"local": {"content.generate": "open"}, "cloud": "half_open"},
                "scheduler": {
                    "timezone": "UTC",
                    "jobs": [
                        {
                            "id": "nightly",
                            "action": "system.heartbeat",
                            "trigger": "cron 0 6 * * *",
                            "next_run_time": "2026-03-01T06:00:00+00:00",
                            "runs": 4,
                            "mirrored": True,
                        }
                    ],
                },
            },
            now=now,
        )
    )
    assert "env hybrid · cloud offline · OFFLINE_MODE · v9 · up 1 h 1 min" in text
    assert "hard cap reached" in text and "100.0% of the hard cap" in text
    assert "local content.generate" in text and "open" in text and "half_open" in text
    assert "nightly (mirrored)" in text and "2026-03-01T06:00:00+00:00 (in 1 h)" in text


@pytest.mark.parametrize(
    ("spent", "soft", "hard", "bar"),
    [
        (0, 380, 400, "░" * 19 + "|" + " 0.0% of the hard cap"),
        (200, 380, 400, "█" * 10 + "░" * 9 + "|" + " 50.0% of the hard cap"),
        (400, 380, 400, "█" * 19 + "|" + " 100.0% of the hard cap"),
        (500, 380, 400, "█" * 19 + "|" + " 125.0% of the hard cap"),
        (0, 0, 0, "░" * 20),
        (1, 0, 0, "█" * 20),
    ],
)
def test_cost_bar_fills_to_the_spend_and_marks_the_soft_cap(spent, soft, hard, bar):
    assert cost_bar(spent, soft, hard, width=20).plain == bar


def test_failures_are_shown_by_error_code_never_as_error_error():
    text = render(
        status_view(
            {
                "env": "local",
                "dispatch_counts": {
                    "dm.send": {"local": 3, "unknown_action": 1, "timeout": 2},
                    "system.echo": {"local": 1},
                },
            }
        )
    )
    assert "error error" not in text
    assert "✗ unknown action" in text and "✗ timeout" in text
    row = next(line for line in text.splitlines() if "dm.send" in line)
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert cells == ["dm.send", "3", "2", "1", "6"]  # local, ✗ timeout, ✗ unknown action, total


def test_dead_letter_ids_are_shortened_and_their_errors_shown_whole():
    long_id = "3f2a9c1e-7d44-4b8e-9a0f-1c2d3e4f5a6b"
    error = "cloud_unavailable: the cloud answered 503 for the fifth time in a row"
    text = render(
        outbox_view(
            {
                "outbox": {"depth": 0, "dead_letters": 1},
                "dead_letters": [
                    {"id": long_id, "action": "dm.send", "attempts": 5, "error": error}
                ],
            }
        )
    )
    row = next(line for line in text.splitlines() if "dm.send" in line)
    assert "3f2a9c1e…" in row and long_id not in text
    assert error in text


def test_past_times_are_relative():
    now = datetime(2026, 3, 1, 5, 0, 42, tzinfo=UTC)
    text = render(
        status_view(
            {"env": "local", "outbox": {"depth": 1, "oldest_pending_at": "2026-03-01T05:00:00Z"}},
            now=now,
        )
    )
    line = next(line for line in text.splitlines() if "oldest pending" in line)
    assert line.split("oldest pending", 1)[1].strip() == "42 s ago"


def test_set_up_mistakes_are_pointed_out():
    text = render(
        status_view(
            {
                "env": "hybrid",
                "data_dir_shared_with": {"pid": 4242, "port": 9090},
                "cloud_missing_handlers": {"research.keyword": 3},
            }
        )
    )
    assert "pid 4242" in text and "own DATA_DIR" in text
    assert "the cloud has no handler for research.keyword (3 calls)" in text


def test_forecast_lines_draw_each_day_and_say_where_the_month_is_heading():
    from tests.test_status_page import march_forecast

    text = render(forecast_lines(march_forecast() | {"hard_cap_date": None}))
    lines = text.splitlines()
    assert lines[0] == "daily spend ▁▅█▁▁▁▁▁▃ 1-9 Mar, max $20.00"
    assert " ".join(lines[1:]) == (
        "Projected $117.71 by 31 Mar at $3.71/day (the last 7 days' pace); "
        "soft cap 13 Mar; hard cap not this month."
    )


def test_status_shows_the_last_alerts_from_a_real_alerter_newest_first() -> None:
    from alerts import Alerter, AlertEvent

    clock = [datetime(2026, 3, 10, 12, 0, tzinfo=UTC)]
    alerter = Alerter(instance="vm:8080", clock=lambda: clock[0])
    for n in range(7):
        alerter.emit(AlertEvent.CIRCUIT_OPEN, f"circuit of a.b{n} opened", subject=f"a.b{n}")
        clock[0] = clock[0].replace(minute=n + 1)
    alerter.emit(AlertEvent.CLOUD_OFFLINE, "cloud http://c:9090 stopped answering")
    shown = render(status_view({"env": "hybrid", "alerts": alerter.snapshot()}, now=clock[0]))
    assert "Alerts (to no sink: recorded)" in shown
    lines = [line for line in shown.splitlines() if "circuit_open" in line or "offline" in line]
    assert "cloud_offline" in lines[0] and "stopped answering" in lines[0]  # newest first
    assert len(lines) == 5  # the last five of eight
    assert "a.b6" in shown and "a.b2" not in shown


def test_status_without_alerts_shows_no_alerts_table() -> None:
    assert "Alerts" not in render(status_view({"env": "local", "alerts": {"events": []}}))
