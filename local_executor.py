"""LocalExecutor: run an action on this instance's service registry, behind a per-action breaker.

Three consecutive handler failures mark an action degraded (a warning is logged) and further
calls fail fast with ``circuit_open`` until ``reset_after_s`` (60 s) has passed; then one trial
call decides. Bad input (unknown action, invalid params) is the caller's fault and does not count.
``on_circuit(name, opened)`` hears of each breaker opening and closing (name ``local:<action>``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from circuit_breaker import BreakerState, CircuitBreaker
from envelope import Envelope, new_request_id
from errors import ActionError, CircuitOpen, HandlerError, Source
from local_routes import LocalRoutes
from service_registry import Ran, ServiceRegistry

log = logging.getLogger("everreach.local")


class LocalExecutor:
    """Runs actions through ``ServiceRegistry.dispatch()``."""

    def __init__(
        self,
        registry: ServiceRegistry,
        *,
        routes: LocalRoutes | None = None,
        failure_threshold: int = 3,
        reset_after_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        on_circuit: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.registry = registry
        self._on_circuit = on_circuit
        self.routes = routes or LocalRoutes(registry)
        self._failure_threshold = failure_threshold
        self._reset_after_s = reset_after_s
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}

    def has(self, action: str) -> bool:
        """Is there a local handler for ``action``?"""
        return self.routes.has_local(action)

    def is_degraded(self, action: str) -> bool:
        breaker = self._breakers.get(action)
        return breaker is not None and breaker.state is BreakerState.OPEN

    async def run(self, action: str, params: dict[str, Any]) -> Any:
        """Run the handler and return its result; raise an ``ActionError`` on failure."""
        return (await self.ran(action, params)).value

    async def ran(self, action: str, params: dict[str, Any], *, json_params: bool = False) -> Ran:
        """Run the handler; its result and the result's JSON text (``ServiceRegistry.call``)."""
        breaker = self._breakers.get(action)
        if breaker is not None and not breaker.allow():
            raise CircuitOpen(
                f"{action} is degraded after {breaker.failures} consecutive failures; "
                f"local calls resume in {breaker.retry_in_s():.0f} s",
                never_ran=True,
            )
        try:
            ran = await self.registry.call(
                self.routes.topic(action), params, json_params=json_params
            )
        except HandlerError:
            self._failed(action)
            raise
        if breaker is not None:
            breaker.record_success()
        return ran

    def _failed(self, action: str) -> None:
        breaker = self._breakers.get(action)
        if breaker is None:
            breaker = self._breakers[action] = CircuitBreaker(
                failure_threshold=self._failure_threshold,
                reset_after_s=self._reset_after_s,
                clock=self._clock,
                on_change=self._circuit_observer(action),
            )
        if breaker.record_failure():
            log.warning(
                "local action degraded",
                extra={
                    "action": action,
                    "failures": breaker.failures,
                    "reset_after_s": self._reset_after_s,
                },
            )

    def _circuit_observer(self, action: str) -> Callable[[bool], None] | None:
        on_circuit = self._on_circuit
        if on_circuit is None:
            return None
        return lambda opened: on_circuit(f"local:{action}", opened)

    async def execute(
        self, action: str, params: dict[str, Any], *, request_id: str | None = None
    ) -> Envelope:
        """Run ``action`` and return its envelope (``source='local'``), never raising."""
        request_id = request_id or new_request_id()
        started = time.perf_counter()
        try:
            ran = await self.ran(action, params)
        except ActionError as exc:
            return Envelope.failure(
                action,
                exc,
                source=Source.LOCAL,
                request_id=request_id,
                duration_ms=(time.perf_counter() - started) * 1000,
            )
        return Envelope.success(
            action,
            ran.value,
            source=Source.LOCAL,
            request_id=request_id,
            duration_ms=(time.perf_counter() - started) * 1000,
            attempts=1,
            result_json=ran.json,
        )

    def circuits(self) -> dict[str, str]:
        """State of every action breaker that has seen a failure."""
        return {
            action: b.state.value
            for action, b in sorted(self._breakers.items())
            if b.failures or b.state is not BreakerState.CLOSED
        }
