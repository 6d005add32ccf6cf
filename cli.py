"""The ``everreach`` command line: run the server, send it actions, read its state.

    everreach serve [--host H] [--port P]          run this instance (uvicorn, create_app(config))
    everreach dispatch ACTION [-p key=value ...]   POST /dispatch, print the envelope
    everreach batch FILE.json|-                    many actions, bounded concurrency, progress bar
    everreach status | cost | outbox [--json]      GET /status as tables (or raw JSON)
    everreach routes [--json]                      the route table; needs no server

Exit codes (``ExitCode``): 0 ok; 1 the action failed or no server answered; 2 bad usage or bad
configuration; 3 queued in the outbox (HTTP 202). Configuration comes only from ``HybridConfig``
(the environment and ``.env``); ``--url`` and ``--token`` override LOCAL_ENDPOINT and
LOCAL_API_TOKEN for one call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from config.hybrid_config import HybridConfig
from errors import ConfigError

SOURCES = ("local", "cloud", "local_fallback", "cache", "outbox")
NO_RESPONSE = "no_response"  # the client's own error code: the server gave no usable answer
DISPATCH_TIMEOUT_S = 120.0  # covers a cloud call with its retries (4 x 30 s by default)
VIEW_TIMEOUT_S = 10.0
MAX_CONCURRENT_LIMIT = 32  # the server's /batch limit; the client keeps the same bound


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    QUEUED = 3


class CliFailure(Exception):
    """A failure the CLI reports as one line on stderr, with its exit code."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Server:
    """Where a running instance answers, and how to authenticate to it."""

    url: str
    token: str | None = None
    timeout_s: float = VIEW_TIMEOUT_S

    @classmethod
    def from_config(
        cls, config: HybridConfig, *, url: str | None = None, token: str | None = None,
        timeout_s: float = VIEW_TIMEOUT_S,
    ) -> Server:
        """``--url``, else LOCAL_ENDPOINT, else http://HOST:PORT (a wildcard bind as loopback)."""
        if url is None:
            url = config.local_endpoint or _default_url(config.host, config.port)
        return cls(url.rstrip("/"), token or config.secret("local_api_token"), timeout_s)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def _default_url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass(slots=True)
class Io:
    """The streams of one CLI run (looked up at call time, so tests can capture them)."""

    out: Console
    err: Console

    @classmethod
    def system(cls) -> Io:
        out = Console(file=sys.stdout, markup=False, highlight=False, emoji=False)
        if not out.is_terminal:
            out.width = max(out.width, 120)  # piped tables: wide rows rather than folded words
        err = Console(file=sys.stderr, markup=False, highlight=False, emoji=False)
        return cls(out, err)

    def json(self, data: Any) -> None:
        print(json.dumps(data, indent=2, ensure_ascii=False), file=self.out.file, flush=True)

    def show(self, parts: Sequence[RenderableType]) -> None:
        for index, part in enumerate(parts):
            if index:
                self.out.print()
            self.out.print(part)

    def say(self, message: str) -> None:
        print(f"everreach: {message}", file=self.err.file, flush=True)


# -- talking to a running server ------------------------------------------------------------------


def _request(server: Server, method: str, path: str, body: Any = None) -> httpx.Response:
    # trust_env=False: the server is almost always on loopback; an HTTP_PROXY must not catch it.
    try:
        with httpx.Client(timeout=server.timeout_s, trust_env=False) as client:
            return client.request(method, server.url + path, json=body, headers=server.headers())
    except (httpx.ConnectError, httpx.ConnectTimeout):
        raise CliFailure(f"no server at {server.url}; start it with: everreach serve") from None
    except httpx.TimeoutException:
        raise CliFailure(
            f"{method} {server.url}{path} got no answer within {server.timeout_s:g} s "
            f"(raise it with --timeout)"
        ) from None
    except httpx.HTTPError as exc:
        raise CliFailure(f"{method} {server.url}{path} failed: {exc}") from None


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise CliFailure(
            f"{response.request.method} {response.request.url} answered HTTP "
            f"{response.status_code} that is not JSON: {response.text[:200]!r}"
        ) from None


def _token_problem(server: Server) -> str:
    if server.token:
        return f"{server.url} refused the token (LOCAL_API_TOKEN or --token)"
    return (f"{server.url} needs a token: set LOCAL_API_TOKEN (environment or .env) "
            f"or pass --token")


def fetch_status(server: Server) -> dict[str, Any]:
    """GET /status; ``CliFailure`` when there is no server, a wrong token or an odd answer."""
    response = _request(server, "GET", "/status")
    if response.status_code == 401:
        raise CliFailure(_token_problem(server))
    if response.status_code != 200:
        raise CliFailure(f"GET /status answered HTTP {response.status_code}: "
                         f"{response.text[:200]}")
    body = _body(response)
    if not isinstance(body, dict):
        raise CliFailure("GET /status did not answer a JSON object")
    return body


async def send_batch(
    server: Server,
    items: Sequence[Mapping[str, Any]],
    *,
    max_concurrent: int = 3,
    on_result: Callable[[int, dict[str, Any]], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[dict[str, Any]]:
    """POST each item to /dispatch, at most ``max_concurrent`` at once; envelopes in input order.

    An item the server gave no usable answer for gets an envelope with error ``no_response``;
    one failing item never stops the others.
    """
    semaphore = asyncio.Semaphore(max_concurrent)
    results: list[dict[str, Any]] = [{} for _ in items]
    limits = httpx.Limits(max_connections=max_concurrent, max_keepalive_connections=max_concurrent)
    async with httpx.AsyncClient(
        base_url=server.url, headers=server.headers(), timeout=server.timeout_s, limits=limits,
        transport=transport, trust_env=False,
    ) as client:

        async def one(index: int, item: Mapping[str, Any]) -> None:
            async with semaphore:
                results[index] = await _dispatch_one(client, item)
            if on_result is not None:
                on_result(index, results[index])

        await asyncio.gather(*(one(i, item) for i, item in enumerate(items)))
    return results


async def _dispatch_one(client: httpx.AsyncClient, item: Mapping[str, Any]) -> dict[str, Any]:
    action = str(item.get("action", ""))
    try:
        response = await client.post("/dispatch", json=dict(item))
        body = response.json()
    except httpx.HTTPError as exc:
        detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
    except ValueError:
        detail = f"HTTP {response.status_code} with a body that is not JSON"
    else:
        if isinstance(body, dict) and "ok" in body:
            return body
        detail = f"HTTP {response.status_code}: {json.dumps(body)[:200]}"
    return {"ok": False, "action": action, "source": None, "result": None,
            "error": NO_RESPONSE, "detail": detail}


def summarize(results: Sequence[Mapping[str, Any]], duration_ms: float) -> dict[str, Any]:
    """The same summary ``POST /batch`` answers: totals, by source, duration."""
    by_source: dict[str, int] = {}
    for result in results:
        key = str(result.get("source") or "none")
        by_source[key] = by_source.get(key, 0) + 1
    return {
        "total": len(results),
        "ok": sum(1 for r in results if r.get("ok")),
        "failed": sum(1 for r in results if not r.get("ok") and not r.get("queued")),
        "queued": sum(1 for r in results if r.get("queued")),
        "by_source": by_source,
        "duration_ms": round(duration_ms, 3),
    }


# -- commands ---------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, config: HybridConfig, io: Io) -> int:
    changes = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if changes:
        config = config.replace(**changes)
    if not config.binds_loopback and config.local_api_token is None:
        raise ConfigError(
            f"HOST={config.host} would expose /dispatch beyond this machine and LOCAL_API_TOKEN "
            f"is not set; set LOCAL_API_TOKEN (python3 -c 'import secrets; "
            f"print(secrets.token_urlsafe(32))') or serve on --host 127.0.0.1"
        )
    import uvicorn

    from local_server import create_app

    app = create_app(config)
    failures: list[ConfigError] = []
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        started = False
        try:
            async with inner(app_) as state:
                started = True
                yield state
        except ConfigError as exc:
            if not started:
                failures.append(exc)  # reported as one line below, not as a traceback
            raise

    app.router.lifespan_context = lifespan
    url = _default_url(config.host, config.port)

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                io.say(f"EVERREACH_ENV={config.everreach_env.value} serving at {url} "
                       f"(status page {url}/); stop with Ctrl-C")

    # log_config=None: no text handlers of uvicorn's; the lifespan switches every logger to the
    # project's JSON lines, so the output is uniform (and a start-up failure is one line).
    server = AnnouncingServer(uvicorn.Config(
        app, host=config.host, port=config.port, lifespan="on", log_config=None,
        log_level=args.log_level, server_header=False,
    ))
    quiet = _DropErrorsAfterFailure(failures)
    uvicorn_logger = logging.getLogger("uvicorn.error")
    uvicorn_logger.addFilter(quiet)
    try:
        server.run()
    except KeyboardInterrupt:
        return ExitCode.OK
    except SystemExit:  # uvicorn exits with 3 when start-up fails or it cannot bind
        if server.started:
            raise
        if failures:
            raise failures[0] from None
        raise CliFailure(f"the server did not start on {config.host}:{config.port} (the log "
                         f"above says why; a port in use is the usual reason)") from None
    finally:
        uvicorn_logger.removeFilter(quiet)
    return ExitCode.OK


class _DropErrorsAfterFailure(logging.Filter):
    """Drop uvicorn's traceback of a ``ConfigError`` the CLI reports itself."""

    def __init__(self, failures: Sequence[BaseException]) -> None:
        super().__init__()
        self.failures = failures

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.failures and record.levelno >= logging.ERROR)


def cmd_dispatch(args: argparse.Namespace, config: HybridConfig, io: Io) -> int:
    server = _server(args, config, DISPATCH_TIMEOUT_S)
    body: dict[str, Any] = {"action": args.action, "params": _params(args)}
    if args.force_env:
        body["force_env"] = args.force_env
    if args.idempotency_key:
        body["idempotency_key"] = args.idempotency_key
    response = _request(server, "POST", "/dispatch", body)
    envelope = _body(response)
    io.json(envelope)
    if response.status_code == 401:
        raise CliFailure(_token_problem(server))
    if response.status_code == 202:
        outbox_id = envelope.get("outbox_id") if isinstance(envelope, dict) else None
        io.say(f"queued in the outbox (id {outbox_id}); it is sent when the cloud is reachable")
        return ExitCode.QUEUED
    if response.status_code == 200 and isinstance(envelope, dict) and envelope.get("ok"):
        return ExitCode.OK
    error = envelope.get("error") if isinstance(envelope, dict) else None
    detail = envelope.get("detail") if isinstance(envelope, dict) else None
    io.say(f"{args.action} failed (HTTP {response.status_code}): {error or 'error'}"
           + (f": {detail}" if detail else ""))
    return ExitCode.FAILED


def cmd_batch(args: argparse.Namespace, config: HybridConfig, io: Io) -> int:
    if not 1 <= args.max_concurrent <= MAX_CONCURRENT_LIMIT:
        raise CliFailure(f"--max-concurrent must be between 1 and {MAX_CONCURRENT_LIMIT}",
                         ExitCode.USAGE)
    items = read_items(args.file)
    server = _server(args, config, DISPATCH_TIMEOUT_S)
    started = time.perf_counter()
    if args.server_side:
        output = _server_side_batch(server, items, args, io)
    else:
        health = _request(server, "GET", "/health")  # one clear message if nothing listens
        if health.status_code >= 500:
            raise CliFailure(f"{server.url}/health answered HTTP {health.status_code}")
        results = _client_side_batch(server, items, args, io)
        output = {"results": results,
                  "summary": summarize(results, (time.perf_counter() - started) * 1000)}
    io.json(output)
    summary = output.get("summary") or summarize(output.get("results", []), 0.0)
    sources = ", ".join(f"{k} {v}" for k, v in sorted(summary.get("by_source", {}).items()))
    io.say(f"batch: {summary['total']} items, {summary['ok']} ok, {summary['failed']} failed, "
           f"{summary['queued']} queued in {summary['duration_ms'] / 1000:.2f} s"
           + (f" (by source: {sources})" if sources else ""))
    if summary["failed"]:
        return ExitCode.FAILED
    return ExitCode.QUEUED if summary["queued"] else ExitCode.OK


def _client_side_batch(
    server: Server, items: list[dict[str, Any]], args: argparse.Namespace, io: Io
) -> list[dict[str, Any]]:
    tally = {"ok": 0, "failed": 0, "queued": 0}
    progress = Progress(
        TextColumn("batch"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[tally]}"), TimeElapsedColumn(),
        console=io.err, disable=args.no_progress,
    )
    task = progress.add_task("batch", total=len(items), tally="")

    def on_result(index: int, envelope: dict[str, Any]) -> None:
        key = "queued" if envelope.get("queued") else "ok" if envelope.get("ok") else "failed"
        tally[key] += 1
        progress.update(task, advance=1, tally=", ".join(f"{v} {k}" for k, v in tally.items()))

    with progress:
        return asyncio.run(send_batch(server, items, max_concurrent=args.max_concurrent,
                                      on_result=on_result))


def _server_side_batch(
    server: Server, items: list[dict[str, Any]], args: argparse.Namespace, io: Io
) -> dict[str, Any]:
    progress = Progress(SpinnerColumn(), TextColumn(f"batch of {len(items)} on the server"),
                        TimeElapsedColumn(), console=io.err, disable=args.no_progress)
    with progress:
        progress.add_task("batch", total=None)
        response = _request(server, "POST", "/batch",
                            {"items": items, "max_concurrent": args.max_concurrent})
    if response.status_code == 401:
        raise CliFailure(_token_problem(server))
    body = _body(response)
    if response.status_code != 200 or not isinstance(body, dict) or "results" not in body:
        raise CliFailure(f"POST /batch answered HTTP {response.status_code}: "
                         f"{json.dumps(body)[:300]}")
    return body


def read_items(source: str) -> list[dict[str, Any]]:
    """Read a batch: a JSON list of {action, params?, force_env?} (or {"items": [...]})."""
    name = "stdin" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliFailure(f"cannot read {name}: {exc.strerror or exc}", ExitCode.USAGE) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliFailure(f"{name}: not valid JSON at line {exc.lineno} column {exc.colno}: "
                         f"{exc.msg}", ExitCode.USAGE) from None
    if isinstance(data, dict) and "items" in data:
        data = data["items"]
    if not isinstance(data, list):
        raise CliFailure(f"{name}: must be a JSON list of {{\"action\": ..., \"params\": {{...}}}}",
                         ExitCode.USAGE)
    items = []
    for index, entry in enumerate(data):
        where = f"{name}: item {index}"
        if not isinstance(entry, dict) or not isinstance(entry.get("action"), str):
            raise CliFailure(f"{where} must be an object with an 'action' string", ExitCode.USAGE)
        params = entry.get("params") or {}
        if not isinstance(params, dict):
            raise CliFailure(f"{where}: 'params' must be a JSON object", ExitCode.USAGE)
        item: dict[str, Any] = {"action": entry["action"], "params": params}
        if entry.get("force_env") is not None:
            item["force_env"] = entry["force_env"]
        items.append(item)
    return items


def cmd_status(args: argparse.Namespace, config: HybridConfig, io: Io) -> int:
    status = fetch_status(_server(args, config, VIEW_TIMEOUT_S))
    if args.json:
        io.json(status)
    else:
        io.show(status_view(status))
    return ExitCode.OK


def cmd_cost(args: argparse.Namespace, config: HybridConfig, io: Io) -> int:
    from cost_rates import CostRates

    rates = CostRates.load(config.cost_rates_file).table()
    try:
        cost: dict[str, Any] | None = fetch_status(_server(args, config, VIEW_TIMEOUT_S))["cost"]
        problem = None
    except CliFailure as exc:
        cost, problem = None, exc  # the rates need no server; print them anyway
    if args.json:
        io.json({"cost": cost, "rates": rates})
    else:
        io.show(cost_view(cost, rates))
    if problem is not None:
        raise CliFailure(f"month-to-date spend unknown: {problem}", problem.code)
    return ExitCode.OK


def cmd_outbox(args: argparse.Namespace, config: HybridConfig, io: Io) -> int:
    status = fetch_status(_server(args, config, VIEW_TIMEOUT_S))
    if args.json:
        io.json({"outbox": status.get("outbox"), "dead_letters": status.get("dead_letters")})
    else:
        io.show(outbox_view(status))
    return ExitCode.OK


def cmd_routes(args: argparse.Namespace, config: HybridConfig, io: Io) -> int:
    from action_classifier import ActionClassifier
    from route_table import RouteTable

    table = RouteTable.load(config.route_table_path)
    classifier = ActionClassifier()
    rows = []
    for row in table.rows():
        kind = classifier.classify(row["action"]).value
        preferred = row["preferred_env"]
        hybrid = preferred if preferred != "auto" else ("cloud" if kind == "api" else "local")
        rows.append({**row, "classifier_kind": kind, "hybrid_env": hybrid})
    if args.json:
        io.json({"source": table.source, "routes": rows})
    else:
        io.out.print(routes_view(rows, table.source))
    return ExitCode.OK


def _server(args: argparse.Namespace, config: HybridConfig, timeout_s: float) -> Server:
    return Server.from_config(config, url=args.url, token=args.token,
                              timeout_s=args.timeout_s or timeout_s)


def _params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if args.params is not None:
        try:
            loaded = json.loads(args.params)
        except json.JSONDecodeError as exc:
            raise CliFailure(f"--params is not valid JSON: {exc.msg}", ExitCode.USAGE) from None
        if not isinstance(loaded, dict):
            raise CliFailure("--params must be a JSON object, e.g. '{\"keyword\": \"ai\"}'",
                             ExitCode.USAGE)
        params.update(loaded)
    for pair in args.param or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise CliFailure(f"-p {pair!r}: use key=value", ExitCode.USAGE)
        try:
            params[key] = json.loads(raw)  # 3 -> 3, true -> True, {"a": 1} -> dict
        except json.JSONDecodeError:
            params[key] = raw  # anything else is a string: -p to=alice
    return params


# -- views (pure: a /status body in, rich renderables out) ------------------------------------------


def _kv(title: str, pairs: Sequence[tuple[str, RenderableType]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None,
                  padding=(0, 2, 0, 0))
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
    if not iso:
        return "-"
    try:
        at = datetime.fromisoformat(str(iso))
    except ValueError:
        return str(iso)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    delta = (at - (now or datetime.now(UTC))).total_seconds()
    relative = f"in {_duration(delta)}" if delta >= 0 else f"{_duration(delta)} ago"
    return f"{at.isoformat(timespec='seconds')} ({relative})"


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
        ("ledger", f"{cost.get('store', '-')}" + ("" if cost.get("healthy", True)
                                                   else f" (unhealthy: {cost.get('error')})")),
    ]
    month = f"{cost.get('month', '?')}, {cost.get('timezone', 'UTC')}"
    return _kv(f"Cost this month ({month})", pairs)


def _counts_table(counts: Mapping[str, Any]) -> RenderableType:
    if not counts:
        return Text("Dispatches: none yet.")
    seen = {key for row in counts.values() if isinstance(row, dict) for key in row}
    columns = [k for k in SOURCES if k in seen] + sorted(seen - set(SOURCES))
    table = Table(title="Dispatches by source", title_justify="left")
    table.add_column("action")
    for column in [*columns, "total"]:
        table.add_column(column.replace("_", " "), justify="right")
    for action in sorted(counts):
        row = counts[action] if isinstance(counts[action], dict) else {}
        table.add_row(action, *(str(row.get(k, "")) for k in columns),
                      str(sum(int(_num(row.get(k))) for k in columns)))
    return table


def status_view(status: Mapping[str, Any], now: datetime | None = None) -> list[RenderableType]:
    """Tables of a /status body: env, online, cost vs caps, counts, circuits, outbox, jobs."""
    env = str(status.get("env", "?"))
    if status.get("connectivity"):
        online = "cloud online" if status.get("online") else "cloud offline"
    else:
        online = "serving as the cloud" if env == "cloud" else "no cloud configured"
    head = (f"EverReach  env {env} · {online}"
            + (" · OFFLINE_MODE" if status.get("offline_mode") else "")
            + f" · v{status.get('version', '?')} · up {_duration(_num(status.get('uptime_sec')))}")
    parts: list[RenderableType] = [Text(head, style="bold")]
    parts.append(_cost_table(status.get("cost") or {}))
    parts.append(_counts_table(status.get("dispatch_counts") or {}))
    circuits = status.get("circuits") or {}
    circuit_rows: list[tuple[str, RenderableType]] = [("cloud", str(circuits.get("cloud")
                                                                     or "not configured"))]
    local = circuits.get("local") or {}
    circuit_rows += [(f"local {action}", str(state)) for action, state in sorted(local.items())]
    if not local:
        circuit_rows.append(("local", "every handler closed"))
    parts.append(_kv("Circuits", circuit_rows))
    parts.extend(outbox_view(status))
    parts.append(_jobs_table(status.get("scheduler"), now))
    bus = status.get("bus") or {}
    cache = status.get("cache") or {}
    parts.append(_kv("Bus and cache", [
        ("bus backend", str(bus.get("backend", "?"))),
        ("bus backlog", str(bus.get("backlog", 0))),
        ("cache entries", str(cache.get("entries", 0))),
    ]))
    return parts


def _jobs_table(scheduler: Any, now: datetime | None) -> RenderableType:
    if not isinstance(scheduler, dict):
        return Text("Jobs: the scheduler is not running.")
    table = Table(title=f"Jobs ({scheduler.get('timezone', '?')})", title_justify="left")
    for column in ("job", "action", "trigger", "next run", "runs", "last"):
        table.add_column(column, justify="right" if column == "runs" else "left")
    for job in scheduler.get("jobs") or []:
        table.add_row(str(job.get("id")) + (" (mirrored)" if job.get("mirrored") else ""),
                      str(job.get("action")), str(job.get("trigger")),
                      _when(job.get("next_run_time"), now), str(job.get("runs", 0)),
                      str(job.get("last_outcome") or "-"))
    return table


def outbox_view(status: Mapping[str, Any]) -> list[RenderableType]:
    """The outbox: pending depth, dead letters and their errors."""
    outbox = status.get("outbox") or {}
    parts: list[RenderableType] = [_kv("Outbox", [
        ("pending", str(outbox.get("depth", 0))),
        ("dead letters", str(outbox.get("dead_letters", 0))),
        ("oldest pending", _when(outbox.get("oldest_pending_at"))),
    ])]
    dead = status.get("dead_letters") or []
    if dead:
        table = Table(title="Dead letters", title_justify="left")
        for column in ("id", "action", "attempts", "error"):
            table.add_column(column, justify="right" if column == "attempts" else "left")
        for item in dead:
            table.add_row(str(item.get("id")), str(item.get("action")),
                          str(item.get("attempts")), str(item.get("error")))
        parts.append(table)
    return parts


def cost_view(cost: Mapping[str, Any] | None, rates: Mapping[str, str]) -> list[RenderableType]:
    """The cost section of /status (if known) and the $/call table."""
    parts: list[RenderableType] = []
    if cost is not None:
        parts.append(_cost_table(cost))
        by_action = cost.get("by_action") or {}
        if by_action:
            spend = Table(title="Spent by action", title_justify="left")
            spend.add_column("action")
            spend.add_column("spent", justify="right")
            for action, usd in sorted(by_action.items(), key=lambda kv: -_num(kv[1])):
                spend.add_row(action, _usd(usd))
            parts.append(spend)
    table = Table(title="Rates ($/cloud call)", title_justify="left",
                  caption="* is the default", caption_justify="left")
    table.add_column("action")
    table.add_column("$/call", justify="right")
    for key, usd in rates.items():
        table.add_row(key, _usd(usd))
    parts.append(table)
    return parts


def routes_view(rows: Sequence[Mapping[str, Any]], source: str) -> Table:
    """The route table with the classifier's kind and where hybrid mode sends each action."""
    table = Table(title=f"Routes ({source})", title_justify="left",
                  caption="actions not listed: auto (the classifier decides), fallback local, "
                          "side effect assumed", caption_justify="left")
    for column in ("action", "preferred", "fallback", "side effect", "classifier", "hybrid"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["action"], row["preferred_env"], row["fallback_env"],
                      "yes" if row["side_effect"] else "no", row["classifier_kind"],
                      row["hybrid_env"])
    return table


# -- the parser and main ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="everreach",
        description="EverReach hybrid orchestrator: serve, dispatch actions, read the status.",
        epilog="exit codes: 0 ok, 1 failed or no server, 2 usage or configuration, 3 queued",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--url", help="the server's base URL (default: LOCAL_ENDPOINT, "
                                      "else http://HOST:PORT)")
    client.add_argument("--token", help="bearer token (default: LOCAL_API_TOKEN; prefer the "
                                        "variable: arguments show in the process list)")
    client.add_argument("--timeout", dest="timeout_s", type=float, metavar="SECONDS",
                        help="HTTP timeout")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print raw JSON")

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="bind address (default: HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: PORT, 8080)")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(handler=cmd_serve)

    dispatch = sub.add_parser("dispatch", parents=[client], help="run one action")
    dispatch.add_argument("action", help="service.topic, e.g. research.keyword")
    dispatch.add_argument("--params", metavar="JSON", help="params as a JSON object")
    dispatch.add_argument("-p", "--param", action="append", metavar="KEY=VALUE",
                          help="one param (VALUE as JSON if it parses, else a string); repeat")
    dispatch.add_argument("--force-env", choices=["local", "cloud"])
    dispatch.add_argument("--idempotency-key", metavar="KEY",
                          help="8-200 characters; a repeat returns the first answer")
    dispatch.set_defaults(handler=cmd_dispatch)

    batch = sub.add_parser("batch", parents=[client], help="run a JSON list of actions")
    batch.add_argument("file", metavar="FILE.json|-", help="[{action, params}, ...]; - is stdin")
    batch.add_argument("--max-concurrent", type=int, default=3, metavar="N",
                       help="items in flight at once (1-32, default 3)")
    batch.add_argument("--server-side", action="store_true",
                       help="send one POST /batch instead of one /dispatch per item")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    batch.set_defaults(handler=cmd_batch)

    for name, handler, text in (
        ("status", cmd_status, "env, online, cost, counts, circuits, outbox, jobs"),
        ("cost", cmd_cost, "month-to-date spend against the caps, and the rates"),
        ("outbox", cmd_outbox, "pending depth and dead letters"),
    ):
        sub.add_parser(name, parents=[client, as_json], help=text).set_defaults(handler=handler)
    routes = sub.add_parser("routes", parents=[as_json], help="the route table (no server)")
    routes.set_defaults(handler=cmd_routes)
    return parser


def main(argv: list[str] | None = None, *, config: HybridConfig | None = None) -> int:
    """Run the command line; ``config`` replaces reading the environment (tests)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    io = Io.system()
    try:
        settings = config if config is not None else HybridConfig.load()
        return int(args.handler(args, settings, io))
    except ConfigError as exc:
        message = " ".join(str(exc).split()).removeprefix("invalid configuration: ")
        io.say(f"configuration error: {message}")
        return ExitCode.USAGE
    except CliFailure as exc:
        io.say(str(exc))
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
