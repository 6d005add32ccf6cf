"""A consecutive-failure circuit breaker with a cool-down, on an injectable clock.

closed --(N consecutive failures)--> open --(reset_after_s)--> half_open --success--> closed
                                       ^                           |
                                       +---------failure-----------+

Half-open lets one trial call through at a time. A trial that never reports back (its task was
cancelled) expires after another ``reset_after_s``, so a lost trial cannot wedge the breaker open.
``on_change(opened)`` hears of each opening (True) and each closing after one (False).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Skip a failing dependency for a while instead of paying for its failures again."""

    __slots__ = (
        "_clock",
        "_failures",
        "_opened_at",
        "_trial_at",
        "failure_threshold",
        "on_change",
        "reset_after_s",
    )

    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        reset_after_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.on_change = on_change
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_at: float | None = None  # when the outstanding half-open trial started

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self.reset_after_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    @property
    def failures(self) -> int:
        return self._failures

    def allow(self) -> bool:
        """May a call go through now? In half-open, one trial call at a time."""
        if self._opened_at is None:
            return True
        if self.state is not BreakerState.HALF_OPEN:
            return False
        now = self._clock()
        if self._trial_at is None or now - self._trial_at >= self.reset_after_s:
            self._trial_at = now
            return True
        return False

    def retry_in_s(self) -> float:
        if self._opened_at is None:
            return 0.0
        return max(0.0, self.reset_after_s - (self._clock() - self._opened_at))

    def try_now(self) -> None:
        """Half-open an open circuit at once: the dependency answered a health probe, so let
        the next call through as the trial instead of waiting out the cool-down."""
        if self._opened_at is not None and self.state is BreakerState.OPEN:
            self._opened_at = self._clock() - self.reset_after_s
            self._trial_at = None

    def record_success(self) -> None:
        was_open = self._opened_at is not None
        self._failures = 0
        self._opened_at = None
        self._trial_at = None
        if was_open and self.on_change is not None:
            self.on_change(False)

    def record_failure(self) -> bool:
        """Count a failure; return True when this failure opened the circuit."""
        self._failures += 1
        self._trial_at = None
        if self._opened_at is not None:
            self._opened_at = self._clock()  # a failed trial starts a new cool-down
            return False
        if self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
            if self.on_change is not None:
                self.on_change(True)
            return True
        return False
