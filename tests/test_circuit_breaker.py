"""CircuitBreaker on a fake clock: opening, resetting, and the half-open trial."""

from __future__ import annotations

import pytest

from circuit_breaker import BreakerState, CircuitBreaker

pytestmark = pytest.mark.prd200


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=3, reset_after_s=60.0, clock=clock)


def _open(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.failure_threshold):
        breaker.record_failure()
    assert breaker.state is BreakerState.OPEN


def test_defaults_are_three_failures_and_sixty_seconds() -> None:
    breaker = CircuitBreaker()
    assert (breaker.failure_threshold, breaker.reset_after_s) == (3, 60.0)


def test_a_new_breaker_is_closed(breaker: CircuitBreaker) -> None:
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()
    assert breaker.retry_in_s() == 0.0


def test_three_consecutive_failures_open_it(breaker: CircuitBreaker) -> None:
    assert breaker.record_failure() is False
    assert breaker.record_failure() is False
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()
    assert breaker.record_failure() is True  # this one opened it
    assert breaker.state is BreakerState.OPEN
    assert breaker.failures == 3
    assert not breaker.allow()


def test_further_failures_while_open_do_not_report_opening_again(breaker: CircuitBreaker) -> None:
    _open(breaker)
    assert breaker.record_failure() is False


def test_a_success_resets_the_count(breaker: CircuitBreaker) -> None:
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    assert breaker.failures == 0
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED  # not 4 in a row: still closed


def test_it_stays_open_until_reset_after_s(clock: FakeClock, breaker: CircuitBreaker) -> None:
    _open(breaker)
    clock.advance(59.9)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_in_s() == pytest.approx(0.1)
    clock.advance(0.1)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.retry_in_s() == 0.0


def test_half_open_allows_exactly_one_trial(clock: FakeClock, breaker: CircuitBreaker) -> None:
    _open(breaker)
    clock.advance(60)
    assert [breaker.allow() for _ in range(5)] == [True, False, False, False, False]


def test_a_successful_trial_closes_it(clock: FakeClock, breaker: CircuitBreaker) -> None:
    _open(breaker)
    clock.advance(60)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failures == 0
    assert all(breaker.allow() for _ in range(3))


def test_a_failed_trial_reopens_it_for_a_new_cool_down(
    clock: FakeClock, breaker: CircuitBreaker
) -> None:
    _open(breaker)
    clock.advance(60)
    assert breaker.allow()
    assert breaker.record_failure() is False
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_in_s() == pytest.approx(60.0)
    clock.advance(59)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()  # a new trial after the new cool-down
    assert not breaker.allow()


def test_a_lost_trial_expires_after_another_cool_down(
    clock: FakeClock, breaker: CircuitBreaker
) -> None:
    _open(breaker)
    clock.advance(60)
    assert breaker.allow()  # the trial's task is cancelled and never reports back
    clock.advance(59)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.allow()
    assert not breaker.allow()


@pytest.mark.parametrize("threshold", [1, 2, 5])
def test_the_threshold_is_configurable(clock: FakeClock, threshold: int) -> None:
    breaker = CircuitBreaker(failure_threshold=threshold, reset_after_s=5, clock=clock)
    opened = [breaker.record_failure() for _ in range(threshold)]
    assert opened == [False] * (threshold - 1) + [True]
    clock.advance(5)
    assert breaker.state is BreakerState.HALF_OPEN


def test_states_are_strings() -> None:
    assert [s.value for s in BreakerState] == ["closed", "open", "half_open"]


def test_try_now_half_opens_an_open_circuit_for_one_trial() -> None:
    clock = [0.0]
    breaker = CircuitBreaker(failure_threshold=1, reset_after_s=30.0, clock=lambda: clock[0])
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    breaker.try_now()
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow() and not breaker.allow()  # one trial at a time
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN  # a failed trial: a new cool-down


def test_try_now_leaves_a_closed_circuit_closed() -> None:
    breaker = CircuitBreaker(failure_threshold=3)
    breaker.try_now()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
