"""HybridOrchestrator: decide per call where an action runs, and what happens when it can't.

It composes the parts (route table, classifier, executors, cost guard, connectivity, cache,
outbox) and owns none of their state. The routing rules:

1. ``force_env`` ('local' | 'cloud') wins; anything else is ``invalid_params``.
2. ``EVERREACH_ENV`` local or cloud: that env, always.
3. hybrid: the route table's ``preferred_env``; ``auto`` asks the classifier.
4. at the soft cap, hybrid actions with a local handler go local (``cost_guard_triggered``);
   at the hard cap no cloud call is made at all.
5. offline: local handler, else a fresh cache entry, else the outbox for side effects, else
   ``offline`` with the stale entry under ``cached``.
6. cloud failure (hybrid): read-only actions fall back like rule 5; a side-effect action runs
   locally only when the failure proves the cloud never ran it, else it goes to the outbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from action_classifier import ActionClassifier, ActionKind
from connectivity_check import CloudLink, cloud_link
from envelope import Envelope, new_request_id
from errors import (
    ActionError,
    CloudUnavailable,
    CostCapReached,
    CostLimitExceeded,
    Env,
    HandlerError,
    Indeterminate,
    InvalidParams,
    KeyBusy,
    Offline,
    Source,
    Unauthorized,
    UnknownAction,
    storage_fault,
)
from local_executor import LocalExecutor
from route_table import Fallback, Preferred, Route, RouteTable
from service_registry import check_action_name, idempotency_key_scope

if TYPE_CHECKING:
    from cloud_executor import CloudExecutor, CloudResult
    from config.hybrid_config import HybridConfig
    from connectivity_check import ConnectivityChecker
    from cost_guard import CostGuard, Spend
    from cost_rates import CostRates
    from offline_cache import OfflineCache
    from outbox import Outbox

log = logging.getLogger("everreach.orchestrator")

# Answers that are definite: replaying them from the outbox would only fail the same way.
_DEFINITE = (UnknownAction, InvalidParams, Unauthorized, HandlerError)
_MAX_COUNTED_ACTIONS = 1_000


class HybridOrchestrator:
    """Routes actions between the local registry and the cloud."""

    def __init__(
        self,
        config: HybridConfig,
        *,
        local: LocalExecutor,
        cloud: CloudExecutor | None = None,
        route_table: RouteTable | None = None,
        classifier: ActionClassifier | None = None,
        cost_guard: CostGuard | None = None,
        rates: CostRates | None = None,
        connectivity: ConnectivityChecker | None = None,
        cache: OfflineCache | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        self.config = config
        self.env = config.everreach_env
        self.local = local
        self.cloud = cloud
        self.route_table = route_table or RouteTable.load(config.route_table_path)
        self.classifier = classifier or ActionClassifier()
        self.cost_guard = cost_guard
        self.rates = rates
        self.connectivity = connectivity
        self.cache = cache
        self.outbox = outbox
        self.counts: defaultdict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
        # Read-only actions the cloud answered 404 unknown_action for and that ran here instead:
        # a pair deployed with the handler on one side only, which would otherwise go unseen.
        self.cloud_missing_handlers: defaultdict[str, int] = defaultdict(int)
        self._background: set[asyncio.Task[Any]] = set()

    # -- routing decisions ----------------------------------------------------------------------

    def _select_env(self, action: str, force_env: str | None = None) -> Env:
        """Where ``action`` goes, by rules 1-4 (soft cap included)."""
        return self._plan(action, force_env, self.route_table.get(action))[0]

    def _plan(self, action: str, force_env: str | None, route: Route) -> tuple[Env, bool]:
        """(env, cost_guard_triggered) for one call."""
        if force_env is not None:
            if force_env not in ("local", "cloud"):
                raise InvalidParams(
                    f"force_env must be 'local' or 'cloud' (or left out); got {force_env!r}"
                )
            return Env(force_env), False
        if self.env is not Env.HYBRID:
            return self.env, False
        if route.preferred_env is Preferred.LOCAL:
            return Env.LOCAL, False
        if route.preferred_env is Preferred.AUTO and (
            self.classifier.classify(action) is ActionKind.COMPUTE
        ):
            return Env.LOCAL, False
        guard = self.cost_guard
        if guard is not None and guard.is_soft_cap_reached() and self.local.has(action):
            return Env.LOCAL, True
        return Env.CLOUD, False

    def is_offline(self) -> bool:
        link = cloud_link(self.connectivity, offline_mode=self.config.offline_mode)
        return link is CloudLink.OFFLINE

    # -- the one entry point --------------------------------------------------------------------

    async def route(
        self,
        action: str,
        params: dict[str, Any] | None = None,
        force_env: str | None = None,
        *,
        request_id: str | None = None,
    ) -> Envelope:
        """Run ``action`` where the rules say; always return an envelope, never raise."""
        started = time.perf_counter()
        request_id = request_id or new_request_id()
        params = {} if params is None else params
        try:
            with idempotency_key_scope(request_id):  # handlers read current_idempotency_key()
                check_action_name(action)
                if not isinstance(params, dict):
                    raise InvalidParams(
                        f"params must be a JSON object; got {type(params).__name__}"
                    )
                route = self.route_table.get(action)
                env, triggered = self._plan(action, force_env, route)
                if env is Env.LOCAL:
                    envelope = await self._run_local(action, params, request_id, route, force_env)
                else:
                    envelope = await self._run_cloud(action, params, request_id, route, force_env)
                envelope.cost_guard_triggered = envelope.cost_guard_triggered or triggered
                envelope.env = env
        except ActionError as exc:
            envelope = Envelope.failure(action, exc, source=None, request_id=request_id)
        except Exception as exc:
            fault = storage_fault(exc)  # e.g. the disk filled while queueing: no handler ran
            if fault is None:
                raise
            log.error("storage unavailable", extra={"action": action, "error": str(exc)})
            envelope = Envelope.failure(action, fault, source=None, request_id=request_id)
        envelope.duration_ms = (time.perf_counter() - started) * 1000
        self._count(action, envelope)
        return envelope

    def _count(self, action: str, envelope: Envelope) -> None:
        if action not in self.counts and (
            len(self.counts) >= _MAX_COUNTED_ACTIONS or envelope.error is not None
        ):
            action = "other"
        if envelope.ok or envelope.queued:
            key = envelope.source.value if envelope.source else "other"
        else:  # failures by what went wrong, whichever path they took
            key = envelope.error.value if envelope.error else "failed"
        self.counts[action][key] += 1

    # -- local ----------------------------------------------------------------------------------

    async def _run_local(
        self,
        action: str,
        params: dict[str, Any],
        request_id: str,
        route: Route,
        force_env: str | None,
    ) -> Envelope:
        try:
            result = await self.local.run(action, params)
        except ActionError as exc:
            # hybrid: a local-preferred action that cannot run here may run in the cloud.
            if (
                self.env is Env.HYBRID
                and force_env is None
                and route.fallback_env is Fallback.CLOUD
                and (exc.never_ran or not route.side_effect)
                and self.cloud is not None
                and not self.is_offline()
            ):
                return await self._run_cloud(action, params, request_id, route, "local")
            return Envelope.failure(action, exc, source=Source.LOCAL, request_id=request_id)
        return Envelope.success(
            action,
            result,
            source=Source.LOCAL,
            request_id=request_id,
            attempts=1,
        )

    # -- cloud ----------------------------------------------------------------------------------

    async def _run_cloud(
        self,
        action: str,
        params: dict[str, Any],
        request_id: str,
        route: Route,
        force_env: str | None,
    ) -> Envelope:
        if self.cloud is None:
            if self.config.is_serving_cloud:
                envelope = await self._run_local(action, params, request_id, route, "cloud")
                envelope.source = Source.CLOUD
                return envelope
            # Only force_env='cloud' gets here: the caller asked for what this instance lacks.
            raise InvalidParams(
                "no cloud is configured: set CLOUD_ENDPOINT and EVERREACH_CLOUD_KEY, or run "
                "the action with force_env='local'"
            )
        if self.is_offline():
            why = "OFFLINE_MODE=true" if self.config.offline_mode else "the cloud is unreachable"
            return await self._without_cloud(
                action, params, request_id, route, Offline(f"{why}; {action} needs the cloud")
            )

        try:
            done, cost = await self._call_cloud(action, params, request_id)
        except CostCapReached as exc:
            if force_env is None and self.env is Env.HYBRID and self.local.has(action):
                envelope = await self._run_local(action, params, request_id, route, "local")
                envelope.cost_guard_triggered = True
                return envelope
            failed = Envelope.failure(action, exc, source=None, request_id=request_id)
            failed.cost_guard_triggered = True
            return failed
        except ActionError as exc:
            if self.env is Env.HYBRID:
                # force_env 'local' here means _run_local already failed and sent us to the
                # cloud: running the local handler again would count one call's failure twice.
                return await self._without_cloud(
                    action, params, request_id, route, exc, local_tried=force_env == "local"
                )
            return Envelope.failure(action, exc, source=Source.CLOUD, request_id=request_id)

        if self.cache is not None and not route.side_effect:
            self._spawn(self.cache.put(action, params, done.result))
        return Envelope.success(
            action,
            done.result,
            source=Source.CLOUD,
            request_id=request_id,
            attempts=done.attempts,
            cost_usd=cost,
        )

    def _rate(self, action: str) -> Decimal:
        return self.rates.rate(action) if self.rates is not None else Decimal(0)

    async def _call_cloud(
        self, action: str, params: dict[str, Any], request_id: str, *, retry_busy: bool = True
    ) -> tuple[CloudResult, Decimal]:
        """One cloud call inside the cost cap: (its result, what it cost).

        Raises ``CostCapReached`` when the cap does not allow it (at our estimate, or at the
        cloud's own higher price), else the call's ``ActionError``. Whatever happens, the
        reservation is settled on the way out (``CostGuard.spend``).
        """
        assert self.cloud is not None
        estimate = self._rate(action)
        if self.cost_guard is None:
            done = await self.cloud.call(
                action, params, request_id=request_id, retry_busy=retry_busy
            )
            return done, done.cost_usd if done.cost_usd is not None else estimate
        async with self.cost_guard.spend(action, estimate, request_id) as spend:
            try:
                done = await self._cloud_call(action, params, request_id, spend, retry_busy)
            except CostLimitExceeded as exc:
                # The cloud prices it higher and ran nothing: reserve its price (if the cap
                # allows; else CostCapReached) and ask once more, within that new limit.
                await spend.reprice(exc.price_usd)
                done = await self._cloud_call(action, params, request_id, spend, retry_busy)
            cost = done.cost_usd if done.cost_usd is not None else spend.limit_usd
            spend.ran(cost)
        return done, cost

    async def _cloud_call(
        self,
        action: str,
        params: dict[str, Any],
        request_id: str,
        spend: Spend,
        retry_busy: bool,
    ) -> CloudResult:
        assert self.cloud is not None
        try:
            return await self.cloud.call(
                action,
                params,
                request_id=request_id,
                cost_limit_usd=spend.limit_usd,
                retry_busy=retry_busy,
            )
        except (KeyBusy, Indeterminate):
            # The key's first call holds (or held) its own reservation; this ask ran nothing.
            await spend.settle(never_ran=True)
            raise

    # -- when the cloud cannot be used ----------------------------------------------------------

    async def _without_cloud(
        self,
        action: str,
        params: dict[str, Any],
        request_id: str,
        route: Route,
        exc: ActionError,
        *,
        local_tried: bool = False,
    ) -> Envelope:
        """Rules 5 and 6: local handler, fresh cache, outbox, or the error with stale data."""
        if isinstance(exc, Unauthorized | InvalidParams):
            # A wrong key is a configuration error to see now, not to paper over locally; params
            # the cloud refused (or that could not even be sent) would be as wrong here.
            return Envelope.failure(action, exc, source=Source.CLOUD, request_id=request_id)
        if (
            not local_tried
            and route.fallback_env is not Fallback.NONE
            and (exc.never_ran or not route.side_effect)
            and self.local.has(action)
        ):
            try:
                result = await self.local.run(action, params)
            except ActionError as local_exc:
                log.warning(
                    "local fallback failed",
                    extra={"action": action, "error": local_exc.code.value},
                )
                if route.side_effect and not local_exc.never_ran:
                    # The local handler may have done part of the side effect: queueing it
                    # for the cloud too could do it twice. Answer the failure instead.
                    return Envelope.failure(
                        action, local_exc, source=Source.LOCAL_FALLBACK, request_id=request_id
                    )
            else:
                envelope = Envelope.success(
                    action,
                    result,
                    source=Source.LOCAL_FALLBACK,
                    request_id=request_id,
                    attempts=exc.attempts + 1,
                )
                if isinstance(exc, UnknownAction):
                    envelope.detail = self._cloud_lacks(action)
                return envelope
        if not route.side_effect and self.cache is not None:
            entry = await self.cache.get(action, params)
            if entry is not None:
                return Envelope.success(
                    action,
                    entry.response,
                    source=Source.CACHE,
                    request_id=request_id,
                    attempts=exc.attempts,
                    cached_at=entry.cached_at.isoformat(),
                )
        if route.side_effect and self.outbox is not None and not isinstance(exc, _DEFINITE):
            item = await self.outbox.enqueue(action, params, request_id)
            then = "queued and sent to the cloud once it answers"
            if isinstance(exc, Indeterminate):
                # Kept for a person to retry or drop: replaying the key would never run it.
                await self.outbox.park(item.id, f"{exc.code.value}: {exc.detail}")
                then = "parked in the outbox as 'may have run' for a person to retry or drop"
            return Envelope(
                ok=False,
                action=action,
                source=Source.OUTBOX,
                request_id=request_id,
                attempts=exc.attempts,
                queued=True,
                outbox_id=item.id,
                detail=f"{exc.detail}; {then}",
            )
        failed = Envelope.failure(action, exc, source=Source.CLOUD, request_id=request_id)
        if not route.side_effect and self.cache is not None:
            stale = await self.cache.get_stale(action, params)
            if stale is not None:
                failed.cached = stale.response
                failed.cached_at = stale.cached_at.isoformat()
        return failed

    def _cloud_lacks(self, action: str) -> str:
        """Count and log a cloud without a handler for ``action``; the envelope's detail."""
        if action in self.cloud_missing_handlers or (
            len(self.cloud_missing_handlers) < _MAX_COUNTED_ACTIONS
        ):
            self.cloud_missing_handlers[action] += 1
        detail = (
            f"the cloud has no handler for {action}: it ran here instead; register it on the "
            f"cloud instance too (EVERREACH_SERVICES)"
        )
        log.warning(detail, extra={"action": action, "event": "cloud_missing_handler"})
        return detail

    # -- outbox replay --------------------------------------------------------------------------

    async def send_queued(self, action: str, params: dict[str, Any], key: str) -> Any:
        """Send one outbox item to the cloud with its original key, inside the cost cap."""
        if self.cloud is None:
            raise CloudUnavailable("no cloud is configured", never_ran=True)
        done, _ = await self._call_cloud(action, params, key, retry_busy=False)
        return done.result

    # -- background work ------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for background writes (cache fills) to finish; call before closing stores."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def snapshot(self) -> dict[str, Any]:
        """Counts by action and source, for /status."""
        return {action: dict(sources) for action, sources in sorted(self.counts.items())}
