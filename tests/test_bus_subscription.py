"""bus_subscription: a subscription's counters and view, failure records, name checks."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from bus_subscription import READ_COUNT, Subscription, check_name, short


async def _handler(message: dict[str, Any]) -> None:
    return None


def _sub(**over: Any) -> Subscription:
    values: dict[str, Any] = {
        "topic": "orders",
        "group": "billing",
        "durable": True,
        "handler": _handler,
        "stream": "everreach:bus:orders",
        "max_deliveries": 5,
    }
    values.update(over)
    return Subscription(**values)


def test_new_subscription_view_has_zero_counters() -> None:
    assert _sub().view() == {
        "topic": "orders",
        "group": "billing",
        "durable": True,
        "delivered": 0,
        "failures": 0,
        "parked": 0,
    }


def test_handler_failed_counts_keeps_the_error_and_logs_the_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sub = _sub()
    with caplog.at_level(logging.WARNING, logger="sync_bus"):
        sub.handler_failed("1-0", 1, ValueError("bad total"))
        sub.handler_failed("1-0", 2, KeyError("sku"))
        sub.handler_failed("2-0", 1, RuntimeError("down"))
    assert sub.failures == 3
    assert sub.errors == {"1-0": "KeyError: 'sku'", "2-0": "RuntimeError: down"}  # the latest
    assert sub.view()["failures"] == 3
    first = caplog.records[0].getMessage()
    assert "orders" in first and "billing" in first and "1-0" in first
    assert "attempt 1/5" in first and "ValueError: bad total" in first


def test_the_kept_error_is_short() -> None:
    sub = _sub()
    sub.handler_failed("k", 1, ValueError("x" * 1000))
    assert len(sub.errors["k"]) == 300
    assert sub.errors["k"].startswith("ValueError: xxx")


def test_short_names_the_exception_type() -> None:
    assert short(TimeoutError()) == "TimeoutError: "
    assert short(ValueError("v")) == "ValueError: v"
    assert len(short(RuntimeError("y" * 500))) == 300


def test_subscriptions_are_distinct_even_with_equal_fields() -> None:
    a, b = _sub(), _sub()
    assert a != b
    assert len({a, b}) == 2  # hashable by identity: the bus keeps them in sets and dicts
    assert a.step_lock is not b.step_lock and a.wake is not b.wake
    assert a.errors is not b.errors


def test_read_count_is_positive() -> None:
    assert READ_COUNT > 0


@pytest.mark.parametrize("value", ["orders", "a", "x" * 200, "a.b-c_d:e"])
def test_check_name_accepts_non_empty_names_without_spaces(value: str) -> None:
    check_name("topic", value)


@pytest.mark.parametrize(
    "value", ["", " ", "two words", "tab\there", "new\nline", "x" * 201, None, 5, b"bytes"]
)
def test_check_name_refuses_and_names_the_kind_and_value(value: object) -> None:
    with pytest.raises(ValueError) as caught:
        check_name("group", value)
    message = str(caught.value)
    assert message.startswith("group must be a non-empty string without spaces")
    assert repr(value)[:50] in message
