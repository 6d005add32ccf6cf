"""The command line's client of a running server: where it is, the calls, the batch sender.

Failures the user must see become ``CliFailure`` with the exit code the command line returns
(``ExitCode``); nothing here prints but ``Io``, the streams the commands write to. httpx
clients are opened per command with ``trust_env=False``: the server is almost always on
loopback, and an HTTP_PROXY from the environment must not catch it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import IO, TYPE_CHECKING, Any

import httpx

from config.hybrid_config import HybridConfig
from errors import Source

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

NO_RESPONSE = "no_response"  # the client's own error code: the server gave no usable answer
DISPATCH_TIMEOUT_S = 120.0  # covers a cloud call with its retries (4 x 30 s by default)
VIEW_TIMEOUT_S = 10.0


class Io:
    """The streams of one CLI run (looked up at call time, so tests can capture them).

    rich's consoles are made when a table or a progress bar first needs them: ``serve`` and
    the JSON printers write plain lines and never load rich.
    """

    __slots__ = ("_err", "_out")

    def __init__(self, out: Console | None = None, err: Console | None = None) -> None:
        self._out = out
        self._err = err

    @classmethod
    def system(cls) -> Io:
        return cls()

    @property
    def out(self) -> Console:
        if self._out is None:
            self._out = _console(sys.stdout)
            if not self._out.is_terminal:
                self._out.width = max(self._out.width, 120)  # piped tables: wide, not folded
        return self._out

    @property
    def err(self) -> Console:
        if self._err is None:
            self._err = _console(sys.stderr)
        return self._err

    def json(self, data: Any) -> None:
        out = self._out.file if self._out is not None else sys.stdout
        print(json.dumps(data, indent=2, ensure_ascii=False), file=out, flush=True)

    def show(self, parts: Sequence[RenderableType]) -> None:
        for index, part in enumerate(parts):
            if index:
                self.out.print()
            self.out.print(part)

    def say(self, message: str) -> None:
        print(f"everreach: {message}", file=self._err_file(), flush=True)

    def confirm(self, question: str) -> bool:
        """Ask on stderr, read a yes from stdin; anything else (or no input) is no."""
        print(f"everreach: {question} [y/N] ", end="", file=self._err_file(), flush=True)
        answer = sys.stdin.readline()
        return answer.strip().lower() in ("y", "yes")

    def _err_file(self) -> IO[str]:
        return self._err.file if self._err is not None else sys.stderr


def _console(file: IO[str]) -> Console:
    from rich.console import Console

    return Console(file=file, markup=False, highlight=False, emoji=False)


class ExitCode(IntEnum):
    """What ``everreach`` exits with."""

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
    # A ready client to send through (an in-process app in tests); None opens one per call.
    client: httpx.Client | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_config(
        cls,
        config: HybridConfig,
        *,
        url: str | None = None,
        token: str | None = None,
        timeout_s: float = VIEW_TIMEOUT_S,
        client: httpx.Client | None = None,
    ) -> Server:
        """``--url``, else LOCAL_ENDPOINT, else http://HOST:PORT (a wildcard bind as loopback)."""
        if url is None:
            url = config.local_endpoint or default_url(config.host, config.port)
        token = token or config.secret("local_api_token")
        return cls(url.rstrip("/"), token, timeout_s, client)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def default_url(host: str, port: int) -> str:
    """http://HOST:PORT of a server bound to HOST (a wildcard bind is reached on loopback)."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def request(server: Server, method: str, path: str, body: Any = None) -> httpx.Response:
    """Send one request; ``CliFailure`` when nothing answers or the transport fails."""
    try:
        with contextlib.ExitStack() as stack:
            client = server.client or stack.enter_context(
                httpx.Client(timeout=server.timeout_s, trust_env=False)
            )
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


def json_body(response: httpx.Response) -> Any:
    """The decoded JSON body; ``CliFailure`` naming the status when it is not JSON."""
    try:
        return response.json()
    except ValueError:
        raise CliFailure(
            f"{response.request.method} {response.request.url} answered HTTP "
            f"{response.status_code} that is not JSON: {response.text[:200]!r}"
        ) from None


def token_problem(server: Server, envelope: Any = None) -> str:
    """Say what to do about a 401: ours to the server, or the server's key to its cloud."""
    if isinstance(envelope, dict) and envelope.get("source") == Source.CLOUD.value:
        detail = envelope.get("detail") or "401"
        return (
            f"the cloud refused the EVERREACH_CLOUD_KEY of the server at {server.url} (your "
            f"LOCAL_API_TOKEN was accepted): {detail}"
        )
    if server.token:
        return f"{server.url} refused the token (LOCAL_API_TOKEN or --token)"
    return f"{server.url} needs a token: set LOCAL_API_TOKEN (environment or .env) or pass --token"


def fetch_status(server: Server) -> dict[str, Any]:
    """GET /status; ``CliFailure`` when there is no server, a wrong token or an odd answer."""
    response = request(server, "GET", "/status")
    if response.status_code == 401:
        raise CliFailure(token_problem(server))
    if response.status_code != 200:
        raise CliFailure(f"GET /status answered HTTP {response.status_code}: {response.text[:200]}")
    body = json_body(response)
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
        base_url=server.url,
        headers=server.headers(),
        timeout=server.timeout_s,
        limits=limits,
        transport=transport,
        trust_env=False,
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
    return {
        "ok": False,
        "action": action,
        "source": None,
        "result": None,
        "error": NO_RESPONSE,
        "detail": detail,
    }


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


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds of ``90s``, ``10m``, ``2h``, ``1d``, ``1h30m`` (or a bare number of seconds)."""
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        parts = _DURATION_RE.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a duration: use e.g. 90s, 10m, 2h, 1d or 1h30m"
            ) from None
        seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be 0 or more seconds")
    return seconds
