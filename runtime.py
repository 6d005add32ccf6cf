"""Runtime: every resource of one server, opened in order and closed in reverse, once.

``local_server``'s lifespan is ``async with Runtime.open(config): …``. Nothing here runs at
import time, and nothing here but opening and closing: the views (``/health``, ``/status``, the
gauges) are ``instance_status``'s, and each background loop belongs to the part it serves
(probes to ``ConnectivityChecker``, sync to ``SyncLoop``, gauges to ``InstanceStatus``, schedules
to ``LocalCron``), which starts it when opened and stops it when closed.

Components that reach other systems (Redis, PostgreSQL, the cloud) never stop start-up when
those are down: they degrade (SQLite fallback, fail-closed spend, offline mode) and say so in
``/health``. A wrong configuration does stop start-up, with a ``ConfigError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import httpx

from alert_sources import (
    ALERT_DRAIN_S,
    BacklogWatch,
    CapWatch,
    alerter_from_config,
    circuit_alerts,
    cloud_online_alerts,
    dead_letter_alerts,
)
from circuit_breaker import CircuitBreaker
from cloud_client import CloudClient
from config.hybrid_config import HybridConfig, redact_url
from connectivity_check import ConnectivityChecker, cloud_reachable
from cost_guard import CostGuard
from cost_rates import CostRates
from deferral import Deferral, DueLoop, open_pacer, run_here_once
from dispatch_record import DispatchObserver
from errors import ConfigError
from hybrid_orchestrator import HybridOrchestrator
from idempotency import IdempotencyStore
from instance_lock import InstanceLock
from instance_status import VERSION, InstanceStatus, Parts
from local_cron import LocalCron
from local_executor import LocalExecutor
from metrics import Metrics
from offline_cache import OfflineCache
from outbox import Outbox
from redis_client import close_redis, open_redis
from route_table import RouteTable
from service_registry import ServiceRegistry
from sqlite_file import check_data_dir, data_dir_error
from state_store import StateStore
from state_sync import StateSync
from sync_bus import SyncBus
from sync_loop import SyncLoop

# Imported where the configuration asks for them (a cloud, PostgreSQL, Redis): a local server
# never loads them (~0.6 MiB resident and ~25 ms of start-up CPU together, measured).
if TYPE_CHECKING:
    from cloud_executor import CloudExecutor
    from idempotency_pg import PostgresIdempotencyStore
    from idempotency_redis import RedisIdempotencyStore
    from pacing import Pacer

__all__ = ["VERSION", "IdempotencyStores", "Runtime"]

log = logging.getLogger("everreach.runtime")

# How long an idle connection to the cloud is kept for reuse: under the 5 s after which the
# cloud's server (uvicorn's default keep-alive, as `everreach serve` and the image run it)
# closes one. At 5 s on both sides, a call made as the server closed its connection failed
# ("server disconnected"); three of those in a row marked the cloud offline for a moment and
# sent read-only calls to the local fallback (seen under wrk after 5 s without cloud calls).
CLOUD_KEEPALIVE_S = 4.0

IdempotencyStores: TypeAlias = "IdempotencyStore | RedisIdempotencyStore | PostgresIdempotencyStore"


def _idempotency_store(config: HybridConfig, redis: Any) -> IdempotencyStores:
    """PostgreSQL when configured (shared by every replica), else this instance's SQLite file
    (with Redis, if set, sharing claims between replicas while it keeps its data)."""
    if config.postgres_dsn:
        from idempotency_pg import PostgresIdempotencyStore

        return PostgresIdempotencyStore(config.postgres_dsn)
    local_keys = IdempotencyStore.for_data_dir(config.data_dir)
    if redis is not None:
        from idempotency_redis import RedisIdempotencyStore

        return RedisIdempotencyStore(config.redis_url, local_keys, redis=redis)
    return local_keys


class Runtime:
    """The composed parts of one running instance.

    Parts that need no I/O are built in ``__init__``; the others are set by ``open()`` in
    order, so every attribute below is there (``cloud`` and ``connectivity`` are ``None``
    without ``CLOUD_ENDPOINT``) for as long as the runtime is open.
    """

    client: httpx.AsyncClient
    cloud_client: CloudClient | None
    connectivity: ConnectivityChecker | None
    cloud: CloudExecutor | None
    cost_guard: CostGuard
    orchestrator: HybridOrchestrator
    state_sync: StateSync
    sync: SyncLoop
    cron: LocalCron
    instance_status: InstanceStatus
    data_dir_shared_with: dict[str, Any] | None

    def __init__(self, config: HybridConfig, stack: contextlib.AsyncExitStack) -> None:
        self.config = config
        self._stack = stack
        self.registry = ServiceRegistry.from_modules(config.services_modules)
        self.route_table = RouteTable.load(config.route_table_path)
        self.rates = CostRates.load(config.cost_rates_file)
        self.metrics = Metrics([*self.route_table.names(), *self.registry.actions()])
        self.instance_name = f"{socket.gethostname()}:{config.port}"
        # ALERT_ACTION runs on this instance's registry, never over HTTP to itself.
        self.alerter, self.alerts_client = alerter_from_config(
            config, instance=self.instance_name, run_action=lambda a, p: self.local.run(a, p)
        )
        self.local = LocalExecutor(self.registry, on_circuit=circuit_alerts(self.alerter))
        self.cache = OfflineCache.from_config(config)
        self.outbox = Outbox.from_config(config)
        self.state_store = StateStore.from_config(config)
        # One Redis client (one pool) for the bus, the idempotency store and the cron locks;
        # creating it does no I/O, and _open() registers its closing first, so it closes last.
        self.redis = open_redis(config.redis_url) if config.redis_url else None
        self.idempotency = _idempotency_store(config, self.redis)
        # RATE_LIMITS_PATH is read here, like the route table: a malformed file stops start-up.
        self.pacer = open_pacer(config, self.redis)
        self.deferral = Deferral(self.pacer, self.outbox)
        self.bus = SyncBus.from_config(config, consumer_name=self.instance_name, redis=self.redis)
        self.instance_lock = InstanceLock(config.data_dir, host=config.host, port=config.port)
        self.cloud_client = None
        self.connectivity = None
        self.cloud = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, config: HybridConfig) -> AsyncIterator[Runtime]:
        """Open every resource; close them all (in reverse) on exit, also after a failure."""
        async with contextlib.AsyncExitStack() as stack:
            runtime = cls(config, stack)
            await runtime._open()
            yield runtime

    def _on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Close ``closer``'s resource on exit; a failure there is logged, the others still run."""

        async def close() -> None:
            try:
                await closer()
            except Exception:
                log.exception("closing a resource failed")

        self._stack.push_async_callback(close)

    # -- start-up, in order -----------------------------------------------------------------------

    async def _open(self) -> None:
        self._check_exposure()
        self._open_redis()
        check_data_dir(self.config.data_dir)
        self._lock_data_dir()
        self._open_http_client()
        self._open_alerts()
        self.cloud_client = CloudClient.from_config(self.config, self.client)
        if self.cloud_client is not None:
            self._open_cloud(self.cloud_client)
        self._build_cost_guard()
        # The stores (one SQLite file), the pacing store and the cost ledger (a file each, or
        # a database) are opened side by side, each on its own thread: their schema commits
        # and fsyncs overlap. All are open (schemas made, the month's spend loaded) before
        # anything serves.
        await self._open_together(
            [
                (self._open_stores, [store.close for store in self._stores()]),
                (self.pacer.open, [self.pacer.aclose]),  # down now is not fatal: calls defer
                (self.cost_guard.open, [self.cost_guard.close]),
            ]
        )
        if len(self.pacer.limits):  # no limits, no backlog to watch
            self.watch_backlog(self.pacer)
        self._open_orchestrator()
        self._open_state_sync()
        await self.bus.start()
        self._on_close(self.bus.close)
        await self._open_cron()
        await self._open_status()
        await self._watch_cloud()
        self._open_due_loop()
        log.info(
            "started",
            extra={
                "env": self.config.everreach_env.value,
                "version": VERSION,
                "actions": len(self.registry.actions()),
                "cloud": redact_url(self.config.cloud_endpoint),
                "bus": self.bus.backend,
            },
        )

    def _check_exposure(self) -> None:
        config = self.config
        if not config.binds_loopback and config.local_api_token is None:
            raise ConfigError(
                f"HOST={config.host} exposes /dispatch beyond this machine, and LOCAL_API_TOKEN "
                f"is not set; set LOCAL_API_TOKEN (e.g. python -c 'import secrets; "
                f"print(secrets.token_urlsafe(32))') or bind HOST=127.0.0.1"
            )

    def _lock_data_dir(self) -> None:
        """Warn (and say in /health) when another live instance uses this DATA_DIR."""
        self.data_dir_shared_with = holder = self.instance_lock.acquire()
        if self.instance_lock.held:

            async def release() -> None:
                self.instance_lock.release()

            self._on_close(release)
        if holder is not None:
            log.warning(
                "DATA_DIR %s is in use by another live instance (pid %s, port %s): both share "
                "its cache, outbox and cost ledger; give each instance its own DATA_DIR",
                self.config.data_dir,
                holder.get("pid"),
                holder.get("port"),
                extra={"event": "data_dir_shared", "data_dir_holder": holder},
            )

    def _open_redis(self) -> None:
        if self.redis is not None:
            redis = self.redis
            self._on_close(lambda: close_redis(redis))

    def _open_http_client(self) -> None:
        # As many connections as a /batch may keep in flight (BATCH_MAX_CONCURRENT), all kept
        # alive: with 20 kept alive, every burst past 20 closed its extra connections after.
        connections = max(100, self.config.batch_max_concurrent)
        limits = httpx.Limits(
            max_connections=connections,
            max_keepalive_connections=connections,
            keepalive_expiry=CLOUD_KEEPALIVE_S,
        )
        # Imported here: aiohttp is for the cloud calls, not for answering the first request.
        from cloud_transport import CloudTransport

        self.client = httpx.AsyncClient(
            transport=CloudTransport(limits=limits),
            timeout=httpx.Timeout(self.config.cloud_timeout_sec),
        )
        self._on_close(self.client.aclose)

    def _open_alerts(self) -> None:
        """Deliver alerts from here on; at shutdown queued ones get ALERT_DRAIN_S to go out.

        Opened before every part that emits, so it closes after all of them.
        """
        if self.alerts_client is not None:
            self._on_close(self.alerts_client.aclose)
        action = self.config.alert_action
        if action and not self.local.has(action):
            raise ConfigError(
                f"ALERT_ACTION={action} has no handler on this instance; register it in a "
                f"module of EVERREACH_SERVICES, or unset ALERT_ACTION"
            )
        alerter = self.alerter
        alerter.start()
        self._on_close(lambda: alerter.aclose(drain_s=ALERT_DRAIN_S))
        self.outbox.on_dead_letter = dead_letter_alerts(alerter)

    def watch_backlog(self, pacer: Pacer) -> BacklogWatch:
        """Alert (``rate_limit_backlog``) when ``pacer``'s deferred work is over an hour behind;
        the watch stops with the runtime. Call once, after the pacer is opened."""
        watch = BacklogWatch(pacer, self.alerter)
        watch.start()
        self._on_close(watch.close)
        return watch

    async def _open_together(
        self,
        parts: Sequence[
            tuple[Callable[[], Awaitable[None]], Sequence[Callable[[], Awaitable[None]]]]
        ],
    ) -> None:
        """Run each ``(open, closers)`` part's ``open`` at once; its closers are registered (in
        the given order) for every part that opened. The first failure, in that order, is
        raised once all have finished: the parts that did open are then closed with the rest."""
        tasks = [asyncio.ensure_future(open_()) for open_, _ in parts]
        try:
            await asyncio.wait(tasks)
        finally:
            for task in tasks:  # cancelled while opening: each part ends before it is judged
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task, (_, closers) in zip(tasks, parts, strict=True):
                if not task.cancelled() and task.exception() is None:
                    for closer in closers:
                        self._on_close(closer)
        for task in tasks:
            task.result()

    def _stores(self) -> tuple[OfflineCache, Outbox, StateStore, IdempotencyStores]:
        return (self.cache, self.outbox, self.state_store, self.idempotency)

    async def _open_stores(self) -> None:
        """The cache, outbox, state and idempotency stores, one after another: they share one
        SQLite file, and two connections turning a new file to WAL at once may fail with
        "database is locked". A failure closes the ones already open."""
        opened: list[Any] = []
        try:
            for store in self._stores():
                try:
                    await store.open()
                except (sqlite3.Error, OSError) as exc:  # e.g. a read-only file in DATA_DIR
                    raise data_dir_error(self.config.data_dir, exc) from exc
                opened.append(store)
        except BaseException:
            for store in reversed(opened):
                try:
                    await store.close()
                except Exception:
                    log.exception("closing a resource failed")
            raise

    def _open_due_loop(self) -> None:
        """Send deferred and scheduled outbox items when their time comes."""
        self.due_loop = DueLoop(
            self.outbox,
            self.state_sync.replay_outbox,
            is_online=self._is_cloud_reachable if self.cloud is not None else lambda: True,
        )
        self.deferral.on_deferred = self.due_loop.poke
        self.due_loop.start()
        self._on_close(self.due_loop.close)

    async def _send_queued(self, action: str, params: dict[str, Any], key: str) -> Any:
        """Send an outbox item to the cloud; without a cloud, run it here (once per key)."""
        if self.cloud is not None:
            return await self.orchestrator.send_queued(action, params, key)
        rerun = self.route_table.get(action).idempotent
        return await run_here_once(
            self.idempotency, self.local, action, params, key, rerun_if_dead=rerun
        )

    def _open_cloud(self, cloud_client: CloudClient) -> None:
        from cloud_batch import CloudBatcher
        from cloud_executor import CloudExecutor, RetryPolicy

        config = self.config
        connectivity = ConnectivityChecker.from_config(config, cloud_client)
        connectivity.on_transition(cloud_online_alerts(self.alerter, connectivity))
        self.connectivity = connectivity
        on_circuit = circuit_alerts(self.alerter)
        batcher = CloudBatcher(cloud_client)
        self._on_close(batcher.aclose)  # before the HTTP client closes: requests end first
        self.cloud = CloudExecutor(
            endpoint=cloud_client.endpoint,
            api_key=None,
            client=cloud_client.http,
            cloud_client=cloud_client,
            batcher=batcher,
            policy=RetryPolicy(retries=config.cloud_retries, backoff_s=config.cloud_backoff_sec),
            breaker=CircuitBreaker(
                failure_threshold=5,
                reset_after_s=30.0,
                on_change=lambda opened: on_circuit("cloud", opened),
            ),
            on_retry=self.metrics.inc_cloud_retry,
            on_outcome=lambda ok: (
                connectivity.record_success() if ok else connectivity.record_failure()
            ),
        )

    def _build_cost_guard(self) -> None:
        """The cost guard, wired to the cloud and the alerts; ``open`` loads the month."""
        self.cost_guard = CostGuard.from_config(self.config, http_client=self.client)
        if self.cloud is not None:
            # Unsettled reservations of a crashed process: ask the cloud whether they ran.
            self.cost_guard.request_state = self.cloud.request_state
        self.cost_guard.on_overrun = self.metrics.inc_cost_overrun
        self.cost_guard.on_totals = CapWatch(
            self.alerter,
            soft_cap_usd=self.config.cost_soft_cap,
            hard_cap_usd=self.config.monthly_cost_cap,
        )

    def _open_orchestrator(self) -> None:
        self.orchestrator = HybridOrchestrator(
            self.config,
            local=self.local,
            cloud=self.cloud,
            route_table=self.route_table,
            cost_guard=self.cost_guard,
            rates=self.rates,
            connectivity=self.connectivity,
            cache=self.cache,
            outbox=self.outbox,
            observer=DispatchObserver(metrics=self.metrics, log_lines=self.config.log_dispatch),
            deferral=self.deferral,
        )
        self._on_close(self.orchestrator.drain)

    async def _open_cron(self) -> None:
        orchestrator = self.orchestrator

        async def route(action: str, params: dict[str, Any]) -> dict[str, Any]:
            return (await orchestrator.route(action, params)).to_dict()

        self.cron = LocalCron(
            self.config,
            route=route,
            bus=self.bus,
            is_cloud_reachable=self._is_cloud_reachable,
            fetch_cloud_schedules=self.cloud_client.schedules if self.cloud_client else None,
            redis=self.redis,
        )
        await self.cron.start()
        self._on_close(self.cron.close)

    def _open_state_sync(self) -> None:
        self.state_sync = StateSync.from_config(
            self.config,
            outbox=self.outbox,
            store=self.state_store,
            send=self._send_queued,
            cloud=self.cloud_client,
            deferral=self.deferral,
        )
        cloud = self.cloud
        self.sync = SyncLoop(
            self.state_sync,
            interval_s=self.config.sync_interval_sec,
            is_online=self._is_cloud_reachable,
            # The cloud answers its health probe (a restart, say): the replay's first call is
            # the breaker's trial, instead of an outbox waiting out the whole cool-down.
            before_replay=cloud.breaker.try_now if cloud is not None else None,
        )

    async def _open_status(self) -> None:
        self.instance_status = InstanceStatus(
            Parts(
                config=self.config,
                registry=self.registry,
                route_table=self.route_table,
                local=self.local,
                metrics=self.metrics,
                cloud=self.cloud,
                connectivity=self.connectivity,
                orchestrator=self.orchestrator,
                cost_guard=self.cost_guard,
                cache=self.cache,
                outbox=self.outbox,
                bus=self.bus,
                cron=self.cron,
                sync=self.sync,
                data_dir_shared_with=self.data_dir_shared_with,
                alerts=self.alerter,
            )
        )
        self.instance_status.add_self_test_checks(self.registry)
        await self.instance_status.start()
        self._on_close(self.instance_status.close)

    async def _watch_cloud(self) -> None:
        """Probe the cloud, and sync with it at start-up, on an interval and on reconnection."""
        if self.connectivity is None:
            return
        self.connectivity.on_transition(self.sync.on_connectivity)
        await self.connectivity.start()
        self._on_close(self.connectivity.close)
        self.sync.start()
        self._on_close(self.sync.close)

    def _is_cloud_reachable(self) -> bool:
        return cloud_reachable(self.connectivity)
