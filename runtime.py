"""Runtime: every resource of one server, opened in order and closed in reverse, once.

``local_server``'s lifespan is ``async with Runtime.open(config): …``. Nothing here runs at
import time. Components that reach other systems (Redis, PostgreSQL, the cloud) never stop
start-up when those are down: they degrade (SQLite fallback, fail-closed spend, offline mode)
and say so in ``/health``. A wrong configuration does stop start-up, with a ``ConfigError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from circuit_breaker import CircuitBreaker
from cloud_executor import CloudExecutor, RetryPolicy
from config.hybrid_config import HybridConfig, redact_url
from connectivity_check import ConnectivityChecker
from cost_guard import CostGuard
from cost_rates import CostRates
from dispatch_record import DispatchObserver
from errors import ConfigError
from hybrid_orchestrator import HybridOrchestrator
from idempotency import IdempotencyStore, RedisIdempotencyStore
from idempotency_pg import PostgresIdempotencyStore
from instance_lock import InstanceLock
from local_cron import LocalCron
from local_executor import LocalExecutor
from metrics import Metrics
from offline_cache import OfflineCache
from outbox import Outbox, OutboxStatus
from route_table import RouteTable
from service_registry import ServiceRegistry
from sqlite_file import check_data_dir, data_dir_error
from state_store import StateStore
from state_sync import StateSync
from sync_bus import SyncBus

log = logging.getLogger("everreach.runtime")
VERSION = "0.1.0"
GAUGE_REFRESH_S = 5.0


IdempotencyStores = IdempotencyStore | RedisIdempotencyStore | PostgresIdempotencyStore


def _idempotency_store(config: HybridConfig) -> IdempotencyStores:
    """PostgreSQL when configured (shared by every replica), else this instance's SQLite file
    (with Redis, if set, sharing claims between replicas while it keeps its data)."""
    if config.postgres_dsn:
        return PostgresIdempotencyStore(config.postgres_dsn)
    local_keys = IdempotencyStore.for_data_dir(config.data_dir)
    if config.redis_url:
        return RedisIdempotencyStore(config.redis_url, local_keys)
    return local_keys


class Runtime:
    """The composed parts of one running instance."""

    def __init__(self, config: HybridConfig) -> None:
        self.config = config
        self.started_at = time.time()
        self.started_monotonic = time.monotonic()
        self.registry = ServiceRegistry.from_modules(config.services_modules)
        self.route_table = RouteTable.load(config.route_table_path)
        self.rates = CostRates.load(config.cost_rates_file)
        self.metrics = Metrics([*self.route_table.names(), *self.registry.actions()])
        self.local = LocalExecutor(self.registry)
        self.client: httpx.AsyncClient | None = None
        self.connectivity: ConnectivityChecker | None = None
        self.cloud: CloudExecutor | None = None
        self.cost_guard: CostGuard | None = None
        self.cache = OfflineCache.from_config(config)
        self.outbox = Outbox.from_config(config)
        self.state_store = StateStore.from_config(config)
        self.idempotency = _idempotency_store(config)
        consumer = f"{socket.gethostname()}:{config.port}"
        self.bus = SyncBus.from_config(config, consumer_name=consumer)
        self.orchestrator: HybridOrchestrator | None = None
        self.state_sync: StateSync | None = None
        self.cron: LocalCron | None = None
        self.gauges: dict[str, Any] = {}
        self.instance_lock = InstanceLock(config.data_dir, host=config.host, port=config.port)
        self.data_dir_shared_with: dict[str, Any] | None = None
        self.last_sync: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._closers: list[Callable[[], Awaitable[None]]] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, config: HybridConfig) -> AsyncIterator[Runtime]:
        """Open every resource; close them all (in reverse) on exit, also after a failure."""
        runtime = cls(config)
        try:
            await runtime._open()
            yield runtime
        finally:
            await runtime._close()

    # -- start-up -------------------------------------------------------------------------------

    async def _open(self) -> None:
        config = self.config
        if not config.binds_loopback and config.local_api_token is None:
            raise ConfigError(
                f"HOST={config.host} exposes /dispatch beyond this machine, and LOCAL_API_TOKEN "
                f"is not set; set LOCAL_API_TOKEN (e.g. python -c 'import secrets; "
                f"print(secrets.token_urlsafe(32))') or bind HOST=127.0.0.1"
            )
        check_data_dir(config.data_dir)
        self._check_data_dir()
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            timeout=httpx.Timeout(config.cloud_timeout_sec),
        )
        self._closers.append(self.client.aclose)

        for store in (self.cache, self.outbox, self.state_store, self.idempotency):
            try:
                await store.open()
            except (sqlite3.Error, OSError) as exc:  # e.g. a read-only file in DATA_DIR
                raise data_dir_error(config.data_dir, exc) from exc
            self._closers.append(store.close)

        if config.cloud_endpoint:
            self._open_cloud()

        self.cost_guard = CostGuard.from_config(config, http_client=self.client)
        if self.cloud is not None:
            # Unsettled reservations of a crashed process: ask the cloud whether they ran.
            self.cost_guard.request_state = self.cloud.request_state
        self.cost_guard.on_overrun = self.metrics.inc_cost_overrun
        await self.cost_guard.open()
        self._closers.append(self.cost_guard.close)

        self.orchestrator = HybridOrchestrator(
            config,
            local=self.local,
            cloud=self.cloud,
            route_table=self.route_table,
            cost_guard=self.cost_guard,
            rates=self.rates,
            connectivity=self.connectivity,
            cache=self.cache,
            outbox=self.outbox,
            observer=DispatchObserver(metrics=self.metrics),
        )
        self._closers.append(self.orchestrator.drain)
        self.state_sync = StateSync.from_config(
            config,
            outbox=self.outbox,
            store=self.state_store,
            send=self.orchestrator.send_queued,
            client=self.client if self.cloud else None,
        )

        await self.bus.start()
        self._closers.append(self.bus.close)

        self.cron = LocalCron(
            config,
            route=self._route_dict,
            bus=self.bus,
            is_cloud_reachable=self.is_cloud_reachable,
            fetch_cloud_schedules=self._fetch_cloud_schedules if self.cloud else None,
            redis_url=config.redis_url,
        )
        await self.cron.start()
        self._closers.append(self.cron.close)

        self._add_self_test_checks()
        self.metrics.set_status_provider(lambda: self.gauges)
        await self.refresh_gauges()
        self._spawn(self._gauge_loop(), "gauges")
        if self.connectivity is not None:
            self.connectivity.on_transition(self._on_connectivity)
            await self.connectivity.start()
            self._closers.append(self.connectivity.close)
            self._spawn(self._sync_loop(), "state-sync")
        log.info(
            "started",
            extra={
                "env": config.everreach_env.value,
                "actions": len(self.registry.actions()),
                "cloud": redact_url(config.cloud_endpoint),
                "bus": self.bus.backend,
            },
        )

    def _check_data_dir(self) -> None:
        """Warn (and say in /health) when another live instance uses this DATA_DIR."""
        self.data_dir_shared_with = self.instance_lock.acquire()
        if self.instance_lock.held:

            async def release() -> None:
                self.instance_lock.release()

            self._closers.append(release)
        holder = self.data_dir_shared_with
        if holder is not None:
            log.warning(
                "DATA_DIR %s is in use by another live instance (pid %s, port %s): both share "
                "its cache, outbox and cost ledger; give each instance its own DATA_DIR",
                self.config.data_dir,
                holder.get("pid"),
                holder.get("port"),
                extra={"event": "data_dir_shared", "data_dir_holder": holder},
            )

    def _open_cloud(self) -> None:
        config = self.config
        assert self.client is not None and config.cloud_endpoint is not None
        self.connectivity = ConnectivityChecker.from_config(config, self.client)
        connectivity = self.connectivity
        self.cloud = CloudExecutor(
            endpoint=config.cloud_endpoint,
            api_key=config.secret("everreach_cloud_key"),
            client=self.client,
            timeout_s=config.cloud_timeout_sec,
            policy=RetryPolicy(retries=config.cloud_retries, backoff_s=config.cloud_backoff_sec),
            breaker=CircuitBreaker(failure_threshold=5, reset_after_s=30.0),
            on_retry=self.metrics.inc_cloud_retry,
            on_outcome=lambda ok: (
                connectivity.record_success() if ok else connectivity.record_failure()
            ),
        )

    def _add_self_test_checks(self) -> None:
        async def stores() -> dict[str, Any]:
            return {
                "ok": True,
                "cache_entries": await self.cache.size(),
                "outbox": await self.outbox.snapshot(),
            }

        async def bus() -> dict[str, Any]:
            stats = await self.bus.stats()
            return {"ok": True, **stats}

        async def cost() -> dict[str, Any]:
            assert self.cost_guard is not None
            return {"ok": self.cost_guard.healthy, "store": self.cost_guard.store_kind}

        async def cloud() -> dict[str, Any]:
            if self.connectivity is None:
                return {"ok": True, "configured": False}
            reachable = await self.connectivity.probe()
            return {"ok": reachable or self.config.offline_mode, "reachable": reachable}

        for name, check in (
            ("stores", stores),
            ("bus", bus),
            ("cost_ledger", cost),
            ("cloud", cloud),
        ):
            self.registry.add_check(name, check)

    # -- background work ------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        self._tasks.append(asyncio.ensure_future(coro))
        self._tasks[-1].set_name(name)

    async def _gauge_loop(self) -> None:
        while True:
            await asyncio.sleep(GAUGE_REFRESH_S)
            try:
                await self.refresh_gauges()
            except Exception:
                log.exception("gauge refresh failed")

    async def refresh_gauges(self) -> None:
        """Recompute the values /metrics reads (its provider must not do I/O)."""
        outbox = await self.outbox.snapshot()
        bus = await self.bus.stats()
        totals = self.cost_guard.current_totals() if self.cost_guard else None
        self.gauges = {
            "circuits": self.local.circuits(),
            "cloud_circuit": self.cloud.breaker.state.value if self.cloud else "closed",
            "online": self.is_cloud_reachable(),
            "offline_mode": self.config.offline_mode,
            "outbox_depth": outbox.get("depth", 0),
            "dead_letters": outbox.get("dead_letters", 0),
            "cost_month_usd": float(totals.total_usd) if totals else 0.0,
            "cost_soft_cap_usd": float(self.config.cost_soft_cap),
            "cost_hard_cap_usd": float(self.config.monthly_cost_cap),
            "cost_budget_closed": bool(self.cost_guard and self.cost_guard.budget_closed()),
            "bus_backend": self.bus.backend,
            "bus_backlog": int(bus.get("backlog", 0) or 0),
            "cache_entries": await self.cache.size(),
        }

    async def _sync_loop(self) -> None:
        """Pull the cloud's state at start-up, then push and pull every SYNC_INTERVAL_SEC."""
        while True:
            if self.is_cloud_reachable():
                await self.sync_once(pull=True)
            await asyncio.sleep(self.config.sync_interval_sec)

    async def sync_once(self, *, pull: bool = False) -> dict[str, Any]:
        """Replay the outbox and push local state; optionally pull the cloud's state."""
        assert self.state_sync is not None
        result: dict[str, Any] = {"at": time.time()}
        if self.cloud is not None and self.is_cloud_reachable():
            # The cloud answers its health probe (a restart, say): the replay's first call is
            # the breaker's trial, instead of an outbox waiting out the whole cool-down.
            self.cloud.breaker.try_now()
        try:
            result["push"] = await self.state_sync.push_pending_sync()
            if pull:
                result["pull"] = await self.state_sync.pull_cloud_state()
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
            log.warning("state sync failed", extra={"error": result["error"]})
        self.last_sync = result
        return result

    async def _on_connectivity(self, online: bool) -> None:
        log.warning("cloud connectivity changed", extra={"online": online})
        if online:
            await self.sync_once(pull=True)

    def is_cloud_reachable(self) -> bool:
        if self.config.offline_mode:
            return False
        return self.connectivity.online if self.connectivity is not None else False

    async def _route_dict(self, action: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self.orchestrator is not None
        return (await self.orchestrator.route(action, params)).to_dict()

    async def _fetch_cloud_schedules(self) -> list[dict[str, Any]]:
        assert self.cloud is not None
        body = await self.cloud.get_json("/api/schedules", timeout_s=10.0)
        schedules = body.get("schedules") if isinstance(body, dict) else body
        return list(schedules or [])

    # -- shut-down ------------------------------------------------------------------------------

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        while self._closers:
            closer = self._closers.pop()
            try:
                await closer()
            except Exception:
                log.exception("closing a resource failed")

    # -- views ----------------------------------------------------------------------------------

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_monotonic

    async def health(self) -> dict[str, Any]:
        bus = await self.bus.stats()
        auth = self.connectivity.auth if self.connectivity is not None else None
        return {
            "status": "degraded" if auth == "refused" else "ok",
            "env": self.config.everreach_env.value,
            "online": self.is_cloud_reachable(),
            "offline_mode": self.config.offline_mode,
            "services": {
                "registry": {"ok": True, "actions": len(self.registry.actions())},
                "cloud": {
                    "configured": self.cloud is not None,
                    "serving_cloud": self.config.is_serving_cloud,
                    "reachable": self.is_cloud_reachable(),
                    "auth": auth,
                    "circuit": self.cloud.breaker.state.value if self.cloud else None,
                },
                "cost_ledger": {
                    "ok": bool(self.cost_guard and self.cost_guard.healthy),
                    "store": self.cost_guard.store_kind if self.cost_guard else None,
                },
                "bus": {"ok": True, "backend": bus.get("backend")},
                "scheduler": {"ok": self.cron is not None},
            },
            "uptime_sec": round(self.uptime_s, 3),
            "version": VERSION,
            "data_dir_shared_with": self.data_dir_shared_with,
        }

    async def status(self) -> dict[str, Any]:
        assert self.orchestrator is not None and self.cost_guard is not None
        return {
            "env": self.config.everreach_env.value,
            "version": VERSION,
            "uptime_sec": round(self.uptime_s, 3),
            "online": self.is_cloud_reachable(),
            "offline_mode": self.config.offline_mode,
            "connectivity": self.connectivity.snapshot() if self.connectivity else None,
            "dispatch_counts": self.orchestrator.snapshot(),
            "cloud_missing_handlers": dict(
                sorted(self.orchestrator.cloud_missing_handlers.items())
            ),
            "circuits": {
                "local": self.local.circuits(),
                "cloud": self.cloud.breaker.state.value if self.cloud else None,
            },
            "cost": await self.cost_guard.snapshot(),
            "outbox": await self.outbox.snapshot(),
            "dead_letters": [
                {
                    "id": i.id,
                    "action": i.action,
                    "attempts": i.attempts,
                    "error": i.last_error,
                    # may have run: retrying re-runs it (after a person confirms), or drop it
                    "indeterminate": i.status is OutboxStatus.INDETERMINATE,
                }
                for i in await self.outbox.dead_letters()
            ],
            "cache": {"entries": await self.cache.size(), "ttl_sec": self.config.cache_ttl_sec},
            "sync": self.last_sync,
            "scheduler": self.cron.snapshot() if self.cron else None,
            "bus": await self.bus.stats(),
            "routes": {"source": self.route_table.source, "entries": len(self.route_table.names())},
            "actions": self.registry.actions(),
            "data_dir_shared_with": self.data_dir_shared_with,
        }
