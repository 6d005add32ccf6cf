"""The ``everreach`` command line: run the server, send it actions, read its state.

    everreach serve [--host H] [--port P]          run this instance (uvicorn, create_app(config))
    everreach dispatch ACTION [-p key=value ...]   POST /dispatch, print the envelope
    everreach batch FILE.json|-                    many actions, bounded concurrency, progress bar
    everreach status | cost | outbox [--json]      GET /status as tables (or raw JSON)
    everreach outbox retry ID|--all [--yes]        queue dead letters again (POST /outbox/ID/retry)
    everreach outbox drop ID [--yes]               drop a dead letter or cancel a queued item
    everreach outbox cancel ID                     cancel a deferred or scheduled item
    everreach routes [--json]                      the route table; needs no server

Exit codes (``ExitCode``): 0 ok; 1 the action failed or no server answered; 2 bad usage or bad
configuration; 3 queued in the outbox (HTTP 202). Configuration comes only from ``HybridConfig``
(the environment and ``.env``); ``--url`` and ``--token`` override LOCAL_ENDPOINT and
LOCAL_API_TOKEN for one call.
"""

from __future__ import annotations

import argparse
import sys

# As in local_server: httpx's package imports its own command-line client (click, pygments)
# whenever rich is installed; ours needs neither, and ``everreach serve`` starts lighter.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

from collections.abc import Callable, Sequence  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

from cli_client import CliFailure, ExitCode, Io, parse_duration  # noqa: E402
from cli_serve import cmd_serve  # noqa: E402
from config.hybrid_config import HybridConfig  # noqa: E402
from errors import ConfigError  # noqa: E402

if TYPE_CHECKING:
    import httpx

__all__ = ["ExitCode", "build_parser", "main"]


def _command_of(name: str) -> Callable[[argparse.Namespace, HybridConfig, Io], int]:
    """``cli_commands.<name>``, imported when the command runs: ``serve`` needs none of it."""

    def run(args: argparse.Namespace, config: HybridConfig, io: Io) -> int:
        import cli_commands

        command: Callable[[argparse.Namespace, HybridConfig, Io], int] = getattr(cli_commands, name)
        return command(args, config, io)

    return run


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
    when = dispatch.add_mutually_exclusive_group()
    when.add_argument(
        "--at", metavar="TIME", help="run it at this RFC 3339 time, e.g. 2030-01-02T09:00:00Z"
    )
    when.add_argument(
        "--in",
        dest="delay",
        metavar="DURATION",
        type=parse_duration,
        help="run it after this long: 90s, 10m, 2h, 1d, 1h30m",
    )
    dispatch.set_defaults(handler=_command_of("cmd_dispatch"))

    batch = _command(sub, "batch", [client])
    batch.add_argument("file", metavar="FILE.json|-", help="[{action, params}, ...]; - is stdin")
    batch.add_argument(
        "--max-concurrent",
        type=int,
        default=3,
        metavar="N",
        help="items in flight at once (default 3; at most BATCH_MAX_CONCURRENT: the server's "
        "with --server-side, else this environment's)",
    )
    batch.add_argument(
        "--server-side",
        action="store_true",
        help="send one POST /batch instead of one /dispatch per item",
    )
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    batch.set_defaults(handler=_command_of("cmd_batch"))

    for name in ("status", "cost"):
        _command(sub, name, [client, as_json]).set_defaults(handler=_command_of(f"cmd_{name}"))
    outbox = _command(sub, "outbox", [client, as_json])
    outbox.set_defaults(handler=_command_of("cmd_outbox"), outbox_command=None)
    outbox_sub = outbox.add_subparsers(dest="outbox_command", metavar="retry|drop|cancel")
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
    cancel = outbox_sub.add_parser(
        "cancel", parents=[client], help="cancel a deferred or scheduled item before it runs"
    )
    cancel.add_argument("item_id", metavar="ID", help="the outbox_id its dispatch answered")
    routes = _command(sub, "routes", [as_json])
    routes.set_defaults(handler=_command_of("cmd_routes"))
    return parser


def main(
    argv: list[str] | None = None,
    *,
    config: HybridConfig | None = None,
    client: httpx.Client | None = None,
) -> int:
    """Run the command line; ``config`` replaces reading the environment, and ``client`` (an
    in-process app's) the HTTP connection of each call to the server (tests)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    args.client = client
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
