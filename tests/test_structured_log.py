"""Tests of structured_log.py: JSON lines, dispatch lines, redaction, idempotent set-up."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from config.hybrid_config import HybridConfig
from errors import Env, ErrorCode, Source
from structured_log import (
    DISPATCH_LOGGER,
    QUIET_LOGGERS,
    REDACTED,
    JsonFormatter,
    _encode,
    _sole_json_handler,
    config_secrets,
    configure_logging,
    log_dispatch,
    redact,
)

pytestmark = pytest.mark.prd200

DISPATCH_KEYS = {
    "ts",
    "level",
    "logger",
    "msg",
    "event",
    "request_id",
    "action",
    "env",
    "source",
    "outcome",
    "duration_ms",
    "attempts",
    "error",
}


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Configure logging into a StringIO; restore the logging set-up afterwards."""
    root = logging.getLogger()
    saved_root = (list(root.handlers), root.level)
    uvicorn_names = ("uvicorn", "uvicorn.error", "uvicorn.access")
    saved_uv = {
        n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate)
        for n in uvicorn_names
    }
    saved_quiet = {n: logging.getLogger(n).level for n in QUIET_LOGGERS}
    out = io.StringIO()
    yield out
    root.handlers[:] = saved_root[0]
    root.setLevel(saved_root[1])
    for name, level in saved_quiet.items():
        logging.getLogger(name).setLevel(level)
    for name, (handlers, propagate) in saved_uv.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def dispatch(logger: logging.Logger, **overrides: Any) -> None:
    fields: dict[str, Any] = {
        "request_id": "req-1",
        "action": "research.keyword",
        "env": "cloud",
        "source": "cloud",
        "outcome": "ok",
        "duration_ms": 12.34567,
        "attempts": 1,
    }
    fields.update(overrides)
    log_dispatch(logger, **fields)


def test_each_record_is_one_json_line(stream: io.StringIO) -> None:
    configure_logging("INFO", stream=stream)
    logging.getLogger("everreach.test").info("two\nlines %s", "here", extra={"n": 3})
    [line] = lines(stream)
    assert line["msg"] == "two\nlines here"
    assert line["level"] == "INFO"
    assert line["logger"] == "everreach.test"
    assert line["n"] == 3
    assert line["ts"].endswith("Z") and "T" in line["ts"]


def test_a_dispatch_line_has_exactly_the_dispatch_fields(stream: io.StringIO) -> None:
    configure_logging("INFO", stream=stream)
    dispatch(logging.getLogger(DISPATCH_LOGGER))
    [line] = lines(stream)
    assert set(line) == DISPATCH_KEYS
    assert line["event"] == "dispatch"
    assert line["request_id"] == "req-1"
    assert line["action"] == "research.keyword"
    assert (line["env"], line["source"], line["outcome"]) == ("cloud", "cloud", "ok")
    assert line["duration_ms"] == 12.346
    assert (line["attempts"], line["error"], line["level"]) == (1, None, "INFO")


def test_a_failed_dispatch_is_a_warning_with_its_error_code(stream: io.StringIO) -> None:
    configure_logging("INFO", stream=stream)
    dispatch(
        logging.getLogger(DISPATCH_LOGGER),
        source=None,
        outcome="cloud_unavailable",
        error=ErrorCode.CLOUD_UNAVAILABLE,
        attempts=4,
    )
    [line] = lines(stream)
    assert line["level"] == "WARNING"
    assert line["error"] == "cloud_unavailable"
    assert line["source"] is None
    assert line["attempts"] == 4


def test_enum_members_are_logged_as_their_values(stream: io.StringIO) -> None:
    configure_logging("INFO", stream=stream)
    dispatch(logging.getLogger(DISPATCH_LOGGER), env=Env.LOCAL, source=Source.LOCAL_FALLBACK)
    [line] = lines(stream)
    assert (line["env"], line["source"]) == ("local", "local_fallback")


def test_an_overlong_action_name_is_cut(stream: io.StringIO) -> None:
    configure_logging("INFO", stream=stream)
    dispatch(logging.getLogger(DISPATCH_LOGGER), action="x" * 5000)
    [line] = lines(stream)
    assert len(line["action"]) <= 201
    assert len(stream.getvalue()) < 2000


def test_dispatch_lines_are_dropped_below_the_configured_level(stream: io.StringIO) -> None:
    configure_logging("WARNING", stream=stream)
    dispatch(logging.getLogger(DISPATCH_LOGGER))
    dispatch(logging.getLogger(DISPATCH_LOGGER), outcome="timeout", error="timeout")
    assert [line["outcome"] for line in lines(stream)] == ["timeout"]


def test_secrets_are_redacted_in_message_fields_and_tracebacks(stream: io.StringIO) -> None:
    secret = 'sk-"very\\secret'
    configure_logging("INFO", secrets=[secret], stream=stream)
    log = logging.getLogger("everreach.test")
    log.info("key is %s", secret, extra={"detail": {"nested": [f"x{secret}y"]}})
    try:
        raise RuntimeError(f"auth failed for {secret}")
    except RuntimeError:
        log.exception("cloud call failed")
    text = stream.getvalue()
    assert secret not in text
    assert json.dumps(secret)[1:-1] not in text
    first, second = lines(stream)
    assert first["msg"] == f"key is {REDACTED}"
    assert first["detail"] == {"nested": [f"x{REDACTED}y"]}
    assert f"auth failed for {REDACTED}" in second["exc"]


def test_configure_logging_twice_installs_one_handler(stream: io.StringIO) -> None:
    configure_logging("INFO", stream=stream)
    configure_logging("DEBUG", stream=stream)
    json_handlers = [
        h for h in logging.getLogger().handlers if isinstance(h.formatter, JsonFormatter)
    ]
    assert len(json_handlers) == 1
    logging.getLogger("everreach.test").debug("once")
    assert [line["msg"] for line in lines(stream)] == ["once"]


def test_uvicorn_records_come_out_as_json(stream: io.StringIO) -> None:
    logging.getLogger("uvicorn.error").addHandler(logging.StreamHandler(io.StringIO()))
    logging.getLogger("uvicorn.error").propagate = False
    configure_logging("INFO", stream=stream)
    logging.getLogger("uvicorn.error").warning(
        "Started server process", extra={"color_message": "\x1b[1mStarted\x1b[0m"}
    )
    [line] = lines(stream)
    assert (line["logger"], line["msg"]) == ("uvicorn.error", "Started server process")
    assert "color_message" not in line


def test_an_access_log_uvicorn_was_told_to_drop_stays_off(stream: io.StringIO) -> None:
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []  # what uvicorn --no-access-log (access_log=False) leaves
    access.propagate = False
    configure_logging("DEBUG", stream=stream)
    assert not access.hasHandlers()  # uvicorn then skips building the line at all
    access.info('127.0.0.1:5000 - "GET /health HTTP/1.1" 200')
    assert lines(stream) == []


def test_a_secret_json_escapes_is_redacted_in_json_lines(stream: io.StringIO) -> None:
    secret = 'pa"ss\\word-0123'
    configure_logging("INFO", fmt="json", secrets=[secret], stream=stream)
    logging.getLogger("everreach.test").warning("failed with %s", secret, extra={"dsn": secret})
    [line] = lines(stream)
    assert (line["msg"], line["dsn"]) == ("failed with ***", "***")
    assert "word-0123" not in stream.getvalue()


def test_an_unknown_level_is_refused(stream: io.StringIO) -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("CHATTY", stream=stream)


@pytest.mark.parametrize(
    ("text", "secrets", "expected"),
    [
        ("token abc123 and abc123", ["abc123"], "token *** and ***"),
        ("nothing to hide", ["abc123"], "nothing to hide"),
        ("empty secrets change nothing", ["", "  "], "empty secrets change nothing"),
        ("pw=hunter2hunter2", ["hunter2", "hunter2hunter2"], "pw=***"),
        ("two: aaa bbb", ["aaa", "bbb"], "two: *** ***"),
        ("", ["x"], ""),
    ],
)
def test_redact(text: str, secrets: list[str], expected: str) -> None:
    assert redact(text, secrets) == expected


def test_config_secrets_are_keys_tokens_and_url_passwords() -> None:
    config = HybridConfig.from_mapping(
        {
            "EVERREACH_ENV": "hybrid",
            "CLOUD_ENDPOINT": "https://cloud.example.com",
            "EVERREACH_CLOUD_KEY": "cloud-key-1",
            "LOCAL_API_TOKEN": "local-token-2",
            "REDIS_URL": "redis://:redis-pass-3@127.0.0.1:6379/0",
            "DATABASE_URL": "postgresql://app:pg-pass-4@127.0.0.1:5432/db",
            "OPENAI_API_KEY": "sk-5",
        }
    )
    found = set(config_secrets(config))
    assert {"cloud-key-1", "local-token-2", "redis-pass-3", "pg-pass-4", "sk-5"} <= found
    assert "https://cloud.example.com" not in found
    assert "postgresql://app:pg-pass-4@127.0.0.1:5432/db" in found  # the whole DSN too


def test_a_default_config_has_no_secrets() -> None:
    assert config_secrets(HybridConfig.from_mapping({})) == []


# -- console or JSON, quiet libraries, no httpx hints ----------------------------------------------


@pytest.fixture
def terminal(stream: io.StringIO) -> Iterator[tuple[Any, Callable[[], str]]]:
    """A real pseudo-terminal: (the stream to log to, a function reading what was written)."""
    leader, follower = os.openpty()
    tty = os.fdopen(follower, "w", encoding="utf-8", buffering=1)

    def written() -> str:
        tty.flush()
        chunks = []
        while select.select([leader], [], [], 0)[0]:
            chunks.append(os.read(leader, 65536))
        return b"".join(chunks).decode().replace("\r\n", "\n")

    yield tty, written
    tty.close()
    os.close(leader)


def test_a_terminal_gets_human_readable_lines(terminal: Any) -> None:
    tty, written = terminal
    configure_logging("INFO", stream=tty)
    logging.getLogger("everreach.test").warning("cloud is offline", extra={"failures": 3})
    text = written()
    assert not text.lstrip().startswith("{")
    assert "WARNING" in text and "everreach.test" in text and "cloud is offline" in text
    assert "failures=3" in text


def test_log_format_json_wins_on_a_terminal(terminal: Any) -> None:
    tty, written = terminal
    configure_logging("INFO", fmt="json", stream=tty)
    logging.getLogger("everreach.test").warning("offline")
    assert json.loads(written())["msg"] == "offline"


def test_a_pipe_gets_json_lines(stream: io.StringIO) -> None:
    configure_logging("INFO", stream=stream)
    logging.getLogger("everreach.test").info("hello")
    assert lines(stream)[0]["msg"] == "hello"


def test_an_unknown_log_format_is_refused(stream: io.StringIO) -> None:
    with pytest.raises(ValueError, match="log format"):
        configure_logging("INFO", fmt="xml", stream=stream)


@pytest.mark.parametrize("name", ["apscheduler.scheduler", "httpx", "httpcore.connection"])
def test_chatty_libraries_log_warnings_only_unless_debug(stream: io.StringIO, name: str) -> None:
    configure_logging("INFO", stream=stream)
    logging.getLogger(name).info("Running job ...")
    logging.getLogger(name).warning("job missed")
    assert [line["msg"] for line in lines(stream)] == ["job missed"]
    configure_logging("DEBUG", stream=stream)
    logging.getLogger(name).info("now shown")
    assert lines(stream)[-1]["msg"] == "now shown"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_httpx_hint_links_are_dropped_from_our_lines(stream: io.StringIO, fmt: str) -> None:
    request = httpx.Request("GET", "http://cloud.test/api/schedules")
    try:
        httpx.Response(401, request=request).raise_for_status()
    except httpx.HTTPStatusError as exc:
        error = exc
    assert "For more information check" in str(error)  # what httpx says
    configure_logging("INFO", fmt=fmt, stream=stream)
    logging.getLogger("everreach.test").warning(
        "mirror failed: %s", error, extra={"error": str(error)}
    )
    text = stream.getvalue()
    assert "401 Unauthorized" in text and "/api/schedules" in text
    assert "For more information" not in text and "developer.mozilla" not in text


def test_a_hint_inside_a_nested_field_is_dropped_too(stream: io.StringIO) -> None:
    configure_logging("INFO", fmt="json", stream=stream)
    hint = "401 Unauthorized\nFor more information check: https://example.test/401"
    logging.getLogger("everreach.test").warning("x", extra={"errors": [hint], "e": {"a": hint}})
    line = lines(stream)[-1]
    assert line["errors"] == ["401 Unauthorized"] and line["e"] == {"a": "401 Unauthorized"}


_PLAIN = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text())


@given(st.dictionaries(st.text(), _PLAIN))
def test_a_line_of_plain_values_is_written_as_json_dumps_writes_it(payload: dict[str, Any]) -> None:
    expected = json.dumps(payload, ensure_ascii=False, default=str, separators=(", ", ": "))
    assert _encode(payload) == expected


@pytest.mark.e2e
def test_a_server_logs_console_lines_with_log_format_console_and_no_library_chatter(
    server_factory,
):
    server = server_factory(LOG_FORMAT="console", EVERREACH_SERVICES="tests.e2e_services")
    httpx.get(f"{server.url}/status")
    log = server.log()
    ours = [line for line in log.splitlines() if "everreach.runtime" in line]
    assert ours and not ours[0].startswith("{") and "started" in ours[0]
    assert "apscheduler" not in log and "HTTP Request:" not in log


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, (None, "INFO")),
        ({"LOG_FORMAT": "", "LOG_LEVEL": "debug"}, (None, "DEBUG")),
        ({"LOG_FORMAT": "JSON", "LOG_LEVEL": " warning "}, ("json", "WARNING")),
        ({"LOG_FORMAT": "console"}, ("console", "INFO")),
    ],
)
def test_log_format_and_level_come_from_the_config(
    values: dict[str, str], expected: tuple[str | None, str]
) -> None:
    config = HybridConfig.from_mapping(values)
    assert (config.log_format, config.log_level) == expected


@pytest.mark.parametrize("values", [{"LOG_FORMAT": "xml"}, {"LOG_LEVEL": "CHATTY"}])
def test_a_bad_log_setting_is_a_config_error(values: dict[str, str]) -> None:
    from errors import ConfigError

    with pytest.raises(ConfigError, match="LOG_"):
        HybridConfig.from_mapping(values)


def _dispatch_line_both_ways(stream: io.StringIO, **fields: Any) -> tuple[dict[str, Any], ...]:
    """The line of one dispatch written alone by our handler, and through logging's records."""
    logger = logging.getLogger(DISPATCH_LOGGER)
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]
    root.handlers[:] = ours  # pytest's capture handlers would force the record path
    assert _sole_json_handler(logger, logging.INFO) is ours[0]
    dispatch(logger, **fields)
    other = logging.NullHandler()
    root.addHandler(other)
    try:
        assert _sole_json_handler(logger, logging.INFO) is None
        dispatch(logger, **fields)
    finally:
        root.removeHandler(other)
    # split on newlines only: str.splitlines also splits at U+2028, which JSON leaves as it is
    direct, via_record = (json.loads(line) for line in stream.getvalue().split("\n")[:-1])
    stream.seek(0)
    stream.truncate()
    return direct, via_record


_LINE_TEXT = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["sk-secret", 'a"b\\c', "x For more information check: https://e.x/401"]
)


@given(
    action=_LINE_TEXT,
    request_id=_LINE_TEXT,
    outcome=_LINE_TEXT,
    error=st.none() | _LINE_TEXT,
    duration_ms=st.floats(0, 1e6),
)
def test_a_dispatch_line_reads_the_same_with_or_without_a_record(
    action: str, request_id: str, outcome: str, error: str | None, duration_ms: float
) -> None:
    out = io.StringIO()
    saved = list(logging.getLogger().handlers), logging.getLogger().level
    try:
        configure_logging("INFO", stream=out, secrets=["sk-secret", 'a"b\\c'])
        direct, via_record = _dispatch_line_both_ways(
            out,
            action=action,
            request_id=request_id,
            outcome=outcome,
            error=error,
            duration_ms=duration_ms,
        )
    finally:
        logging.getLogger().handlers[:], _ = saved
        logging.getLogger().setLevel(saved[1])
    assert direct.pop("ts")[:10] == via_record.pop("ts")[:10]
    assert direct == via_record
    assert "sk-secret" not in json.dumps(direct)
    assert 'a"b\\c' not in json.dumps(direct) and 'a\\"b\\\\c' not in json.dumps(direct)


def test_a_dispatch_line_goes_through_logging_when_another_handler_listens(
    stream: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    configure_logging("INFO", stream=stream)
    with caplog.at_level(logging.INFO, logger=DISPATCH_LOGGER):
        dispatch(logging.getLogger(DISPATCH_LOGGER))
    assert [r.getMessage() for r in caplog.records] == ["dispatch research.keyword -> cloud ok"]
    assert [line["request_id"] for line in lines(stream)] == ["req-1"]


def test_a_dispatch_line_that_cannot_be_written_fails_no_dispatch(
    stream: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", stream=stream)
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]
    stream.close()  # a write now raises ValueError
    dispatch(logging.getLogger(DISPATCH_LOGGER))  # the direct way: no record, no raise
    assert "Logging error" in capsys.readouterr().err


@pytest.mark.parametrize("line_buffering", [True, False])
def test_a_dispatch_line_is_in_the_file_when_log_dispatch_returns(
    stream: io.StringIO, tmp_path: Any, line_buffering: bool
) -> None:
    """Line-buffered (stderr) or not, the written way flushes each line to the file at once."""
    path = tmp_path / "server.log"
    with open(path, "w", buffering=8192, encoding="utf-8") as file:
        file.reconfigure(line_buffering=line_buffering)
        configure_logging("INFO", stream=file)
        root = logging.getLogger()
        root.handlers[:] = [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]
        dispatch(logging.getLogger(DISPATCH_LOGGER))
        assert [json.loads(line)["request_id"] for line in path.read_text().splitlines()] == [
            "req-1"
        ]


class _Writes(io.StringIO):
    """A stream that counts its writes."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _ours_only(out: IO[str]) -> logging.Handler:
    """Configure logging into ``out`` with our handler alone (so dispatch lines take the
    direct way, as in a server)."""
    configure_logging("INFO", stream=out)
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]
    [handler] = root.handlers
    return handler


async def test_dispatch_lines_of_one_loop_turn_are_written_at_once_by_the_next(
    stream: io.StringIO,
) -> None:
    out = _Writes()
    _ours_only(out)
    logger = logging.getLogger(DISPATCH_LOGGER)
    for n in range(3):
        dispatch(logger, request_id=f"req-{n}")
    assert out.getvalue() == ""  # held until the loop turns
    await asyncio.sleep(0)
    assert [line["request_id"] for line in lines(out)] == ["req-0", "req-1", "req-2"]
    assert out.writes == 1
    dispatch(logger, request_id="req-3")
    await asyncio.sleep(0)
    assert [line["request_id"] for line in lines(out)][-1] == "req-3"
    assert out.writes == 2


async def test_held_dispatch_lines_are_written_before_any_other_record(
    stream: io.StringIO,
) -> None:
    out = io.StringIO()
    _ours_only(out)
    dispatch(logging.getLogger(DISPATCH_LOGGER), request_id="req-1")
    logging.getLogger("everreach.test").warning("after the dispatch")
    assert [line.get("request_id", line["msg"]) for line in lines(out)] == [
        "req-1",
        "after the dispatch",
    ]


def test_held_dispatch_lines_are_written_by_flush_when_the_loop_never_turns_again(
    stream: io.StringIO,
) -> None:
    """A loop that stops (a clean shutdown) right after a dispatch: its callback never runs,
    and ``logging.shutdown`` (flush, close) writes the line; so does a line logged later
    outside that loop, and ``configure_logging`` replacing the handler."""
    out = io.StringIO()
    handler = _ours_only(out)
    logger = logging.getLogger(DISPATCH_LOGGER)

    async def last_call(request_id: str) -> None:
        dispatch(logger, request_id=request_id)
        asyncio.get_running_loop().stop()  # this turn is its last: the callback is not run

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(last_call("req-1"))
        assert out.getvalue() == ""
        handler.flush()
        assert [line["request_id"] for line in lines(out)] == ["req-1"]
        loop.run_until_complete(last_call("req-2"))
        dispatch(logger, request_id="req-3")  # no loop: written at once, after req-2
        assert [line["request_id"] for line in lines(out)] == ["req-1", "req-2", "req-3"]
        loop.run_until_complete(last_call("req-4"))
        handler.close()
        assert [line["request_id"] for line in lines(out)][-1] == "req-4"
        loop.run_until_complete(last_call("req-5"))
        configure_logging("INFO", stream=io.StringIO())
        assert [line["request_id"] for line in lines(out)][-1] == "req-5"
    finally:
        loop.close()


async def test_a_line_held_for_another_loop_is_written_before_this_loops_lines(
    stream: io.StringIO,
) -> None:
    out = io.StringIO()
    _ours_only(out)
    logger = logging.getLogger(DISPATCH_LOGGER)

    async def last_call(request_id: str) -> None:
        dispatch(logger, request_id=request_id)
        asyncio.get_running_loop().stop()  # held for a loop that does not turn again

    other = asyncio.new_event_loop()
    try:
        thread = threading.Thread(target=other.run_until_complete, args=(last_call("req-other"),))
        thread.start()
        thread.join()
    finally:
        other.close()
    assert out.getvalue() == ""
    dispatch(logger, request_id="req-here")
    assert [line["request_id"] for line in lines(out)] == ["req-other"]
    await asyncio.sleep(0)
    assert [line["request_id"] for line in lines(out)] == ["req-other", "req-here"]


def test_lines_of_one_kind_share_their_parts_and_still_read_as_their_records(
    stream: io.StringIO,
) -> None:
    configure_logging("INFO", stream=stream, secrets=["sk-secret"])
    for n in range(3):  # the first builds the parts of this kind, the others reuse them
        direct, via_record = _dispatch_line_both_ways(
            stream, request_id=f"req-{n}", duration_ms=n / 7, action="system.echo"
        )
        assert direct.pop("ts")[:10] == via_record.pop("ts")[:10]
        assert direct == via_record
        assert direct["request_id"] == f"req-{n}" and direct["duration_ms"] == round(n / 7, 3)
    # a secret in a part kept for the kind is still found in the whole line
    direct, via_record = _dispatch_line_both_ways(stream, action="sk-secret", request_id="r")
    assert direct["action"] == via_record["action"] == REDACTED


@pytest.mark.process  # forks
def test_a_forked_child_does_not_write_the_lines_its_parent_held(
    stream: io.StringIO, tmp_path: Any
) -> None:
    path = tmp_path / "server.log"
    with open(path, "w", buffering=1, encoding="utf-8") as file:
        handler = _ours_only(file)
        logger = logging.getLogger(DISPATCH_LOGGER)

        async def last_call() -> None:
            dispatch(logger, request_id="req-parent")
            asyncio.get_running_loop().stop()  # held: the loop does not turn again

        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(last_call())
            pid = os.fork()
            if pid == 0:  # the child: one line of its own, outside any loop
                try:
                    dispatch(logger, request_id="req-child")
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
            handler.flush()
        finally:
            loop.close()
    assert sorted(json.loads(line)["request_id"] for line in path.read_text().splitlines()) == [
        "req-child",
        "req-parent",
    ]


async def test_a_held_line_is_made_with_the_time_it_was_logged_at(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = io.StringIO()
    _ours_only(out)
    logged_at = 1_767_225_600.25  # 2026-01-01T00:00:00.250Z
    monkeypatch.setattr(time, "time", lambda: logged_at)
    dispatch(logging.getLogger(DISPATCH_LOGGER))
    monkeypatch.setattr(time, "time", lambda: logged_at + 60)
    await asyncio.sleep(0)
    assert [line["ts"] for line in lines(out)] == ["2026-01-01T00:00:00.250Z"]


async def test_a_held_line_that_cannot_be_made_loses_no_other(
    stream: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    out = io.StringIO()
    handler = _ours_only(out)
    logger = logging.getLogger(DISPATCH_LOGGER)

    def broken() -> str:
        raise ValueError("no line")

    dispatch(logger, request_id="req-1")
    with handler.lock:  # type: ignore[union-attr]
        handler.write_line(broken, ())  # type: ignore[attr-defined]
    dispatch(logger, request_id="req-2")
    await asyncio.sleep(0)
    assert [line["request_id"] for line in lines(out)] == ["req-1", "req-2"]
    assert "Logging error" in capsys.readouterr().err
