"""cli_commands: each ``cmd_*`` against an in-process app, and the argument readers."""

from __future__ import annotations

import io
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import cli_commands
from cli import build_parser
from cli_client import CliFailure, ExitCode, Io
from cli_commands import plural, read_items
from config.hybrid_config import HybridConfig
from tests.conftest import free_port

CONFIG = HybridConfig.from_mapping({})  # no environment: every call names --url
TOKEN = "cli-commands-token-123"
SAFE = {"fallback_env": "none", "side_effect": False}


class Streams:
    """An ``Io`` writing to strings."""

    def __init__(self) -> None:
        self.out_file, self.err_file = io.StringIO(), io.StringIO()
        self.io = Io(Console(file=self.out_file, width=120), Console(file=self.err_file))

    @property
    def out(self) -> str:
        return self.out_file.getvalue()

    @property
    def err(self) -> str:
        return self.err_file.getvalue()


def command(
    client: Any, *argv: str, config: HybridConfig = CONFIG
) -> tuple[int | None, Streams, CliFailure | None]:
    """Parse ``argv`` as the CLI does, run its ``cmd_*`` with ``client``; keep a CliFailure."""
    args = build_parser().parse_args(list(argv))
    args.client = client
    name = "cmd_" + argv[0]
    streams = Streams()
    try:
        return getattr(cli_commands, name)(args, config, streams.io), streams, None
    except CliFailure as exc:
        return None, streams, exc


@pytest.fixture
def app(app_client: Callable[..., Any]) -> Any:
    return app_client(LOCAL_API_TOKEN=TOKEN)


def _url(*argv: str) -> tuple[str, ...]:
    return (*argv, "--url", "http://testserver", "--token", TOKEN)


# -- dispatch --------------------------------------------------------------------------------


def test_dispatch_merges_params_and_prints_the_envelope(app: Any) -> None:
    code, s, _ = command(
        app,
        *_url("dispatch", "system.echo", "--params", '{"a": 1, "b": "x"}'),
        "-p",
        "b=y",
        "-p",
        "n=3",
        "-p",
        'obj={"k": [1]}',
        "-p",
        "to=alice",
        "-p",
        "eq=a=b",
    )
    assert code == ExitCode.OK
    envelope = json.loads(s.out)
    assert envelope["ok"] is True
    assert envelope["result"] == {
        "a": 1,
        "b": "y",  # -p wins over --params
        "n": 3,  # JSON when it parses
        "obj": {"k": [1]},
        "to": "alice",  # else a string
        "eq": "a=b",  # split at the first '='
    }


def test_dispatch_of_an_unknown_action_fails_and_says_why(app: Any) -> None:
    code, s, _ = command(app, *_url("dispatch", "nope.missing"))
    assert code == ExitCode.FAILED
    assert json.loads(s.out)["ok"] is False
    assert s.err.startswith("everreach: nope.missing failed (HTTP 404): unknown_action: ")


def test_dispatch_with_a_wrong_token_explains_the_token(app: Any) -> None:
    args = ("dispatch", "system.echo", "--url", "http://testserver", "--token", "wrong-token-x")
    _code, _s, failure = command(app, *args)
    assert failure is not None and failure.code == ExitCode.FAILED
    assert "LOCAL_API_TOKEN" in str(failure)


def test_dispatch_later_is_queued_and_can_be_cancelled(app: Any) -> None:
    code, s, _ = command(app, *_url("dispatch", "system.echo", "--in", "1h"))
    assert code == ExitCode.QUEUED == 3
    outbox_id = json.loads(s.out)["outbox_id"]
    assert f"kept in the outbox (id {outbox_id}) until " in s.err
    assert f"cancel it with: everreach outbox cancel {outbox_id}" in s.err
    code, s, _ = command(app, *_url("outbox", "cancel", outbox_id))
    assert code == ExitCode.OK
    assert s.err == f"everreach: outbox item {outbox_id} (system.echo) cancelled: it will not run\n"
    _code, _s, failure = command(app, *_url("outbox", "cancel", outbox_id))
    assert failure is not None and outbox_id in str(failure)  # gone: the server's 404 detail


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--params", "{bad"), "--params is not valid JSON"),
        (("--params", "[1]"), "--params must be a JSON object"),
        (("-p", "novalue"), "-p 'novalue': use key=value"),
        (("-p", "=3"), "-p '=3': use key=value"),
    ],
)
def test_bad_params_are_a_usage_error_before_any_request(
    argv: tuple[str, ...], message: str
) -> None:
    _code, _s, failure = command(None, "dispatch", "system.echo", "--url", "http://x", *argv)
    assert failure is not None and failure.code == ExitCode.USAGE
    assert str(failure).startswith(message)


# -- batch -----------------------------------------------------------------------------------


def _batch_file(tmp_path: Path, items: Any) -> str:
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(items), encoding="utf-8")
    return str(path)


def test_batch_reports_results_in_order_and_lists_failures(
    server_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # One /dispatch per item goes over the network (its own connection pool): a real server.
    server = server_factory(name="batch", LOCAL_API_TOKEN=TOKEN)
    items = [
        {"action": "system.echo", "params": {"i": 0}},
        {"action": "nope.missing"},
        {"action": "system.echo", "params": {"i": 2}},
    ]
    argv = ("batch", _batch_file(tmp_path, items), "--no-progress", "--url", server.url)
    code, s, _ = command(None, *argv, "--token", TOKEN)
    assert code == ExitCode.FAILED
    output = json.loads(s.out)
    assert [r["ok"] for r in output["results"]] == [True, False, True]
    assert [r.get("result") for r in output["results"]][::2] == [{"i": 0}, {"i": 2}]
    assert output["summary"]["total"] == 3 and output["summary"]["failed"] == 1
    assert "item 1 (nope.missing) failed: unknown_action" in s.err
    assert "batch: 3 items, 2 ok, 1 failed, 0 queued in " in s.err


def test_batch_on_the_server_gives_the_same_results(app: Any, tmp_path: Path) -> None:
    items = {"items": [{"action": "system.echo", "params": {"i": n}} for n in range(4)]}
    argv = _url("batch", _batch_file(tmp_path, items), "--server-side", "--no-progress")
    code, s, _ = command(app, *argv)
    assert code == ExitCode.OK
    output = json.loads(s.out)
    assert [r["result"] for r in output["results"]] == [{"i": n} for n in range(4)]
    assert "batch: 4 items, 4 ok, 0 failed, 0 queued" in s.err


@pytest.mark.parametrize("n", ["0", "999"])
def test_batch_max_concurrent_is_bounded_by_this_environment(tmp_path: Path, n: str) -> None:
    config = HybridConfig.from_mapping({"BATCH_MAX_CONCURRENT": "8"})
    path = _batch_file(tmp_path, [{"action": "system.echo"}])
    argv = ("batch", path, "--url", "http://x", "--max-concurrent", n)
    _code, _s, failure = command(None, *argv, config=config)
    assert failure is not None and failure.code == ExitCode.USAGE
    assert str(failure) == "--max-concurrent must be between 1 and 8 (BATCH_MAX_CONCURRENT)"


def test_batch_without_a_server_says_so_in_one_line(tmp_path: Path) -> None:
    path = _batch_file(tmp_path, [{"action": "system.echo"}])
    url = f"http://127.0.0.1:{free_port()}"
    _code, s, failure = command(None, "batch", path, "--url", url, "--no-progress")
    assert failure is not None and failure.code == ExitCode.FAILED
    assert url in str(failure)
    assert s.out == ""  # no results printed for a batch that never started


def test_read_items_normalises_items(tmp_path: Path) -> None:
    path = _batch_file(
        tmp_path,
        {"items": [{"action": "a.b"}, {"action": "c.d", "params": {"x": 1}, "force_env": "cloud"}]},
    )
    assert read_items(path) == [
        {"action": "a.b", "params": {}},
        {"action": "c.d", "params": {"x": 1}, "force_env": "cloud"},
    ]


def test_read_items_reads_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO('[{"action": "a.b", "params": null}]'))
    assert read_items("-") == [{"action": "a.b", "params": {}}]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[\n  {oops}", "batch.json: not valid JSON at line 2 column 4: "),
        (
            '{"action": "a.b"}',
            'batch.json: must be a JSON list of {"action": ..., "params": {...}}',
        ),
        ('[{"action": "a.b"}, 5]', "batch.json: item 1 must be an object with an 'action' string"),
        ('[{"action": 3}]', "batch.json: item 0 must be an object with an 'action' string"),
        (
            '[{"action": "a.b", "params": [1]}]',
            "batch.json: item 0: 'params' must be a JSON object",
        ),
    ],
)
def test_read_items_refuses_a_malformed_batch_naming_where(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "batch.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CliFailure) as caught:
        read_items(str(path))
    assert caught.value.code == ExitCode.USAGE
    assert str(caught.value).replace(str(tmp_path) + "/", "").startswith(message)


def test_read_items_of_a_missing_file_says_it_cannot_read_it(tmp_path: Path) -> None:
    with pytest.raises(CliFailure, match=r"cannot read .*missing\.json: No such file"):
        read_items(str(tmp_path / "missing.json"))


# -- views -----------------------------------------------------------------------------------


def test_status_json_is_the_servers_status(app: Any) -> None:
    code, s, _ = command(app, *_url("status", "--json"))
    assert code == ExitCode.OK
    status = json.loads(s.out)
    assert status["env"] == "local" and "outbox" in status and "cost" in status


def test_status_view_is_a_readable_table(app: Any) -> None:
    code, s, _ = command(app, *_url("status"))
    assert code == ExitCode.OK
    assert "local" in s.out and not s.out.lstrip().startswith("{")


def test_cost_without_a_server_still_prints_the_rates_and_fails(tmp_path: Path) -> None:
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"claude.complete": 0.02}), encoding="utf-8")
    config = HybridConfig.from_mapping({"COST_RATES_FILE": str(rates)})
    url = f"http://127.0.0.1:{free_port()}"
    _code, s, failure = command(None, "cost", "--json", "--url", url, config=config)
    assert failure is not None and failure.code == ExitCode.FAILED
    assert str(failure).startswith("month-to-date spend unknown: ")
    printed = json.loads(s.out)
    assert printed["cost"] is None
    assert "claude.complete" in json.dumps(printed["rates"])


def test_routes_json_shows_where_each_action_runs_without_a_server(tmp_path: Path) -> None:
    table = tmp_path / "routes.json"
    table.write_text(
        json.dumps(
            {
                "actions": {
                    "research.keyword": {"preferred_env": "auto", **SAFE},
                    "dm.send": {"preferred_env": "local", **SAFE},
                }
            }
        ),
        encoding="utf-8",
    )
    config = HybridConfig.from_mapping({"ROUTE_TABLE_PATH": str(table)})
    code, s, _ = command(None, "routes", "--json", config=config)
    assert code == ExitCode.OK
    output = json.loads(s.out)
    by_action = {row["action"]: row for row in output["routes"]}
    assert by_action["dm.send"]["hybrid_env"] == "local"
    row = by_action["research.keyword"]
    assert row["hybrid_env"] == ("cloud" if row["classifier_kind"] == "api" else "local")


# -- outbox ----------------------------------------------------------------------------------


def _dead_letter(app: Any, app_dir: Path, status: str) -> str:
    code, s, _ = command(app, *_url("dispatch", "system.echo", "--in", "1h"))
    assert code == ExitCode.QUEUED
    item_id = str(json.loads(s.out)["outbox_id"])
    [db] = app_dir.glob("app*/data/hybrid.sqlite3")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE hybrid_outbox SET status = ? WHERE id = ?", (status, item_id))
    return item_id


def test_outbox_retry_needs_one_id_or_all(app: Any) -> None:
    for argv in (_url("outbox", "retry"), _url("outbox", "retry", "x", "--all")):
        _code, _s, failure = command(app, *argv)
        assert failure is not None and failure.code == ExitCode.USAGE
        assert str(failure) == "give one outbox item ID, or --all"


def test_outbox_retry_of_a_dead_letter_queues_it_again(app: Any, tmp_path: Path) -> None:
    item_id = _dead_letter(app, tmp_path, "dead")
    code, s, _ = command(app, *_url("outbox", "retry", item_id))
    assert code == ExitCode.OK
    assert s.err == f"everreach: outbox item {item_id} (system.echo) is queued again\n"


def test_outbox_retry_of_one_that_may_have_run_asks_first(
    app: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    item_id = _dead_letter(app, tmp_path, "indeterminate")
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    _code, s, failure = command(app, *_url("outbox", "retry", item_id))
    assert failure is not None and str(failure) == f"outbox item {item_id} left as it is"
    assert "may have run already; run it again? [y/N]" in s.err
    monkeypatch.setattr("sys.stdin", io.StringIO("yes\n"))
    code, s, _ = command(app, *_url("outbox", "retry", item_id))
    assert code == ExitCode.OK and "is queued again" in s.err


def test_outbox_retry_all_leaves_those_that_may_have_run(app: Any, tmp_path: Path) -> None:
    dead = _dead_letter(app, tmp_path, "dead")
    maybe = _dead_letter(app, tmp_path, "indeterminate")
    code, s, _ = command(app, *_url("outbox", "retry", "--all"))
    assert code == ExitCode.OK
    assert f"outbox item {dead} (system.echo) is queued again" in s.err
    assert "1 item(s) may have run already and were left as they are; retry each with: " in s.err
    assert f"({maybe})" in s.err


def test_outbox_drop_asks_and_a_no_keeps_the_item(
    app: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    item_id = _dead_letter(app, tmp_path, "dead")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no answer is no
    _code, _s, failure = command(app, *_url("outbox", "drop", item_id))
    assert failure is not None and str(failure) == f"outbox item {item_id} left as it is"
    code, s, _ = command(app, *_url("outbox", "drop", item_id, "--yes"))
    assert code == ExitCode.OK
    assert s.err == f"everreach: outbox item {item_id} (system.echo) dropped\n"


def test_outbox_json_lists_the_queue_and_dead_letters(app: Any, tmp_path: Path) -> None:
    dead = _dead_letter(app, tmp_path, "dead")
    code, s, _ = command(app, *_url("outbox", "--json"))
    assert code == ExitCode.OK
    output = json.loads(s.out)
    assert set(output) == {"outbox", "waiting", "dead_letters"}
    assert output["waiting"] == []  # nothing scheduled or deferred
    assert [item["id"] for item in output["dead_letters"]] == [dead]


def test_plural() -> None:
    assert plural(1, "item") == "1 item"
    assert plural(0, "item") == "0 items"
    assert plural(2, "item") == "2 items"
