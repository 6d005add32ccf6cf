"""Logging: human-readable lines on a terminal, JSON lines otherwise; secrets become ``***``.

``LOG_FORMAT`` picks the format (``console`` or ``json``; unset: console when stderr is a
terminal, else json, so log collectors get JSON and people get text). A console line reads::

    06:00:00 WARNING  everreach.orchestrator  local fallback failed  action=dm.send error=timeout

A JSON line looks like::

    {"ts": "2025-01-31T06:00:00.123Z", "level": "INFO", "logger": "everreach.dispatch",
     "msg": "dispatch research.keyword -> cloud ok", "event": "dispatch",
     "request_id": "…", "action": "research.keyword", "env": "cloud", "source": "cloud",
     "outcome": "ok", "duration_ms": 41.2, "attempts": 1, "error": null}

Fields passed with ``extra={...}`` become top-level keys (``key=value`` on the console).
``configure_logging`` also routes uvicorn's own loggers through the same handler, so a server's
stderr has one format. Third-party libraries (APScheduler, httpx, httpcore, uvicorn's access
log) log at WARNING and up unless ``LOG_LEVEL=DEBUG``: their INFO lines (one per probe, per job
run, per request) drown ours. Dispatch lines never carry params or results: those are user data
and may hold credentials.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import re
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import IO, Any
from urllib.parse import urlsplit

from json_encoders import c_encoder

REDACTED = "***"

DISPATCH_LOGGER = "everreach.dispatch"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
# uvicorn adds ``color_message``: the same text with terminal colour codes.
_RECORD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "color_message"}
)
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
_MAX_ACTION_CHARS = 200
# Loggers of libraries that say too much at INFO; they log from WARNING up unless LOG_LEVEL=DEBUG.
QUIET_LOGGERS = ("apscheduler", "httpx", "httpcore", "uvicorn.access")
# httpx's HTTPStatusError text ends with a link to a generic page about status codes: noise in
# our lines (e.g. "…for url '…/api/schedules'\nFor more information check: https://…/401").
_HTTPX_HINT = re.compile(r"\s*For more information check: \S+")
LOG_FORMATS = ("console", "json")
_SCALARS = frozenset({int, float, bool, type(None)})
_HTTPX_HINT_TEXT = "For more information"
_DISPATCH_MSG = "dispatch %s -> %s %s"
_FLAT_TYPES = _SCALARS | {str}
# json.dumps(ensure_ascii=False) built once; None where the interpreter has no C accelerator
# (then json.dumps writes every line).
_FLAT_ENCODER = c_encoder(ensure_ascii=False, allow_nan=True, default=str)


def redact(text: str, secrets: Iterable[str]) -> str:
    """Return ``text`` with every occurrence of each non-empty secret replaced by ``***``."""
    pattern = secrets_pattern(tuple(secrets))
    return text if pattern is None else pattern.sub(REDACTED, text)


@functools.lru_cache(maxsize=32)
def secrets_pattern(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    """One compiled pattern that matches any non-empty secret; ``None`` when there is none."""
    found = {s for s in secrets if s and s.strip()}
    # Longest first: an alternation takes the first that matches, so a secret that contains
    # another is replaced whole.
    ordered = sorted(found, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


def config_secrets(config: Any) -> list[str]:
    """The secret values of a ``HybridConfig``: keys, tokens, and passwords inside URLs."""
    from pydantic import SecretStr

    found: list[str] = []
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
            found.append(value)
        if isinstance(value, str) and "://" in value:
            try:
                parts = urlsplit(value)
                # A user name alone is often the token itself (https://token@host).
                secret = parts.password or parts.username
            except ValueError:
                secret = None
            if secret:
                found.append(secret)
    return [value for value in found if value and value.strip()]


class JsonFormatter(logging.Formatter):
    """Format each record as one JSON object on one line, with secrets redacted."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets: tuple[str, ...] = tuple(s for s in secrets if s and s.strip())
        # Each secret as it is and JSON-escaped, to look for in an encoded line: ``in`` per
        # secret (0.1 µs each) instead of one alternation regex (2 µs on a dispatch line).
        self._needles = tuple(
            set(self.secrets) | {json.dumps(s, ensure_ascii=False)[1:-1] for s in self.secrets}
        )

    def payload(self, record: logging.LogRecord, *, redacted: bool = True) -> dict[str, Any]:
        """The record's fields: ts, level, logger, msg, the ``extra=`` keys, exc, stack."""
        payload: dict[str, Any] = {
            "ts": _iso_utc(record.created),
            "level": _tidy_tree(record.levelname),
            "logger": _tidy_tree(record.name),
            "msg": _tidy_tree(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key[0] != "_" and key not in payload:
                kind = type(value)  # tidied here, inline for the usual scalars and plain text
                if kind not in _SCALARS and (kind is not str or _HTTPX_HINT_TEXT in value):
                    value = _tidy_tree(value)
                payload[key] = value
        if record.exc_info:
            payload["exc"] = _tidy_tree(self.formatException(record.exc_info))
        elif record.exc_text:
            payload["exc"] = _tidy_tree(record.exc_text)
        if record.stack_info:
            payload["stack"] = _tidy_tree(self.formatStack(record.stack_info))
        return _redact_tree(payload, self.secrets) if self.secrets and redacted else payload

    def format(self, record: logging.LogRecord) -> str:
        return self.line_of(self.payload(record, redacted=False))

    def holds_secret(self, line: str) -> bool:
        """Does ``line`` hold a secret, as it is or JSON-escaped?"""
        # A loop, not any() over a generator (which builds a generator per line): ~0.5 µs less.
        for needle in self._needles:  # noqa: SIM110
            if needle in line:
                return True
        return False

    def line_of(self, payload: dict[str, Any]) -> str:
        """Encode a payload not yet redacted as one line, with its secrets as ``***``."""
        # Encode first and search the line once for any secret (1 µs): only a line that holds
        # one pays for redacting field by field (a dozen µs per record when done always).
        line = _encode(payload)
        if self.holds_secret(line):
            line = _encode(_redact_tree(payload, self.secrets))
        return line


def _encode(payload: dict[str, Any]) -> str:
    # A payload of plain values holds no container, hence no cycle: the C encoder built once
    # writes the same text as ``json.dumps`` (which builds one per call) in half the time.
    if _FLAT_ENCODER is not None and _FLAT_TYPES.issuperset(map(type, payload.values())):
        return _FLAT_ENCODER(payload)
    return json.dumps(payload, ensure_ascii=False, default=str, separators=(", ", ": "))


class ConsoleFormatter(JsonFormatter):
    """Format each record as one line for a person: time, level, logger, message, key=value."""

    def format(self, record: logging.LogRecord) -> str:
        payload = self.payload(record)
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        line = f"{when} {payload.pop('level'):<8} {payload.pop('logger')}  {payload.pop('msg')}"
        payload.pop("ts")
        exc, stack = payload.pop("exc", None), payload.pop("stack", None)
        fields = " ".join(f"{key}={_console_value(value)}" for key, value in payload.items())
        text = f"{line}  {fields}" if fields else line
        return "\n".join(part for part in (text, exc, stack) if part)


class _JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Our stderr handler; a class of its own so ``configure_logging`` can find and replace it.

    Dispatch lines (``write_line``) logged inside a running event loop are held and written
    together, in one write, by a callback of that loop: once per loop turn instead of once per
    line. A busy server answers many requests a turn, and each write is a system call (~2 µs,
    and the CPU's caches it costs the code after it): in process, 8 and 32 requests a turn
    cost 3 to 4 µs less each; one request a turn (an idle server) ~3 µs more. The lines are
    made there too, one after the other (with the time each was logged at): the same code
    run many times in a row costs less than once per request among the rest (1 to 2 µs a
    line at 8 and 32 requests a turn). The callback
    runs at the start of the loop's next turn, before the loop waits for anything, so a line
    reaches the stream microseconds after its answer was handed to the transport. Held lines
    are written first whenever anything else is: another record (``emit``, so the stream
    keeps the order in which lines were logged), ``flush`` and ``close`` (``logging.shutdown``
    calls both at exit), a new stream, a line logged outside that loop.
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__(stream)
        self._held: list[tuple[Callable[..., str], tuple[Any, ...]]] = []
        self._held_for: asyncio.AbstractEventLoop | None = None  # whose callback writes them
        self._known_holder = False  # in _HOLDERS

    def write_line(self, make: Callable[..., str], args: tuple[Any, ...]) -> None:
        """Write the line ``make(*args)``, made without a record (``log_dispatch``), as
        ``emit`` would write a record's; made when it is written.

        The caller holds the handler's lock, as ``Handler.handle`` does around ``emit``.
        """
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None and loop is self._held_for:
            self._held.append((make, args))  # the callback that writes them is on its way
            return
        if self._held:
            self._write_held()  # held for another loop, or none, whose callback may never run
        if loop is None:
            self._write(make(*args) + self.terminator)
            return
        self._held.append((make, args))
        self._held_for = loop
        loop.call_soon(self._on_turn)
        if not self._known_holder:  # at its first held line, not at import
            _hold_fork_hook()
            _HOLDERS.add(self)
            self._known_holder = True

    def _on_turn(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._held_for is not None:
                self._write_held()

    def _write_held(self) -> None:
        """Make the held lines and write them, in one write (the caller holds the lock)."""
        held, self._held, self._held_for = self._held, [], None
        lines = []
        for make, args in held:
            try:
                lines.append(make(*args))
            except RecursionError:
                raise
            except Exception:  # one line that cannot be made loses no other
                _report_failed_write()
        if lines:
            terminator = self.terminator
            self._write(terminator.join(lines) + terminator)

    def _write(self, text: str) -> None:
        try:
            stream = self.stream
            stream.write(text)
            # A line-buffered text stream (stderr is one, redirected or not) has flushed
            # itself at the newline: ``flush`` would only call its flush again (~0.5 µs).
            if getattr(stream, "line_buffering", False) is not True or "\n" not in text:
                super().flush()
        except RecursionError:
            raise
        except Exception:
            _report_failed_write()

    def emit(self, record: logging.LogRecord) -> None:
        if self._held:  # Handler.handle holds the lock
            self._write_held()
        super().emit(record)

    def write_held(self) -> None:
        """Write the lines held, if any (a failed write is reported as ``emit`` reports it)."""
        with self.lock:  # type: ignore[union-attr]
            if self._held:
                self._write_held()

    def flush(self) -> None:
        self.write_held()
        super().flush()

    def setStream(self, stream: IO[str]) -> IO[str] | None:  # type: ignore[override]
        self.write_held()  # to the stream they were logged for
        return super().setStream(stream)

    def close(self) -> None:
        self.write_held()
        super().close()


def _report_failed_write() -> None:
    """What ``emit`` does with a failed write, without a record to name."""
    if logging.raiseExceptions:
        sys.stderr.write("--- Logging error ---\n")
        traceback.print_exc(file=sys.stderr)


# Handlers that have held lines: a forked child forgets what its parent held (it would write
# them again), as it forgets the parent's request ids (``envelope``).
_HOLDERS: weakref.WeakSet[_JsonHandler] = weakref.WeakSet()
_FORK_HOOKED = False


def _hold_fork_hook() -> None:
    global _FORK_HOOKED
    if not _FORK_HOOKED:
        os.register_at_fork(after_in_child=_forget_held)
        _FORK_HOOKED = True


def _forget_held() -> None:
    for handler in list(_HOLDERS):
        handler._held, handler._held_for = [], None


def configure_logging(
    level: str = "INFO",
    *,
    fmt: str | None = None,
    secrets: Iterable[str] = (),
    stream: IO[str] | None = None,
) -> None:
    """Send every log record, uvicorn's included, to stderr (or ``stream``) as one line each.

    ``fmt`` is ``console`` or ``json``; ``None`` picks console when the stream is a terminal.
    Idempotent: calling it again replaces the handler it installed before instead of adding a
    second one. Handlers installed by others (pytest's capture, for one) are left alone.
    """
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
    if fmt is not None and fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; use console or json")
    target = stream if stream is not None else sys.stderr
    if fmt is None:
        fmt = "console" if _is_terminal(target) else "json"
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _JsonHandler):
            handler.write_held()  # the lines it holds, if any, before the new handler's
            root.removeHandler(handler)
    handler = _JsonHandler(target)
    handler.setFormatter(ConsoleFormatter(secrets) if fmt == "console" else JsonFormatter(secrets))
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(
            numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
        )
    # uvicorn installs text handlers of its own and stops propagation; send its records to
    # the root handler instead, keeping the levels uvicorn was started with.
    for name in _UVICORN_LOGGERS:
        uv_logger = logging.getLogger(name)
        if name == "uvicorn.access" and not uv_logger.handlers and not uv_logger.propagate:
            continue  # uvicorn was started with its access log off (--no-access-log): keep it off
        for uv_handler in list(uv_logger.handlers):
            uv_logger.removeHandler(uv_handler)
        uv_logger.propagate = True


def log_dispatch(
    logger: logging.Logger,
    *,
    request_id: str,
    action: str,
    env: str,
    source: str | None,
    outcome: str,
    duration_ms: float,
    error: str | None = None,
    attempts: int = 0,
) -> None:
    """Log one dispatch as one line: INFO when it succeeded, WARNING when it failed.

    Takes no params or result on purpose: they are user data and can carry credentials.
    """
    # Plain text (what DispatchRecord holds) skips the getattr, which raises and catches an
    # AttributeError inside for a str: ~0.3 µs per field.
    error_v = error if error is None or type(error) is str else _enum_value(error)
    level = logging.INFO if error_v is None else logging.WARNING
    if not logger.isEnabledFor(level):
        return
    env_v = env if type(env) is str else _enum_value(env)
    source_v = source if source is None or type(source) is str else _enum_value(source)
    outcome_v = outcome if type(outcome) is str else _enum_value(outcome)
    action_v = action if len(action) <= _MAX_ACTION_CHARS else action[:_MAX_ACTION_CHARS] + "…"
    msg_args = (action_v, source_v or env_v, outcome_v)
    duration = round(float(duration_ms), 3)
    handler = _sole_json_handler(logger, level)
    if handler is not None:
        # The line JsonFormatter would write for the record below, built without the record
        # and without logging's handler chain: about 12 µs less per line, measured under wrk.
        # It is made when the handler writes it: inside a loop, with the other lines of this
        # turn, one after the other (the same code run 8 or 32 times in a row costs less).
        with handler.lock:  # type: ignore[union-attr]
            handler.write_line(
                _dispatch_line,
                (
                    handler.formatter,
                    logger.name,
                    level,
                    msg_args,
                    request_id,
                    env_v,
                    source_v,
                    duration,
                    attempts,
                    error_v,
                    time.time(),
                ),
            )
        return
    # What logger.log does, less its findCaller stack walk (the file and line of this function,
    # which no formatter of ours prints) and makeRecord's check of each extra name against the
    # record's own (these nine are not among them): about 3 µs per line. The record factory is
    # still the one logging is configured with.
    record = logging.getLogRecordFactory()(
        logger.name, level, __file__, 0, _DISPATCH_MSG, msg_args, None, "log_dispatch", None
    )
    record.__dict__.update(
        _dispatch_fields(
            request_id, action_v, env_v, source_v, outcome_v, duration, attempts, error_v
        )
    )
    logger.handle(record)


def _dispatch_fields(
    request_id: str,
    action: str,
    env: str,
    source: str | None,
    outcome: str,
    duration_ms: float,
    attempts: int,
    error: str | None,
) -> dict[str, Any]:
    """The ``extra`` fields of a dispatch line, in the order the line shows them."""
    return {
        "event": "dispatch",
        "request_id": request_id,
        "action": action,
        "env": env,
        "source": source,
        "outcome": outcome,
        "duration_ms": duration_ms,
        "attempts": attempts,
        "error": error,
    }


def _dispatch_line(
    formatter: JsonFormatter,
    logger_name: str,
    level: int,
    msg_args: tuple[str, Any, str],
    request_id: Any,
    env: Any,
    source: Any,
    duration: Any,
    attempts: Any,
    error: Any,
    created: float,
) -> str:
    """The line ``formatter`` writes for a dispatch record of these fields, logged at
    ``created``: by a template when the fields are plain, else field by field.

    The template writes what the encoder writes for these fields: ~3 µs less per line than
    encoding a dict. A line with the httpx hint or a secret in it is made the long way
    (``_direct_line``), which tidies and redacts field by field (a property test keeps the two
    the same).
    """
    action, _, outcome = msg_args
    if (
        type(attempts) is int
        and type(duration) is float
        and math.isfinite(duration)
        and type(request_id) is type(action) is type(outcome) is str
        and (type(env) is str or env is None)
        and (type(source) is str or source is None)
        and (type(error) is str or error is None)
    ):
        # The parts before and after the request id are the same for every line of one
        # action, path and outcome: built once each, ~1 µs a line less.
        key = (logger_name, level, action, env, source, outcome)
        parts = _LINE_PARTS.get(key)
        if parts is None:
            parts = _line_parts(logger_name, level, msg_args, env, source)
            if len(_LINE_PARTS) < _MAX_LINE_PARTS:
                _LINE_PARTS[key] = parts
        error_text = "null" if error is None else encode_basestring(error)
        line = (
            f'{{"ts": "{_iso_utc(created)}", {parts[0]}"request_id": '
            f'{encode_basestring(request_id)}, {parts[1]}"duration_ms": {duration!r}, '
            f'"attempts": {attempts!r}, "error": {error_text}}}'
        )
        if _HTTPX_HINT_TEXT not in line and not formatter.holds_secret(line):
            return line
    fields = _dispatch_fields(request_id, action, env, source, outcome, duration, attempts, error)
    return _direct_line(formatter, logger_name, level, msg_args, fields, created)


def _line_parts(
    logger_name: str, level: int, msg_args: tuple[str, Any, str], env: Any, source: Any
) -> tuple[str, str]:
    """What a dispatch line says before its request id (level to event) and after it (action
    to outcome)."""
    action, _, outcome = msg_args
    return (
        f'{_line_head(logger_name, level)}"msg": {_text(_DISPATCH_MSG % msg_args)}, '
        f'"event": "dispatch", ',
        f'"action": {_text(action)}, "env": {_text(env)}, "source": {_text(source)}, '
        f'"outcome": {_text(outcome)}, ',
    )


# The parts of dispatch lines by (logger, level, action, env, source, outcome); beyond this
# many kinds (unknown action names, say), made per line: at most ~0.5 MiB kept.
_LINE_PARTS: dict[tuple[str, int, str, Any, Any, str], tuple[str, str]] = {}
_MAX_LINE_PARTS = 1024


def _direct_line(
    formatter: JsonFormatter,
    logger_name: str,
    level: int,
    msg_args: tuple[Any, ...],
    fields: dict[str, Any],
    created: float,
) -> str:
    """The line ``formatter`` writes for a dispatch record of these fields, made without one."""
    payload: dict[str, Any] = {
        "ts": _iso_utc(created),
        "level": logging.getLevelName(level),
        "logger": _tidy_tree(logger_name),
        "msg": _tidy_tree(_DISPATCH_MSG % msg_args),
    }
    for key, value in fields.items():
        payload[key] = _tidy_tree(value) if type(value) is str else value
    return formatter.line_of(payload)


@functools.lru_cache(maxsize=16)
def _line_head(logger_name: str, level: int) -> str:
    """The ``"level": …, "logger": …, `` part of a JSON line: one per logger and level."""
    return f'"level": "{logging.getLevelName(level)}", "logger": {_text(logger_name)}, '


def _text(value: str | None) -> str:
    return "null" if value is None else encode_basestring(value)  # type: ignore[no-any-return]


def _sole_json_handler(logger: logging.Logger, level: int) -> _JsonHandler | None:
    """Our JSON handler when a record of ``logger`` at ``level`` would reach it and only it.

    Then nothing but its line can come of the record: no filter, no other handler (pytest's
    capture, say), no record factory of someone else's, no formatter but ours.
    """
    if logging.getLogRecordFactory() is not logging.LogRecord:
        return None
    found: logging.Handler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if level >= handler.level:
                if found is not None:
                    return None
                found = handler
        current = current.parent if current.propagate else None  # type: ignore[assignment]
    if type(found) is _JsonHandler and not found.filters and type(found.formatter) is JsonFormatter:
        return found
    return None


def _enum_value(value: Any) -> Any:
    return getattr(value, "value", value)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _console_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False) if (not value or " " in value) else value
    return json.dumps(value, ensure_ascii=False, default=str)


def _tidy_tree(value: Any) -> Any:
    """Drop httpx's "For more information check: …" hint from every string."""
    if type(value) in _SCALARS:  # most fields: nothing to tidy, no isinstance chain
        return value
    if isinstance(value, str):
        return _HTTPX_HINT.sub("", value) if _HTTPX_HINT_TEXT in value else value
    if isinstance(value, Mapping):
        return {key: _tidy_tree(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_tidy_tree(item) for item in value]
    return value


def _iso_utc(created: float) -> str:
    second = int(created)
    micro = round((created - second) * 1e6)  # as datetime.fromtimestamp rounds
    if micro >= 1_000_000:
        second, micro = second + 1, micro - 1_000_000
    # Records of one second share the prefix: strftime once per second, not per record, and
    # the last second kept in one tuple, read and replaced whole (so threads that log at once
    # never pair one second with another's text): an lru_cache call costs ~0.3 µs more.
    global _LAST_SECOND
    last = _LAST_SECOND
    if last[0] != second:
        text = datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        last = _LAST_SECOND = (second, text)
    return f"{last[1]}{micro // 1000:03d}Z"


_LAST_SECOND: tuple[int | None, str] = (None, "")


def _redact_tree(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, Mapping):
        return {key: _redact_tree(item, secrets) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_tree(item, secrets) for item in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    return redact(str(value), secrets)
