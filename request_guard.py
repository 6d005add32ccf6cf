"""ASGI middleware that decides who may talk to this server at all, before any route runs.

Three checks, each answered with the result envelope:

* **Host** (400): only names in ``ALLOWED_HOSTS`` are served (default: the loopback names and
  ``HOST``), so a DNS-rebound page (``Host: evil.example`` resolving to 127.0.0.1) is refused,
  as Starlette's ``TrustedHostMiddleware`` does.
* **Public without a token** (403): without ``LOCAL_API_TOKEN`` only loopback may be served. The
  check looks at the sockets the process really listens on (``/proc/self/net`` on Linux) and at
  the address each request came in on, not at ``HOST``: ``uvicorn --host 0.0.0.0`` started by
  hand must not serve ``/dispatch`` to the network. ``GET /health`` stays open for probes.
* **Cross-site browsers** (403): a mutating request whose ``Origin`` is not this server, or that
  the browser marks ``Sec-Fetch-Site: cross-site``/``same-site``, is refused. Browsers send these
  on every cross-origin POST, so a web page cannot drive a tokenless server (CSRF); curl and
  other programs send neither and are unaffected.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from body_limit import send_envelope
from envelope import Envelope, new_request_id
from errors import ActionError, BadRequest, Forbidden

log = logging.getLogger("everreach.server")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_OPEN_PATHS = frozenset({"/health"})
_TCP_LISTEN = "0A"
_MAX_HOSTS_KEPT = 64


def allowed_hosts(configured: Iterable[str], bind_host: str) -> frozenset[str]:
    """The Host names served: ``configured`` if given, else loopback names plus ``bind_host``."""
    names = {name.strip().lower() for name in configured if name.strip()}
    if names:
        return frozenset(names)
    names = set(LOOPBACK_NAMES)
    host = bind_host.strip().lower()
    if host and not _is_wildcard(host):
        names.add(f"[{host}]" if ":" in host and not host.startswith("[") else host)
    return frozenset(names)


def host_allowed(host_header: str, allowed: frozenset[str]) -> bool:
    """Is the name in ``Host: name[:port]`` in ``allowed`` (``*`` and ``*.domain`` match)?"""
    if "*" in allowed:
        return True
    name = host_header.strip().lower()
    if name.startswith("["):
        name = name[: name.find("]") + 1]  # "[::1]:8080" -> "[::1]"
    else:
        name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
    if not name:
        return False
    return name in allowed or any(
        pattern.startswith("*.") and name.endswith(pattern[1:]) for pattern in allowed
    )


@functools.lru_cache(maxsize=64)  # the addresses a server is reached at: few; 2.4 µs each parse
def is_public_ip(address: str) -> bool:
    """Is ``address`` an IP other than loopback? (A name, as in-process tests give, is not.)"""
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return not (ip.is_loopback or (mapped is not None and mapped.is_loopback))


def _is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("0.0.0.0", "::", "")


def _decode_proc_address(hex_address: str) -> str:
    """Turn ``/proc/net/tcp{,6}``'s ``0100007F`` (host byte order per 32-bit word) into an IP."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def listening_addresses(proc: Path = Path("/proc")) -> list[str] | None:
    """Addresses this process listens on (TCP), or ``None`` where ``/proc`` cannot tell."""
    try:
        inodes = set()
        for fd in (proc / "self" / "fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        found = []
        for table in ("tcp", "tcp6"):
            path = proc / "self" / "net" / table
            if not path.exists():
                continue
            for line in path.read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == _TCP_LISTEN and fields[9] in inodes:
                    found.append(_decode_proc_address(fields[1].split(":")[0]))
        return found
    except OSError:
        return None


class RequestGuardMiddleware:
    """Refuse requests by Host, by a public bind without a token, and from cross-site pages."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._public_listen: str | None = None  # the first public address listened on
        self._listen_known = False
        self._allowed: tuple[Any, frozenset[str]] | None = None
        # Host headers seen and whether each is served, for the config in ``_allowed``: a
        # server is reached under a few names (~1 µs per request to parse and match one).
        self._hosts: dict[bytes, bool] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        config = _config(scope)
        if config is not None:
            try:
                self.check(scope, config)
            except ActionError as exc:
                envelope = Envelope.failure("", exc, source=None, request_id=new_request_id())
                await send_envelope(send, exc.http_status, envelope.to_dict())
                return
        await self.app(scope, receive, send)

    def check(self, scope: Any, config: Any) -> None:
        """Raise the ``ActionError`` that refuses this request, if any."""
        # The three headers read here, not a dict of all of them (the last of a repeated one
        # counts, as in a dict).
        host_raw = origin = site = None
        for name, value in scope["headers"]:
            if name == b"host":
                host_raw = value
            elif name == b"origin":
                origin = value
            elif name == b"sec-fetch-site":
                site = value
        allowed = self._allowed_for(config)
        served = self._hosts.get(host_raw) if host_raw is not None else None
        if served is None:
            served = host_allowed(_latin1(host_raw), allowed)
            if host_raw is not None and len(self._hosts) < _MAX_HOSTS_KEPT:
                self._hosts[host_raw] = served
        if not served:
            raise BadRequest(
                f"Host {_latin1(host_raw)[:100]!r} is not served here; add it to ALLOWED_HOSTS "
                f"(comma-separated names, '*' for any) if it is yours"
            )
        if config.local_api_token is None and scope["path"] not in _OPEN_PATHS:
            public = self._public_address(scope)
            if public is not None:
                raise Forbidden(
                    f"this server listens on {public} beyond this machine and LOCAL_API_TOKEN "
                    f"is not set; set LOCAL_API_TOKEN or listen on 127.0.0.1 only"
                )
        if scope["method"] not in _SAFE_METHODS and (site is not None or origin is not None):
            _check_same_origin(
                _latin1(site),
                None if origin is None else origin.decode("latin-1"),
                _latin1(host_raw),
            )

    def _allowed_for(self, config: Any) -> frozenset[str]:
        if self._allowed is None or self._allowed[0] is not config:
            self._allowed = (config, allowed_hosts(config.allowed_hosts.split(","), config.host))
            self._hosts = {}
        return self._allowed[1]

    def _public_address(self, scope: Any) -> str | None:
        server = scope.get("server")
        if server and is_public_ip(str(server[0])):
            return str(server[0])
        if not self._listen_known:
            addresses = listening_addresses()
            # Uvicorn binds every socket before it serves the first request, so one look is
            # enough (an in-process app has none): no /proc scan on later requests.
            self._listen_known = True
            for address in addresses or ():
                if is_public_ip(address):
                    self._public_listen = address
                    log.error(
                        "listening beyond loopback without LOCAL_API_TOKEN: refusing requests",
                        extra={"address": address},
                    )
                    break
        return self._public_listen


def _latin1(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode("latin-1")


def _check_same_origin(site: str, origin: str | None, host: str) -> None:
    site = site.strip().lower()
    if site in ("cross-site", "same-site"):
        raise Forbidden(
            f"refused a {site} request from a web page (Sec-Fetch-Site); call this server from "
            f"its own pages or from a program"
        )
    # Host part only: behind a TLS proxy the page is https:// while this server sees http://.
    if (
        origin is not None
        and origin.strip().lower().partition("://")[2].rstrip("/") != host.lower()
    ):
        raise Forbidden(
            f"refused a request from another origin ({origin[:100]!r}); call this server from "
            f"its own pages or from a program"
        )


def _config(scope: Any) -> Any:
    state = getattr(scope.get("app"), "state", None)
    # Starlette's State keeps its attributes in a dict, read here directly rather than through
    # State.__getattr__ and the exception it raises for a missing one (~0.5 µs a request).
    values = getattr(state, "_state", None)
    runtime = values.get("runtime") if type(values) is dict else getattr(state, "runtime", None)
    return getattr(runtime, "config", None)
