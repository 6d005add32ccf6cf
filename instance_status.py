"""InstanceStatus: what ``/health``, ``/status`` and the ``/metrics`` gauges say about an instance.

Every view is built here from each part's own ``snapshot()`` (or ``stats()``, ``size()``): no
part knows about the views, and no view reaches into a part's internals. ``/metrics`` must not do
I/O while it is scraped, so its gauges are recomputed here every ``GAUGE_REFRESH_S`` by a loop
this object owns (and on demand, after a person changes the outbox) and read from memory.
The self-test checks of ``system.self_test`` report from the same parts and live here too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from background_task import BackgroundTask
from connectivity_check import cloud_reachable
from envelope import rfc3339
from outbox_rows import OutboxStatus

# The parts are only reported on here, never built: their modules are the runtime's to import
# (a server without a cloud never loads cloud_executor).
if TYPE_CHECKING:
    from alerts import Alerter
    from cloud_executor import CloudExecutor
    from config.hybrid_config import HybridConfig
    from connectivity_check import ConnectivityChecker
    from cost_guard import CostGuard
    from hybrid_orchestrator import HybridOrchestrator
    from local_cron import LocalCron
    from local_executor import LocalExecutor
    from metrics import Metrics
    from offline_cache import OfflineCache
    from outbox import Outbox
    from route_table import RouteTable
    from service_registry import ServiceRegistry
    from sync_bus import SyncBus
    from sync_loop import SyncLoop

# /status lists this many outbox items waiting for their time (soonest first).
WAITING_SHOWN = 50

log = logging.getLogger("everreach.runtime")

VERSION = "0.1.0"
GAUGE_REFRESH_S = 5.0


@dataclass(frozen=True, kw_only=True)
class Parts:
    """The parts of a running instance that the views report on."""

    config: HybridConfig
    registry: ServiceRegistry
    route_table: RouteTable
    local: LocalExecutor
    metrics: Metrics
    cloud: CloudExecutor | None
    connectivity: ConnectivityChecker | None
    orchestrator: HybridOrchestrator
    cost_guard: CostGuard
    cache: OfflineCache
    outbox: Outbox
    bus: SyncBus
    cron: LocalCron
    sync: SyncLoop
    data_dir_shared_with: Mapping[str, Any] | None = None
    alerts: Alerter | None = None

    def is_cloud_reachable(self) -> bool:
        """Is the cloud reachable now? (never with OFFLINE_MODE, never without an endpoint)"""
        return cloud_reachable(self.connectivity)

    def cloud_circuit(self) -> str | None:
        return self.cloud.breaker.state.value if self.cloud is not None else None


class InstanceStatus:
    """Build ``/health``, ``/status`` and the gauges of one instance from its parts."""

    def __init__(
        self,
        parts: Parts,
        *,
        refresh_s: float = GAUGE_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.parts = parts
        self.refresh_s = refresh_s
        self._clock = clock
        self._started = clock()
        self.gauges: dict[str, Any] = {}
        parts.metrics.set_status_provider(lambda: self.gauges)
        self._task = BackgroundTask("gauges")

    @property
    def uptime_s(self) -> float:
        return self._clock() - self._started

    # -- the gauges /metrics reads --------------------------------------------------------------

    def render_metrics(self) -> tuple[bytes, str]:
        """The ``/metrics`` body and content type: the counters and the last computed gauges."""
        return self.parts.metrics.render()

    async def refresh_gauges(self) -> None:
        """Recompute the values /metrics reads (its provider must not do I/O)."""
        p = self.parts
        outbox = await p.outbox.snapshot()
        bus = await p.bus.stats()
        totals = p.cost_guard.current_totals()
        self.gauges = {
            "circuits": p.local.circuits(),
            "cloud_circuit": p.cloud_circuit() or "closed",
            "online": p.is_cloud_reachable(),
            "offline_mode": p.config.offline_mode,
            "outbox_depth": outbox.get("depth", 0),
            "dead_letters": outbox.get("dead_letters", 0),
            "cost_month_usd": float(totals.total_usd),
            "cost_soft_cap_usd": float(p.config.cost_soft_cap),
            "cost_hard_cap_usd": float(p.config.monthly_cost_cap),
            "cost_budget_closed": p.cost_guard.budget_closed(),
            "bus_backend": p.bus.backend,
            "bus_backlog": int(bus.get("backlog", 0) or 0),
            "cache_entries": await p.cache.size(),
        }

    async def start(self) -> None:
        """Compute the gauges once, then keep them fresh in the background."""
        await self.refresh_gauges()
        self._task.start(self._run)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh_gauges()
            except Exception:
                log.exception("gauge refresh failed")

    async def close(self) -> None:
        """Stop the refresh loop and wait for it (idempotent)."""
        await self._task.close()

    # -- the views ------------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """The ``/health`` body: is each part up, and is the cloud reachable and taking our key."""
        p = self.parts
        bus = await p.bus.stats()
        auth = p.connectivity.auth if p.connectivity is not None else None
        return {
            "status": "degraded" if auth == "refused" else "ok",
            "env": p.config.everreach_env.value,
            "online": p.is_cloud_reachable(),
            "offline_mode": p.config.offline_mode,
            "services": {
                "registry": {"ok": True, "actions": len(p.registry.actions())},
                "cloud": {
                    "configured": p.cloud is not None,
                    "serving_cloud": p.config.is_serving_cloud,
                    "reachable": p.is_cloud_reachable(),
                    "auth": auth,
                    "circuit": p.cloud_circuit(),
                },
                "cost_ledger": {"ok": p.cost_guard.healthy, "store": p.cost_guard.store_kind},
                "bus": {"ok": True, "backend": bus.get("backend")},
                "scheduler": {"ok": True},
            },
            "uptime_sec": round(self.uptime_s, 3),
            "version": VERSION,
            "data_dir_shared_with": p.data_dir_shared_with,
        }

    async def status(self) -> dict[str, Any]:
        """The ``/status`` body: every part's snapshot, for a person or the CLI."""
        p = self.parts
        return {
            "env": p.config.everreach_env.value,
            "version": VERSION,
            "uptime_sec": round(self.uptime_s, 3),
            "online": p.is_cloud_reachable(),
            "offline_mode": p.config.offline_mode,
            "connectivity": p.connectivity.snapshot() if p.connectivity else None,
            "dispatch_counts": p.orchestrator.snapshot(),
            "cloud_missing_handlers": dict(sorted(p.orchestrator.cloud_missing_handlers.items())),
            "circuits": {"local": p.local.circuits(), "cloud": p.cloud_circuit()},
            "cost": await p.cost_guard.snapshot(),
            "outbox": await p.outbox.snapshot(),
            "rate_limits": await self._rate_limits(),
            "dead_letters": [
                {
                    "id": i.id,
                    "action": i.action,
                    "attempts": i.attempts,
                    "error": i.last_error,
                    # may have run: retrying re-runs it (after a person confirms), or drop it
                    "indeterminate": i.status is OutboxStatus.INDETERMINATE,
                }
                for i in await p.outbox.dead_letters()
            ],
            # not sent before their time (deferred by pacing, or scheduled): cancellable
            "waiting": [
                {
                    "id": i.id,
                    "action": i.action,
                    "not_before": rfc3339(i.not_before) if i.not_before else None,
                }
                for i in await p.outbox.waiting(WAITING_SHOWN)
            ],
            "cache": {"entries": await p.cache.size(), "ttl_sec": p.config.cache_ttl_sec},
            "sync": p.sync.snapshot(),
            "scheduler": p.cron.snapshot(),
            "bus": await p.bus.stats(),
            "routes": {"source": p.route_table.source, "entries": len(p.route_table.names())},
            "actions": p.registry.actions(),
            "data_dir_shared_with": p.data_dir_shared_with,
            "alerts": self.alerts(),
        }

    def alerts(self) -> dict[str, Any] | None:
        """``/status``'s ``alerts``: the sinks set (names only: the webhook URL is a secret), the
        last events newest first, and the deliveries that failed."""
        return self.parts.alerts.snapshot() if self.parts.alerts is not None else None

    async def _rate_limits(self) -> dict[str, Any] | None:
        """Each pacing limit: used / max now, next free slot, deferred items, backlog."""
        deferral = self.parts.orchestrator.deferral
        return None if deferral is None else await deferral.snapshot()

    # -- system.self_test -----------------------------------------------------------------------

    def add_self_test_checks(self, registry: ServiceRegistry) -> None:
        """Register the checks ``system.self_test`` runs: stores, bus, cost ledger, cloud."""
        p = self.parts

        async def stores() -> dict[str, Any]:
            return {
                "ok": True,
                "cache_entries": await p.cache.size(),
                "outbox": await p.outbox.snapshot(),
            }

        async def bus() -> dict[str, Any]:
            return {"ok": True, **await p.bus.stats()}

        async def cost() -> dict[str, Any]:
            return {"ok": p.cost_guard.healthy, "store": p.cost_guard.store_kind}

        async def cloud() -> dict[str, Any]:
            if p.connectivity is None:
                return {"ok": True, "configured": False}
            reachable = await p.connectivity.probe()
            return {"ok": reachable or p.config.offline_mode, "reachable": reachable}

        checks = {"stores": stores, "bus": bus, "cost_ledger": cost, "cloud": cloud}
        for name, check in checks.items():
            registry.add_check(name, check)
