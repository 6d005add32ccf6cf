"""HybridOrchestrator: decide per call where an action runs, and what happens when it can't.

It composes the parts (route table, classifier, executors, cost guard, connectivity, cache,
outbox) and owns none of their state. ``route()`` asks the pure ``plan()`` (route_plan.py, where
the routing rules are written down) for the ladder of one call and walks it once, top to
bottom; no step calls another back. ``serve()`` is the one entry of the cloud role: another
instance's call to ``/api/services/*``, or a ``/dispatch`` on an instance that is the cloud.
Every call ends in one immutable envelope and one ``DispatchRecord`` for the observer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from action_classifier import ActionClassifier
from connectivity_check import CloudLink, cloud_link
from cost_reservation import check_cost_limit
from dispatch_record import DispatchObserver, DispatchRecord
from envelope import Envelope, new_request_id
from errors import (
    ActionError,
    CloudUnavailable,
    CostCapReached,
    CostLimitExceeded,
    Env,
    Indeterminate,
    InvalidParams,
    KeyBusy,
    Offline,
    RateLimited,
    Source,
    UnknownAction,
    storage_fault,
)
from local_executor import LocalExecutor
from route_plan import (
    Plan,
    RouteState,
    Step,
    StepKind,
    admits,
    carries_stale,
    plan,
    select_env,
)
from route_table import Preferred, Route, RouteTable
from service_registry import Ran, check_action_name, idempotency_key_scope

if TYPE_CHECKING:
    from cloud_executor import CloudExecutor, CloudResult
    from config.hybrid_config import HybridConfig
    from connectivity_check import ConnectivityChecker
    from cost_guard import CostGuard, Spend
    from cost_rates import CostRates
    from deferral import Deferral
    from offline_cache import OfflineCache
    from outbox import Outbox

__all__ = ["HybridOrchestrator", "plan"]

log = logging.getLogger("everreach.orchestrator")


@dataclass(slots=True)
class _Call:
    """One call on its way down the ladder; builds its envelope once, when it ends."""

    action: str
    params: dict[str, Any]
    request_id: str
    route: Route
    env: Env | None
    started: float
    triggered: bool = False
    json_params: bool = False  # params read by the strict JSON parser: not checked again
    batched: bool = False  # an item of a /batch: its cloud call goes with the others'

    def success(self, result: Any, source: Source, **fields: Any) -> Envelope:
        if isinstance(result, Ran):  # a local run: the body embeds the registry's JSON text
            result, fields["result_json"] = result.value, result.json
        return Envelope.success(
            self.action,
            result,
            source=source,
            request_id=self.request_id,
            duration_ms=(time.perf_counter() - self.started) * 1000,
            cost_guard_triggered=self.triggered,
            env=self.env,
            **fields,
        )

    def failure(self, exc: ActionError, source: Source | None, **fields: Any) -> Envelope:
        return Envelope.failure(
            self.action,
            exc,
            source=source,
            request_id=self.request_id,
            duration_ms=(time.perf_counter() - self.started) * 1000,
            cost_guard_triggered=self.triggered,
            env=self.env,
            **fields,
        )


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
        observer: DispatchObserver | None = None,
        deferral: Deferral | None = None,
    ) -> None:
        self.config = config
        self.env = config.everreach_env
        self._serving_cloud = config.is_serving_cloud  # the config is frozen: read it once
        self.local = local
        self.cloud = cloud
        self.route_table = route_table or RouteTable.load(config.route_table_path)
        self.classifier = classifier or ActionClassifier()
        self.cost_guard = cost_guard
        self.rates = rates
        self.connectivity = connectivity
        self.cache = cache
        self.outbox = outbox
        self.observer = observer or DispatchObserver()
        self.deferral = deferral  # pacing and schedules (deferral.py)

    # -- routing decisions ----------------------------------------------------------------------

    def plan(self, action: str, force_env: str | None = None) -> Plan:
        """The ladder ``route()`` would walk for ``action`` now."""
        route = self.route_table.get(action)
        return plan(action, route, self._state(action, route, force_env))

    def _select_env(self, action: str, force_env: str | None = None) -> Env:
        """Where ``action`` goes, by rules 1-4 (soft cap included)."""
        route = self.route_table.get(action)
        return select_env(route, self._state(action, route, force_env))[0]

    def _state(self, action: str, route: Route, force_env: str | None) -> RouteState:
        guard = self.cost_guard
        return RouteState(
            env=self.env,
            force_env=force_env,
            kind=(
                self.classifier.classify(action) if route.preferred_env is Preferred.AUTO else None
            ),
            has_local=self.local.has(action),
            cloud=self.cloud is not None,
            serving_cloud=self._serving_cloud,
            offline_reason=self._offline_reason(),
            # Rule 4 reads it only for an unforced call on a hybrid instance: no ledger
            # totals (a month computed, three sums compared) on other calls.
            soft_cap=(
                guard is not None
                and force_env is None
                and self.env is Env.HYBRID
                and guard.is_soft_cap_reached()
            ),
            cache=self.cache is not None,
            outbox=self.outbox is not None,
        )

    def _offline_reason(self) -> str | None:
        link = cloud_link(self.connectivity, offline_mode=self.config.offline_mode)
        if link is not CloudLink.OFFLINE:
            return None
        return "OFFLINE_MODE=true" if self.config.offline_mode else "the cloud is unreachable"

    def is_offline(self) -> bool:
        return self._offline_reason() is not None

    # -- the two entry points -------------------------------------------------------------------

    async def route(
        self,
        action: str,
        params: dict[str, Any] | None = None,
        force_env: str | None = None,
        *,
        request_id: str | None = None,
        not_before: datetime | None = None,
        json_params: bool = False,
        batched: bool = False,
    ) -> Envelope:
        """Run ``action`` where the rules say (or after ``not_before``); always an envelope.

        ``json_params``: ``params`` came from the strict JSON parser (``request_body``), which
        already refused what the registry's params check refuses (NaN, lone surrogates).
        ``batched``: an item of a ``/batch``; a cloud call goes out with the others made in the
        same loop turn (``cloud_batch``), and is otherwise the same call.
        """
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
                ladder = plan(action, route, self._state(action, route, force_env))
                call = _Call(action, params, request_id, route, ladder.env, started)
                call.json_params, call.batched = json_params, batched
                kept = self.deferral and await self.deferral.answer(  # pacing, schedules
                    action, params, request_id, route.side_effect, not_before, started=started
                )
                envelope = kept or await self._walk(ladder, call)
        except ActionError as exc:
            envelope = self._fault(action, exc, request_id, started)
        except Exception as exc:
            fault = storage_fault(exc)  # e.g. the disk filled while queueing: no handler ran
            if fault is None:
                raise
            log.error("storage unavailable", extra={"action": action, "error": str(exc)})
            envelope = self._fault(action, fault, request_id, started)
        self.observer.observe(DispatchRecord.of(envelope))
        return envelope

    async def serve(self, action: str, params: dict[str, Any], request_id: str) -> Envelope:
        """Run ``action`` here as the cloud (``source='cloud'``, priced at our rate)."""
        call = _Call(action, params, request_id, self.route_table.get(action), Env.CLOUD, 0.0)
        call.started = time.perf_counter()
        with idempotency_key_scope(request_id):
            try:
                if self.deferral is not None:
                    await self.deferral.serve_gate(action)
                envelope = await self._serve_here(call)
            except ActionError as exc:
                envelope = call.failure(exc, Source.CLOUD)
        self.observer.observe(DispatchRecord.of(envelope))
        return envelope

    @staticmethod
    def _fault(action: str, exc: ActionError, request_id: str, started: float) -> Envelope:
        duration_ms = (time.perf_counter() - started) * 1000
        return Envelope.failure(
            action, exc, source=None, request_id=request_id, duration_ms=duration_ms
        )

    def check_cost_limit(self, action: str, header: str | None) -> None:
        """Refuse, before anything runs, a served call priced above the caller's Cost-Limit
        (``cost_reservation.check_cost_limit``); an action with no handler here is left to
        answer 404, whatever its price."""
        if header is not None and self.local.has(action):
            check_cost_limit(action, header, self._rate(action))

    def snapshot(self) -> dict[str, Any]:
        """Counts by action and source, for /status."""
        return self.observer.snapshot()

    @property
    def cloud_missing_handlers(self) -> dict[str, int]:
        """Read-only actions the cloud had no handler for, and how often each ran here."""
        return self.observer.cloud_missing_handlers

    # -- walking the ladder ---------------------------------------------------------------------

    async def _walk(self, ladder: Plan, call: _Call) -> Envelope:
        """Try the steps in order; the first that serves the call answers it."""
        cause: ActionError | None = None
        cause_kind: StepKind | None = None
        cause_source: Source | None = None
        call.triggered = ladder.cost_guard_triggered
        if ladder.offline_detail is not None:
            cause, cause_kind, cause_source = (
                Offline(ladder.offline_detail),
                StepKind.CLOUD,
                Source.CLOUD,
            )
        for step in ladder.steps:
            if not admits(step, call.route, cause, cause_kind):
                continue
            try:
                envelope = await self._take(step, call, cause)
            except ActionError as exc:
                if step.kind is StepKind.LOCAL_FALLBACK:
                    log.warning(
                        "local fallback failed",
                        extra={"action": call.action, "error": exc.code.value},
                    )
                    if call.route.side_effect and not exc.never_ran:
                        # The local handler may have done part of the side effect: queueing it
                        # for the cloud too could do it twice. Answer the failure instead.
                        return call.failure(exc, Source.LOCAL_FALLBACK)
                    continue  # the cloud's failure still decides what comes next
                cause, cause_kind, cause_source = exc, step.kind, step.source
                if isinstance(exc, CostCapReached):
                    call.triggered, cause_source = True, None
                continue
            if envelope is not None:
                return envelope
        assert cause is not None  # every ladder starts with a step that runs or a refusal
        if carries_stale(ladder, cause, cause_kind) and self.cache is not None:
            stale = await self.cache.get_stale(call.action, call.params)
            if stale is not None:
                return call.failure(
                    cause,
                    cause_source,
                    cached=stale.response,
                    cached_at=stale.cached_at.isoformat(),
                )
        return call.failure(cause, cause_source)

    async def _take(self, step: Step, call: _Call, cause: ActionError | None) -> Envelope | None:
        """Run one step: its envelope, None when it has nothing (a cache miss), or raise."""
        action, params = call.action, call.params
        if step.kind is StepKind.LOCAL:
            ran = await self.local.ran(action, params, json_params=call.json_params)
            return call.success(ran, Source.LOCAL, attempts=1)
        if step.kind is StepKind.SERVE:
            return await self._serve_here(call)
        if step.kind is StepKind.CLOUD:
            done, cost = await self._call_cloud(
                action, params, call.request_id, batched=call.batched
            )
            if self.cache is not None and not call.route.side_effect:
                self.cache.remember(action, params, done.result)  # written behind, grouped
            return call.success(done.result, Source.CLOUD, attempts=done.attempts, cost_usd=cost)
        assert cause is not None  # the remaining steps answer a failure
        if step.kind is StepKind.LOCAL_FALLBACK:
            result = await self.local.ran(action, params, json_params=call.json_params)
            detail = self.observer.cloud_lacks(action) if isinstance(cause, UnknownAction) else None
            return call.success(
                result, Source.LOCAL_FALLBACK, attempts=cause.attempts + 1, detail=detail
            )
        if step.kind is StepKind.CACHE:
            assert self.cache is not None
            entry = await self.cache.get(action, params)
            if entry is None:
                return None
            return call.success(
                entry.response,
                Source.CACHE,
                attempts=cause.attempts,
                cached_at=entry.cached_at.isoformat(),
            )
        return await self._queue(call, cause)

    async def _serve_here(self, call: _Call) -> Envelope:
        result = await self.local.ran(call.action, call.params)
        return call.success(result, Source.CLOUD, attempts=1, cost_usd=self._rate(call.action))

    async def _queue(self, call: _Call, cause: ActionError) -> Envelope:
        """Keep a side effect the cloud could not take in the outbox, to send it later."""
        assert self.outbox is not None
        if isinstance(cause, RateLimited) and self.deferral is not None:  # the cloud's limit
            return await self.deferral.keep_until(
                call.action, call.params, call.request_id, cause.not_before, started=call.started
            )
        item = await self.outbox.enqueue(call.action, call.params, call.request_id)
        then = "queued and sent to the cloud once it answers"
        if isinstance(cause, Indeterminate):
            # Kept for a person to retry or drop: replaying the key would never run it.
            await self.outbox.park(item.id, f"{cause.code.value}: {cause.detail}")
            then = "parked in the outbox as 'may have run' for a person to retry or drop"
        return Envelope.queued_in_outbox(
            call.action,
            outbox_id=item.id,
            request_id=call.request_id,
            detail=f"{cause.detail}; {then}",
            attempts=cause.attempts,
            duration_ms=(time.perf_counter() - call.started) * 1000,
            cost_guard_triggered=call.triggered,
            env=call.env,
        )

    # -- the cloud, inside the cost cap ---------------------------------------------------------

    def _rate(self, action: str) -> Decimal:
        return self.rates.rate(action) if self.rates is not None else Decimal(0)

    async def _call_cloud(
        self,
        action: str,
        params: dict[str, Any],
        request_id: str,
        *,
        retry_busy: bool = True,
        batched: bool = False,
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
                action, params, request_id=request_id, retry_busy=retry_busy, batched=batched
            )
            return done, done.cost_usd if done.cost_usd is not None else estimate
        async with self.cost_guard.spend(action, estimate, request_id, commit_behind=True) as spend:
            try:
                done = await self._cloud_call(
                    action, params, request_id, spend, retry_busy, batched
                )
            except CostLimitExceeded as exc:
                # The cloud prices it higher and ran nothing: reserve its price (if the cap
                # allows; else CostCapReached) and ask once more, within that new limit.
                await spend.reprice(exc.price_usd)
                done = await self._cloud_call(
                    action, params, request_id, spend, retry_busy, batched
                )
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
        batched: bool = False,
    ) -> CloudResult:
        assert self.cloud is not None
        try:
            return await self.cloud.call(
                action,
                params,
                request_id=request_id,
                cost_limit_usd=spend.limit_usd,
                retry_busy=retry_busy,
                batched=batched,
            )
        except (KeyBusy, Indeterminate):
            # The key's first call holds (or held) its own reservation; this ask ran nothing.
            await spend.settle(never_ran=True)
            raise

    # -- outbox replay --------------------------------------------------------------------------

    async def send_queued(self, action: str, params: dict[str, Any], key: str) -> Any:
        """Send one outbox item to the cloud with its original key, inside the cost cap."""
        if self.cloud is None:
            raise CloudUnavailable("no cloud is configured", never_ran=True)
        done, _ = await self._call_cloud(action, params, key, retry_busy=False)
        return done.result

    # -- background work ------------------------------------------------------------------------

    async def drain(self) -> None:
        """Write the cache fills still held in memory; call before closing stores."""
        if self.cache is None:
            return
        try:
            await self.cache.flush()
        except Exception:  # a cache: losing its newest entries must not stop the shutdown
            log.exception("offline cache: the latest entries could not be written")
