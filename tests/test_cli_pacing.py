"""The command line of pacing and scheduled actions: ``dispatch --at/--in``,
``outbox cancel``, and the rate limits in ``everreach status``."""

from __future__ import annotations

import argparse
import json

import pytest

from cli import ExitCode
from cli_client import parse_duration
from tests.test_cli import app_server, run  # noqa: F401  (the fixture)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), ("45", 45)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10x", "m10", "1h 30m", "-5", "5 minutes", "nan", "inf"])
def test_a_bad_duration_says_how_to_write_one(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def test_dispatch_in_keeps_it_and_outbox_cancel_cancels_it(app_server, capsys):  # noqa: F811
    server = app_server()
    code, out, err = run(capsys, "dispatch", "dm.send", "--url", server.url, "--in", "10m")
    envelope = json.loads(out)
    assert code == ExitCode.QUEUED
    assert envelope["deferred_until"] and envelope["outbox_id"]
    assert f"everreach outbox cancel {envelope['outbox_id']}" in err
    code, out, _ = run(capsys, "outbox", "--url", server.url)
    assert code == ExitCode.OK
    assert "Waiting for their time" in out and envelope["outbox_id"] in out  # the whole id
    code, out, _ = run(capsys, "outbox", "--url", server.url, "--json")
    (waiting,) = json.loads(out)["waiting"]
    assert waiting["id"] == envelope["outbox_id"] and waiting["action"] == "dm.send"
    assert waiting["not_before"] == envelope["deferred_until"]
    code, _, err = run(capsys, "outbox", "cancel", envelope["outbox_id"], "--url", server.url)
    assert code == ExitCode.OK and "cancelled" in err
    code, out, _ = run(capsys, "outbox", "--url", server.url, "--json")
    assert json.loads(out)["waiting"] == []
    code, _, err = run(capsys, "outbox", "cancel", envelope["outbox_id"], "--url", server.url)
    assert code != ExitCode.OK and "sent already" in err


def test_dispatch_at_sends_not_before_and_a_bad_time_is_refused(app_server, capsys):  # noqa: F811
    server = app_server()
    code, out, _ = run(
        capsys, "dispatch", "dm.send", "--url", server.url, "--at", "2099-01-01T00:00:00Z"
    )
    assert code == ExitCode.FAILED  # past the horizon: 422
    assert "days ahead" in json.loads(out)["detail"]
    code, out, _ = run(
        capsys, "dispatch", "dm.send", "--url", server.url, "--at", "2020-01-01T00:00:00Z"
    )
    assert code == ExitCode.OK  # in the past: runs now


def test_at_and_in_together_are_a_usage_error(capsys):
    code, _, err = run(capsys, "dispatch", "dm.send", "--at", "2030-01-01T00:00:00Z", "--in", "1m")
    assert code == ExitCode.USAGE and "not allowed with" in err


def test_status_prints_each_rate_limit(app_server, capsys, tmp_path):  # noqa: F811
    limits = tmp_path / "limits.json"
    limits.write_text(json.dumps({"dm.send": {"max": 1, "per_sec": 3600}}))
    server = app_server(RATE_LIMITS_PATH=str(limits))
    assert run(capsys, "dispatch", "dm.send", "--url", server.url)[0] == ExitCode.OK
    assert run(capsys, "dispatch", "dm.send", "--url", server.url)[0] == ExitCode.QUEUED
    code, out, _ = run(capsys, "status", "--url", server.url)
    assert code == ExitCode.OK
    row = next(line for line in out.splitlines() if "dm.send" in line and "/" in line)
    assert "1 / 1" in row and "1 h" in row
    assert "Rate limits" in out
