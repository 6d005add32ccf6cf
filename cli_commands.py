"""One function per ``everreach`` command (``cmd_*``), and the streams a run writes to (``Io``).

Each command takes the parsed arguments, the ``HybridConfig`` and an ``Io``, and returns an
``ExitCode``; a failure worth one line is a ``CliFailure``. The parser that picks the command,
and ``main``, live in ``cli.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
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
    Io,
    Server,
    fetch_status,
    json_body,
    request,
    send_batch,
    summarize,
    token_problem,
)
from cli_views import cost_view, outbox_view, routes_view, status_view
from config.hybrid_config import HybridConfig

# -- commands --------------------------------------------------------------------------------------


def cmd_dispatch(args: argparse.Namespace, config: HybridConfig, io: Io) -> int:
    server = _server(args, config, DISPATCH_TIMEOUT_S)
    body: dict[str, Any] = {"action": args.action, "params": _params(args)}
    if args.force_env:
        body["force_env"] = args.force_env
    if args.idempotency_key:
        body["idempotency_key"] = args.idempotency_key
    if getattr(args, "at", None):
        body["not_before"] = args.at
    if getattr(args, "delay", None) is not None:
        body["delay_sec"] = args.delay
    response = request(server, "POST", "/dispatch", body)
    envelope = json_body(response)
    io.json(envelope)
    if response.status_code == 401:
        raise CliFailure(token_problem(server, envelope))
    if response.status_code == 202:
        outbox_id = envelope.get("outbox_id") if isinstance(envelope, dict) else None
        until = envelope.get("deferred_until") if isinstance(envelope, dict) else None
        if until:
            io.say(
                f"kept in the outbox (id {outbox_id}) until {until}; "
                f"cancel it with: everreach outbox cancel {outbox_id}"
            )
        else:
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
    # --server-side: the server's BATCH_MAX_CONCURRENT decides (it answers 422 above it, and
    # that message is shown); one /dispatch per item: this environment's bounds the CLI's own.
    bound = None if args.server_side else config.batch_max_concurrent
    if args.max_concurrent < 1 or (bound is not None and args.max_concurrent > bound):
        within = f"between 1 and {bound} (BATCH_MAX_CONCURRENT)" if bound else "at least 1"
        raise CliFailure(f"--max-concurrent must be {within}", ExitCode.USAGE)
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
    if response.status_code == 422 and isinstance(body, dict) and body.get("detail"):
        raise CliFailure(f"POST /batch refused the batch (HTTP 422): {body['detail']}")
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
    if args.outbox_command == "cancel":
        return _outbox_cancel(args, config, io)
    status = fetch_status(_server(args, config, VIEW_TIMEOUT_S))
    if args.json:
        io.json(
            {
                "outbox": status.get("outbox"),
                "waiting": status.get("waiting"),
                "dead_letters": status.get("dead_letters"),
            }
        )
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


def _outbox_cancel(args: argparse.Namespace, config: HybridConfig, io: Io) -> int:
    server = _server(args, config, VIEW_TIMEOUT_S)
    body = json_body(_outbox_call(server, "DELETE", f"/outbox/{args.item_id}"))
    io.say(f"outbox item {args.item_id} ({body.get('action')}) cancelled: it will not run")
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
        config,
        url=args.url,
        token=args.token,
        timeout_s=args.timeout_s or timeout_s,
        client=getattr(args, "client", None),
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
