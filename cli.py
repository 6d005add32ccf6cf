"""The ``everreach`` command line: run the server, send it actions, read its state.

    everreach serve [--host H] [--port P]          run this instance (uvicorn, create_app(config))
    everreach dispatch ACTION [-p key=value ...]   POST /dispatch, print the envelope
    everreach batch FILE.json|-                    many actions, bounded concurrency, progress bar
    everreach status | cost | outbox [--json]      GET /status as tables (or raw JSON)
    everreach outbox retry ID|--all [--yes]        queue dead letters again (POST /outbox/ID/retry)
    everreach outbox drop ID [--yes]               drop a dead letter or cancel a queued item
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
import errno
import json
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
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

from cli_client import (
    DISPATCH_TIMEOUT_S,
    VIEW_TIMEOUT_S,
    CliFailure,
    ExitCode,
    Server,
    default_url,
    fetch_status,
    json_body,
    request,
    send_batch,
    summarize,
    token_problem,
)
from cli_views import cost_view, outbox_view, routes_view, status_view
from config.hybrid_config import HybridConfig
from errors import ConfigError
from local_batch import MAX_CONCURRENT_LIMIT  # the server's /batch bound; the client keeps it


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

    def confirm(self, question: str) -> bool:
        """Ask on stderr, read a yes from stdin; anything else (or no input) is no."""
        print(f"everreach: {question} [y/N] ", end="", file=self.err.file, flush=True)
        answer = sys.stdin.readline()
        return answer.strip().lower() in ("y", "yes")


# -- commands --------------------------------------------------------------------------------------


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
    problem = port_problem(config.host, config.port)
    if problem is not None:  # before start-up: one line, not uvicorn's [Errno 98] after it
        raise CliFailure(problem)
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
    url = default_url(config.host, config.port)

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                io.say(
                    f"EVERREACH_ENV={config.everreach_env.value} serving at {url} "
                    f"(status page {url}/); stop with Ctrl-C"
                )

    # log_config=None: no text handlers of uvicorn's; the lifespan sends every logger through
    # the project's one handler (console or JSON lines), so the output is uniform.
    server = AnnouncingServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            lifespan="on",
            log_config=None,
            log_level=args.log_level,
            server_header=False,
        )
    )
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
        problem = port_problem(config.host, config.port)  # taken since the check above
        if problem is not None:
            raise CliFailure(problem) from None
        raise CliFailure(
            f"the server did not start on {config.host}:{config.port} (the log "
            f"above says why; a port in use is the usual reason)"
        ) from None
    finally:
        uvicorn_logger.removeFilter(quiet)
    return ExitCode.OK


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be served on, in one line with the fix; ``None`` when it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (
                    f"port {port} is in use (another process listens on {host}:{port}): serve "
                    f"on another one with PORT={port + 1 if port < 65535 else 8080} or --port, "
                    f"or stop the other process (find it with: lsof -i :{port})"
                )
            if exc.errno == errno.EACCES:
                return f"port {port} needs privileges on this machine: use a port above 1023"
            return f"cannot listen on {host}:{port}: {exc.strerror or exc} (check HOST and PORT)"
    return None


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
    response = request(server, "POST", "/dispatch", body)
    envelope = json_body(response)
    io.json(envelope)
    if response.status_code == 401:
        raise CliFailure(token_problem(server, envelope))
    if response.status_code == 202:
        outbox_id = envelope.get("outbox_id") if isinstance(envelope, dict) else None
        io.say(f"queued in the outbox (id {outbox_id}); it is sent when the cloud is reachable")
        return ExitCode.QUEUED
    if response.status_code == 200 and isinstance(envelope, dict) and envelope.get("ok"):
        return ExitCode.OK
    error = envelope.get("error") if isinstance(envelope, dict) else None
    detail = envelope.get("detail") if isinstance(envelope, dict) else None
    io.say(
        f"{args.action} failed (HTTP {response.status_code}): {error or 'error'}"
        + (f": {detail}" if detail else "")
    )
    return ExitCode.FAILED


def cmd_batch(args: argparse.Namespace, config: HybridConfig, io: Io) -> int:
    if not 1 <= args.max_concurrent <= MAX_CONCURRENT_LIMIT:
        raise CliFailure(
            f"--max-concurrent must be between 1 and {MAX_CONCURRENT_LIMIT}", ExitCode.USAGE
        )
    items = read_items(args.file)
    server = _server(args, config, DISPATCH_TIMEOUT_S)
    started = time.perf_counter()
    if args.server_side:
        output = _server_side_batch(server, items, args, io)
    else:
        health = request(server, "GET", "/health")  # one clear message if nothing listens
        if health.status_code >= 500:
            raise CliFailure(f"{server.url}/health answered HTTP {health.status_code}")
        results = _client_side_batch(server, items, args, io)
        output = {
            "results": results,
            "summary": summarize(results, (time.perf_counter() - started) * 1000),
        }
    io.json(output)
    results = output.get("results", [])
    summary = output.get("summary") or summarize(results, 0.0)
    for index, result in enumerate(results):
        if isinstance(result, dict) and not result.get("ok") and not result.get("queued"):
            detail = result.get("detail")
            io.say(
                f"item {index} ({result.get('action') or '?'}) failed: "
                f"{result.get('error') or 'error'}" + (f": {detail}" if detail else "")
            )
    sources = ", ".join(f"{k} {v}" for k, v in sorted(summary.get("by_source", {}).items()))
    io.say(
        f"batch: {plural(summary['total'], 'item')}, {summary['ok']} ok, "
        f"{summary['failed']} failed, {summary['queued']} queued in "
        f"{summary['duration_ms'] / 1000:.2f} s" + (f" (by source: {sources})" if sources else "")
    )
    if summary["failed"]:
        return ExitCode.FAILED
    return ExitCode.QUEUED if summary["queued"] else ExitCode.OK


def _client_side_batch(
    server: Server, items: list[dict[str, Any]], args: argparse.Namespace, io: Io
) -> list[dict[str, Any]]:
    tally = {"ok": 0, "failed": 0, "queued": 0}
    progress = Progress(
        TextColumn("batch"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tally]}"),
        TimeElapsedColumn(),
        console=io.err,
        disable=args.no_progress,
    )
    task = progress.add_task("batch", total=len(items), tally="")

    def on_result(index: int, envelope: dict[str, Any]) -> None:
        key = "queued" if envelope.get("queued") else "ok" if envelope.get("ok") else "failed"
        tally[key] += 1
        progress.update(task, advance=1, tally=", ".join(f"{v} {k}" for k, v in tally.items()))

    with progress:
        return asyncio.run(
            send_batch(server, items, max_concurrent=args.max_concurrent, on_result=on_result)
        )


def _server_side_batch(
    server: Server, items: list[dict[str, Any]], args: argparse.Namespace, io: Io
) -> dict[str, Any]:
    progress = Progress(
        SpinnerColumn(),
        TextColumn(f"batch of {plural(len(items), 'item')} on the server"),
        TimeElapsedColumn(),
        console=io.err,
        disable=args.no_progress,
    )
    with progress:
        progress.add_task("batch", total=None)
        response = request(
            server, "POST", "/batch", {"items": items, "max_concurrent": args.max_concurrent}
        )
    if response.status_code == 401:
        raise CliFailure(token_problem(server))
    body = json_body(response)
    if response.status_code != 200 or not isinstance(body, dict) or "results" not in body:
        raise CliFailure(
            f"POST /batch answered HTTP {response.status_code}: {json.dumps(body)[:300]}"
        )
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
        raise CliFailure(
            f"{name}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
            ExitCode.USAGE,
        ) from None
    if isinstance(data, dict) and "items" in data:
        data = data["items"]
    if not isinstance(data, list):
        raise CliFailure(
            f'{name}: must be a JSON list of {{"action": ..., "params": {{...}}}}', ExitCode.USAGE
        )
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
    if args.outbox_command == "retry":
        return _outbox_retry(args, config, io)
    if args.outbox_command == "drop":
        return _outbox_drop(args, config, io)
    status = fetch_status(_server(args, config, VIEW_TIMEOUT_S))
    if args.json:
        io.json({"outbox": status.get("outbox"), "dead_letters": status.get("dead_letters")})
    else:
        io.show(outbox_view(status))
    return ExitCode.OK


def _outbox_call(server: Server, method: str, path: str, body: Any = None) -> httpx.Response:
    response = request(server, method, path, body)
    if response.status_code == 401:
        raise CliFailure(token_problem(server))
    if response.status_code == 404:
        raise CliFailure(str(json_body(response).get("detail") or f"{path}: not found"))
    return response


def _retry_one(server: Server, item_id: str, io: Io, *, yes: bool) -> None:
    path = f"/outbox/{item_id}/retry"
    response = _outbox_call(server, "POST", path, {})
    body = json_body(response)
    if response.status_code == 409 and body.get("error") == "indeterminate":
        question = f"outbox item {item_id} may have run already; run it again?"
        if not (yes or io.confirm(question)):
            raise CliFailure(f"outbox item {item_id} left as it is", ExitCode.FAILED)
        response = _outbox_call(server, "POST", path, {"rerun": True})
        body = json_body(response)
    if response.status_code != 200:
        raise CliFailure(f"POST {path} answered HTTP {response.status_code}: {body}")
    io.say(f"outbox item {item_id} ({body.get('action')}) is queued again")


def _outbox_retry(args: argparse.Namespace, config: HybridConfig, io: Io) -> int:
    server = _server(args, config, VIEW_TIMEOUT_S)
    if args.all == bool(args.item_id):
        raise CliFailure("give one outbox item ID, or --all", ExitCode.USAGE)
    if args.item_id:
        _retry_one(server, args.item_id, io, yes=args.yes)
        return ExitCode.OK
    dead = fetch_status(server).get("dead_letters") or []
    may_have_run = [item["id"] for item in dead if item.get("indeterminate")]
    for item in dead:
        if not item.get("indeterminate"):
            _retry_one(server, str(item["id"]), io, yes=False)
    if may_have_run:
        # Each of these may run twice: a person confirms them one by one.
        io.say(
            f"{len(may_have_run)} item(s) may have run already and were left as they are; "
            f"retry each with: everreach outbox retry ID ({', '.join(may_have_run)})"
        )
    return ExitCode.OK


def _outbox_drop(args: argparse.Namespace, config: HybridConfig, io: Io) -> int:
    server = _server(args, config, VIEW_TIMEOUT_S)
    question = f"drop outbox item {args.item_id}? it will never be sent"
    if not (args.yes or io.confirm(question)):
        raise CliFailure(f"outbox item {args.item_id} left as it is", ExitCode.FAILED)
    body = json_body(_outbox_call(server, "DELETE", f"/outbox/{args.item_id}"))
    io.say(f"outbox item {args.item_id} ({body.get('action')}) dropped")
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
    return Server.from_config(
        config, url=args.url, token=args.token, timeout_s=args.timeout_s or timeout_s
    )


def _params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if args.params is not None:
        try:
            loaded = json.loads(args.params)
        except json.JSONDecodeError as exc:
            raise CliFailure(f"--params is not valid JSON: {exc.msg}", ExitCode.USAGE) from None
        if not isinstance(loaded, dict):
            raise CliFailure(
                '--params must be a JSON object, e.g. \'{"keyword": "ai"}\'', ExitCode.USAGE
            )
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


def plural(count: int, noun: str) -> str:
    """``1 item``, ``2 items``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# -- the parser and main ---------------------------------------------------------------------------


class _Version(argparse.Action):
    """``--version``: the version is read only when asked for (it lives with the server)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from runtime import VERSION

        print(f"everreach {VERSION}", file=sys.stdout, flush=True)
        parser.exit()


# What each command does, and an example, shown by ``everreach COMMAND --help``.
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": (
        "run the server",
        "Run this instance: /dispatch, /status, the status page at /, and the cloud role's "
        "/api/services/*. Configuration comes from the environment and .env.",
        "everreach serve --port 8081\n  EVERREACH_ENV=cloud PORT=9090 everreach serve",
    ),
    "dispatch": (
        "run one action",
        "Send one action to the server (POST /dispatch) and print its result envelope. "
        "Exits 0 ok, 1 failed, 3 queued in the outbox.",
        "everreach dispatch system.echo -p text=hello\n"
        '  everreach dispatch research.keyword --params \'{"keyword": "ai"}\' --force-env local',
    ),
    "batch": (
        "run a JSON list of actions",
        "Send many actions, a few at a time, with a progress bar; print every envelope in "
        "input order and list the failed items on stderr.",
        'echo \'[{"action": "system.echo", "params": {"n": 1}}]\' | everreach batch -\n'
        "  everreach batch items.json --max-concurrent 8",
    ),
    "status": (
        "env, online, cost, counts, circuits, outbox, jobs",
        "Show the server's state (GET /status) as tables.",
        "everreach status\n  everreach status --json --url http://127.0.0.1:9090",
    ),
    "cost": (
        "month-to-date spend against the caps, and the rates",
        "Show this month's cloud spend against the soft and hard caps, and the $/call rates.",
        "everreach cost\n  everreach cost --json",
    ),
    "outbox": (
        "pending depth and dead letters; retry, drop",
        "Show the outbox: items waiting for the cloud, and dead letters with their errors; "
        "retry or drop a dead letter, or cancel a queued item.",
        "everreach outbox\n  everreach outbox retry 3f2a9c1e --yes\n"
        "  everreach outbox drop 3f2a9c1e",
    ),
    "routes": (
        "the route table (no server)",
        "Show where each known action runs (the route table and the classifier); needs no server.",
        "everreach routes\n  ROUTE_TABLE_PATH=my_routes.json everreach routes --json",
    ),
}


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:
    summary, description, example = _COMMANDS[name]
    return sub.add_parser(
        name,
        parents=list(parents),
        help=summary,
        description=description,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="everreach",
        description="EverReach hybrid orchestrator: serve, dispatch actions, read the status.",
        epilog="exit codes: 0 ok, 1 failed or no server, 2 usage or configuration, 3 queued\n"
        "help on one command: everreach COMMAND --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--url", help="the server's base URL (default: LOCAL_ENDPOINT, else http://HOST:PORT)"
    )
    client.add_argument(
        "--token",
        help="bearer token (default: LOCAL_API_TOKEN; prefer the "
        "variable: arguments show in the process list)",
    )
    client.add_argument(
        "--timeout", dest="timeout_s", type=float, metavar="SECONDS", help="HTTP timeout"
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print raw JSON")

    serve = _command(sub, "serve")
    serve.add_argument("--host", help="bind address (default: HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: PORT, 8080)")
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.set_defaults(handler=cmd_serve)

    dispatch = _command(sub, "dispatch", [client])
    dispatch.add_argument("action", help="service.topic, e.g. research.keyword")
    dispatch.add_argument("--params", metavar="JSON", help="params as a JSON object")
    dispatch.add_argument(
        "-p",
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="one param (VALUE as JSON if it parses, else a string); repeat",
    )
    dispatch.add_argument("--force-env", choices=["local", "cloud"])
    dispatch.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="8-200 characters; a repeat returns the first answer",
    )
    dispatch.set_defaults(handler=cmd_dispatch)

    batch = _command(sub, "batch", [client])
    batch.add_argument("file", metavar="FILE.json|-", help="[{action, params}, ...]; - is stdin")
    batch.add_argument(
        "--max-concurrent",
        type=int,
        default=3,
        metavar="N",
        help="items in flight at once (1-32, default 3)",
    )
    batch.add_argument(
        "--server-side",
        action="store_true",
        help="send one POST /batch instead of one /dispatch per item",
    )
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    batch.set_defaults(handler=cmd_batch)

    for name, handler in (("status", cmd_status), ("cost", cmd_cost)):
        _command(sub, name, [client, as_json]).set_defaults(handler=handler)
    outbox = _command(sub, "outbox", [client, as_json])
    outbox.set_defaults(handler=cmd_outbox, outbox_command=None)
    outbox_sub = outbox.add_subparsers(dest="outbox_command", metavar="retry|drop")
    yes = argparse.ArgumentParser(add_help=False)
    yes.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    retry = outbox_sub.add_parser(
        "retry",
        parents=[client, yes],
        help="queue a dead letter again (one that may have run asks first)",
    )
    retry.add_argument("item_id", nargs="?", metavar="ID", help="the outbox item's id")
    retry.add_argument(
        "--all", action="store_true", help="every dead letter but those that may have run"
    )
    drop = outbox_sub.add_parser(
        "drop", parents=[client, yes], help="drop a dead letter, or cancel a queued item"
    )
    drop.add_argument("item_id", metavar="ID", help="the outbox item's id")
    routes = _command(sub, "routes", [as_json])
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
