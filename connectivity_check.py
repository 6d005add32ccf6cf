"""ConnectivityChecker: is the cloud reachable right now?

Active probes (``GET {CLOUD_ENDPOINT}/health`` every ``CONNECTIVITY_INTERVAL_SEC``) and passive
probes (the outcome of every real cloud call, reported with ``record_success`` /
``record_failure``) feed one counter: ``OFFLINE_AFTER_FAILURES`` consecutive failures turn the
checker offline, one success turns it online again. ``OFFLINE_MODE=true`` pins it offline and
makes no network call at all.

A cloud that answers ``/health`` may still refuse our key, and every real call would then fail
with 401. When ``auth_headers`` are given, a probe that reached the cloud also makes one cheap
authenticated request (``GET /api/schedules``) and records ``auth``: ``ok``, ``refused`` (401 or
403) or ``unknown``, shown in ``/health`` as the cloud's ``auth``.

Start-up state: without an endpoint, offline; with one, *online until proven otherwise* — the
first probe runs as soon as ``start()`` is called, and the first real call tries the cloud
rather than being refused on a guess. A dead cloud is then detected by the first probe or by
``offline_after`` failed calls, whichever comes first.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import httpx

from config.hybrid_config import redact_url
from sqlite_file import utc_iso

if TYPE_CHECKING:
    from cloud_client import CloudClient
    from config.hybrid_config import HybridConfig

log = logging.getLogger(__name__)

TransitionCallback = Callable[[bool], Awaitable[None] | None]

DEFAULT_PROBE_TIMEOUT_S = 5.0
AUTH_PROBE_PATH = "/api/schedules"  # authenticated, read-only and cheap on every instance


class CloudLink(StrEnum):
    """What this instance may assume of its cloud right now."""

    NONE = "none"  # no cloud is configured
    ONLINE = "online"
    OFFLINE = "offline"  # OFFLINE_MODE, or the probes and calls say it does not answer


def cloud_link(connectivity: ConnectivityChecker | None, *, offline_mode: bool) -> CloudLink:
    """The one place online/offline is decided (routing, the scheduler and /health ask it)."""
    if offline_mode:
        return CloudLink.OFFLINE
    if connectivity is None:
        return CloudLink.NONE
    return CloudLink.ONLINE if connectivity.online else CloudLink.OFFLINE


class ConnectivityChecker:
    """Tracks whether the cloud answers, from active and passive probes."""

    def __init__(
        self,
        *,
        endpoint: str | None,
        client: httpx.AsyncClient,
        interval_s: float = 30.0,
        offline_after: int = 3,
        probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
        forced_offline: bool = False,
        headers: Mapping[str, str] | None = None,
        auth_headers: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        if offline_after < 1:
            raise ValueError("offline_after must be >= 1")
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.interval_s = interval_s
        self.offline_after = offline_after
        self.probe_timeout_s = probe_timeout_s
        self.forced_offline = forced_offline
        self._client = client
        self._headers = dict(headers or {})
        self._auth_headers = dict(auth_headers or {})
        self.auth = "unknown"
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._online = self.endpoint is not None
        self._consecutive_failures = 0
        self._last_probe_at: float | None = None
        self._last_probe_ok: bool | None = None
        self._last_change_at: float | None = None
        self._last_change_mono: float | None = None
        self._callbacks: list[TransitionCallback] = []
        self._loop_task: asyncio.Task[None] | None = None
        self._callback_tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    def from_config(cls, config: HybridConfig, cloud: CloudClient) -> ConnectivityChecker:
        """Probe ``cloud`` every CONNECTIVITY_INTERVAL_SEC, offline after OFFLINE_AFTER_FAILURES."""
        return cls(
            endpoint=cloud.endpoint,
            client=cloud.http,
            interval_s=config.connectivity_interval_sec,
            offline_after=config.offline_after_failures,
            # A probe must be short: never longer than a real cloud call may take.
            probe_timeout_s=min(DEFAULT_PROBE_TIMEOUT_S, config.cloud_timeout_sec),
            forced_offline=config.offline_mode,
            auth_headers=cloud.auth_headers or None,
        )

    # -- state ------------------------------------------------------------------------------

    @property
    def online(self) -> bool:
        """True when the cloud is believed reachable (never with OFFLINE_MODE or no endpoint)."""
        return self._online and not self.forced_offline and self.endpoint is not None

    def is_cloud_reachable(self) -> bool:
        """The PRD's name for ``online``."""
        return self.online

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    def on_transition(self, callback: TransitionCallback) -> None:
        """Call ``callback(new_online)`` on every offline<->online change.

        A callback may be sync or async; async ones run as tasks this checker keeps and awaits
        on ``close()``. A callback that raises is logged and does not affect the checker.
        """
        self._callbacks.append(callback)

    def record_success(self) -> None:
        """A cloud call (or probe) succeeded: online again after one success."""
        self._consecutive_failures = 0
        self._set_online(True)

    def record_failure(self) -> None:
        """A cloud call (or probe) failed to reach the cloud: offline after ``offline_after``."""
        self._consecutive_failures += 1
        if self._consecutive_failures >= self.offline_after:
            self._set_online(False)

    def _set_online(self, online: bool) -> None:
        if online == self._online:
            return
        self._online = online
        self._last_change_at = self._wall_clock()
        self._last_change_mono = self._clock()
        if self.forced_offline or self.endpoint is None:
            return  # the visible state (offline) did not change
        log.warning(
            "cloud %s is now %s (after %d consecutive failures)",
            redact_url(self.endpoint),
            "online" if online else "offline",
            self._consecutive_failures,
        )
        for callback in list(self._callbacks):
            self._fire(callback, online)

    def _fire(self, callback: TransitionCallback, online: bool) -> None:
        try:
            outcome = callback(online)
        except Exception:
            log.exception("connectivity callback %r failed", callback)
            return
        if inspect.isawaitable(outcome):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # called from outside the event loop: nowhere to run it
                if inspect.iscoroutine(outcome):
                    outcome.close()
                log.error("connectivity callback %r is async but no event loop runs", callback)
                return
            task = loop.create_task(self._await_callback(callback, outcome))
            self._callback_tasks.add(task)
            task.add_done_callback(self._callback_tasks.discard)

    @staticmethod
    async def _await_callback(callback: TransitionCallback, outcome: Awaitable[None]) -> None:
        try:
            await outcome
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("connectivity callback %r failed", callback)

    # -- probing ----------------------------------------------------------------------------

    async def probe(self) -> bool:
        """GET ``{endpoint}/health`` once; record and return whether it answered 2xx."""
        if self.forced_offline or self.endpoint is None:
            return False
        try:
            response = await self._client.get(
                f"{self.endpoint}/health", headers=self._headers, timeout=self.probe_timeout_s
            )
            ok = response.is_success
            reason = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            ok = False
            reason = f"{type(exc).__name__}: {exc}"
        self._last_probe_at = self._wall_clock()
        self._last_probe_ok = ok
        if ok:
            self.record_success()
            if self._auth_headers:
                await self._probe_auth()
        else:
            log.info("connectivity probe of %s failed: %s", redact_url(self.endpoint), reason)
            self.record_failure()
        return ok

    async def _probe_auth(self) -> None:
        """Ask the cloud for a resource that needs our key; record whether it took the key."""
        assert self.endpoint is not None
        try:
            response = await self._client.get(
                f"{self.endpoint}{AUTH_PROBE_PATH}",
                headers=self._auth_headers,
                timeout=self.probe_timeout_s,
            )
        except httpx.HTTPError:
            return  # reachability is the other probe's business
        auth = (
            "refused"
            if response.status_code in (401, 403)
            else "ok"
            if response.is_success
            else self.auth
        )
        if auth == "refused" and self.auth != "refused":
            log.warning(
                "cloud %s refuses our EVERREACH_CLOUD_KEY (HTTP %d): every cloud call will fail "
                "until the key matches the cloud instance's",
                self.endpoint,
                response.status_code,
            )
        self.auth = auth

    async def start(self) -> None:
        """Start the background probe loop (first probe at once); a no-op when pinned offline."""
        if self._closed:
            raise RuntimeError("ConnectivityChecker is closed")
        if self._loop_task is not None or self.forced_offline or self.endpoint is None:
            return
        self._loop_task = asyncio.create_task(self._run(), name="connectivity-probe")

    async def _run(self) -> None:
        while True:
            try:
                await self.probe()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end the loop: the state would freeze
                log.exception("connectivity probe crashed")
            await self._sleep(self.interval_s)

    async def close(self) -> None:
        """Stop the probe loop and any running async callbacks (idempotent)."""
        self._closed = True
        tasks = [t for t in (self._loop_task, *self._callback_tasks) if t is not None]
        self._loop_task = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def snapshot(self) -> dict[str, Any]:
        """State for ``/health`` and ``/status``."""
        since_change_s = (
            None if self._last_change_mono is None else self._clock() - self._last_change_mono
        )
        return {
            "online": self.online,
            "offline_mode": self.forced_offline,
            "consecutive_failures": self._consecutive_failures,
            "offline_after": self.offline_after,
            "last_probe_at": _iso(self._last_probe_at),
            "last_probe_ok": self._last_probe_ok,
            "last_change_at": _iso(self._last_change_at),
            "since_change_s": since_change_s,
            "endpoint": redact_url(self.endpoint),
        }


def cloud_reachable(checker: ConnectivityChecker | None) -> bool:
    """Is the cloud reachable now? Never without a checker (no CLOUD_ENDPOINT configured)."""
    offline_mode = checker is not None and checker.forced_offline
    return cloud_link(checker, offline_mode=offline_mode) is CloudLink.ONLINE


def _iso(ts: float | None) -> str | None:
    return None if ts is None else utc_iso(ts)
