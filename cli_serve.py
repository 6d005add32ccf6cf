"""``everreach serve``: run this instance under uvicorn, with one-line start-up errors.

Before binding, ``port_problem`` says in one line why a port cannot be served on (in use,
privileged); a ``ConfigError`` raised while the lifespan starts is reported the same way,
instead of uvicorn's traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from cli_client import CliFailure, ExitCode, Io, default_url
from config.hybrid_config import HybridConfig
from errors import ConfigError


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
    with _collector_paused() as resume:
        return _serve(args, config, io, resume)


def _serve(
    args: argparse.Namespace, config: HybridConfig, io: Io, resume: Callable[[], None]
) -> int:
    """Import, build and start the server; ``resume()`` once it serves (or failed to start)."""
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
            resume()
            if self.started:
                io.say(
                    f"EVERREACH_ENV={config.everreach_env.value} serving at {url} "
                    f"(status page {url}/); stop with Ctrl-C"
                )

    # log_config=None: no text handlers of uvicorn's; the lifespan sends every logger through
    # the project's one handler (console or JSON lines), so the output is uniform.
    # access_log=False: the dispatch line says what an access line would, and uvicorn builds
    # an access line's arguments for every request even when its logger drops them.
    # ws="none": the app has no WebSocket route, and uvicorn's default ("auto") imports the
    # websockets package for it anyway (0.5 MiB of the idle RSS, bench_startup); a WebSocket
    # handshake is answered as the plain HTTP request it also is.
    server = AnnouncingServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            lifespan="on",
            ws="none",
            log_config=None,
            log_level=args.log_level,
            access_log=False,
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


@contextlib.contextmanager
def _collector_paused() -> Iterator[Callable[[], None]]:
    """No cyclic garbage collection from here until the server has started (``resume()``) or
    this block ends, whichever is first.

    Start-up imports some 600 modules and builds the app and its parts, almost all of which
    live as long as the process: the collector ran ~140 times meanwhile, scanning them again
    and again for cycles that are not there (~100 ms of a ~0.9 s start-up's CPU, measured).
    Reference counting still frees everything at once; the few cycles left are collected by
    the collector's next run after it resumes. Nothing is done if it was off already.
    """
    was_enabled = gc.isenabled()
    gc.disable()

    def resume() -> None:
        if was_enabled:
            gc.enable()

    try:
        yield resume
    finally:
        resume()


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
