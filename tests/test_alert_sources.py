"""Tests of alert_sources.py: each part's real change reaches the Alerter once per transition.

The parts are the real ones (a ConnectivityChecker, CircuitBreakers in a LocalExecutor, a
CostGuard over a SQLite ledger, the SQLite outbox, a Pacer over a SQLite store with booked
slots); only the Alerter has no sink, so each test reads its timeline.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from alert_sources import (
    BacklogWatch,
    CapWatch,
    circuit_alerts,
    cloud_online_alerts,
    dead_letter_alerts,
)
from alerts import Alerter
from circuit_breaker import CircuitBreaker
from connectivity_check import ConnectivityChecker
from cost_guard import CostGuard
from cost_ledger import SqliteLedgerStore
from errors import HandlerError
from local_executor import LocalExecutor
from outbox import Outbox
from pacing import Pacer
from pacing_stores import SqlitePaceStore
from rate_limits import RateLimits
from service_registry import ServiceRegistry
from tests.conftest import until
from tests.test_cost_guard import FakeClock

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def events(alerter: Alerter) -> list[tuple[str, str]]:
    """The timeline, oldest first, as (event, subject)."""
    return [(e["event"], e["subject"]) for e in reversed(alerter.snapshot()["events"])]


def last(alerter: Alerter) -> dict[str, Any]:
    return dict(alerter.snapshot()["events"][0])


# -- connectivity ------------------------------------------------------------------------------


async def test_cloud_offline_once_then_online_once_from_the_checker() -> None:
    alerter = Alerter(instance="t1")
    async with httpx.AsyncClient() as client:
        checker = ConnectivityChecker(
            endpoint="http://user:secret@127.0.0.1:9/", client=client, offline_after=3
        )
        checker.on_transition(cloud_online_alerts(alerter, checker))
        checker.record_success()  # online from the start: nothing to report
        for _ in range(2):
            checker.record_failure()
        assert events(alerter) == []
        for _ in range(5):
            checker.record_failure()
        assert events(alerter) == [("cloud_offline", "")]
        offline = last(alerter)
        assert offline["fields"] == {"endpoint": "http://***@127.0.0.1:9", "failures": 3}
        assert "secret" not in str(alerter.snapshot())
        checker.record_success()
        checker.record_success()
        assert events(alerter) == [("cloud_offline", ""), ("cloud_online", "")]
        assert last(alerter)["status"] == "recorded"  # no sink: kept for /status only


async def test_a_real_probe_of_a_dead_port_sends_cloud_offline_once() -> None:
    from tests.conftest import free_port

    alerter = Alerter(instance="t1")
    async with httpx.AsyncClient() as client:
        checker = ConnectivityChecker(
            endpoint=f"http://127.0.0.1:{free_port()}",
            client=client,
            interval_s=0.01,
            offline_after=2,
        )
        checker.on_transition(cloud_online_alerts(alerter, checker))
        await checker.start()
        try:
            await until(lambda: checker.consecutive_failures >= 6, what="six failed probes")
        finally:
            await checker.close()
    assert events(alerter) == [("cloud_offline", "")]


# -- circuits ----------------------------------------------------------------------------------


def test_the_breaker_reports_opening_and_closing_once_each() -> None:
    now = [0.0]
    changes: list[bool] = []
    breaker = CircuitBreaker(
        failure_threshold=2, reset_after_s=10, clock=lambda: now[0], on_change=changes.append
    )
    breaker.record_success()
    breaker.record_failure()
    assert changes == []
    breaker.record_failure()
    assert changes == [True]
    now[0] = 11.0
    assert breaker.allow()
    breaker.record_failure()  # a failed trial: still open, no new transition
    assert changes == [True]
    now[0] = 22.0
    assert breaker.allow()
    breaker.record_success()
    breaker.record_success()
    assert changes == [True, False]


async def test_a_local_circuit_alerts_once_per_opening() -> None:
    alerter = Alerter(instance="t1")
    fail = [True]

    async def flaky(params: dict[str, Any]) -> dict[str, Any]:
        if fail[0]:
            raise RuntimeError("boom")
        return {}

    now = [0.0]
    local = LocalExecutor(
        ServiceRegistry({"x.flaky": flaky}),
        failure_threshold=2,
        reset_after_s=5,
        clock=lambda: now[0],
        on_circuit=circuit_alerts(alerter),
    )
    for _ in range(2):
        with pytest.raises(HandlerError):
            await local.run("x.flaky", {})
    assert events(alerter) == [("circuit_open", "local:x.flaky")]
    now[0] = 6.0
    with pytest.raises(HandlerError):  # the failed trial re-opens; no second alert
        await local.run("x.flaky", {})
    assert events(alerter) == [("circuit_open", "local:x.flaky")]
    assert alerter.snapshot()["active"] == ["circuit_open:local:x.flaky"]
    now[0] = 12.0
    fail[0] = False
    await local.run("x.flaky", {})  # closed: the problem is resolved, silently
    assert alerter.snapshot()["active"] == []
    fail[0] = True
    for _ in range(2):
        with pytest.raises(HandlerError):
            await local.run("x.flaky", {})
    assert events(alerter) == [("circuit_open", "local:x.flaky")] * 2


# -- dead letters ------------------------------------------------------------------------------


async def test_each_dead_letter_alerts_once_with_its_action(tmp_path: Path) -> None:
    alerter = Alerter(instance="t1")
    outbox = Outbox(tmp_path / "hybrid.sqlite3", max_attempts=2)
    outbox.on_dead_letter = dead_letter_alerts(alerter)
    await outbox.open()
    try:
        tired = await outbox.enqueue("dm.send", {"to": "a"}, "k1")
        refused = await outbox.enqueue("dm.send", {"to": "b"}, "k2")
        unsure = await outbox.enqueue("upwork.apply", {"job": 1}, "k3")
        assert await outbox.fail(tired.id, "503", permanent=False) == "pending"
        assert events(alerter) == []
        await outbox.fail(tired.id, "503 again", permanent=False)
        await outbox.fail(refused.id, "cloud answered 422", permanent=True)
        await outbox.park(unsure.id, "indeterminate: its holder died mid-handler")
        await outbox.park("no-such-id", "nothing")
        assert events(alerter) == [
            ("dead_letter", tired.id),
            ("dead_letter", refused.id),
            ("dead_letter", unsure.id),
        ]
        newest = last(alerter)
        assert newest["fields"] == {"action": "upwork.apply", "indeterminate": True}
        assert "may have run" in newest["detail"]
        # Retried and dead again: a new transition, a new alert.
        await outbox.retry_dead(refused.id)
        await outbox.fail(refused.id, "cloud answered 422", permanent=True)
        assert events(alerter)[-1] == ("dead_letter", refused.id)
        assert len(events(alerter)) == 4
        assert [i.id for i in await outbox.dead_letters()] == [tired.id, refused.id, unsure.id]
    finally:
        await outbox.close()


# -- the cost caps -----------------------------------------------------------------------------


async def test_each_cap_alerts_once_per_month(tmp_path: Path) -> None:
    alerter = Alerter(instance="t1")
    clock = FakeClock(datetime(2026, 3, 30, 12, 0, tzinfo=UTC))
    guard = CostGuard(
        SqliteLedgerStore(tmp_path / "ledger.sqlite3"),
        monthly_cap_usd=Decimal("10"),
        soft_cap_usd=Decimal("8"),
        tz=UTC,
        clock=clock,
    )
    guard.on_totals = CapWatch(alerter, soft_cap_usd=Decimal("8"), hard_cap_usd=Decimal("10"))
    await guard.open()
    try:

        async def spend(amount: str) -> None:
            await guard.commit(await guard.reserve("claude.complete", Decimal(amount), "r"))

        await spend("7.99")
        assert events(alerter) == []
        await spend("0.01")
        assert events(alerter) == [("soft_cap_reached", "2026-03")]
        assert last(alerter)["fields"] == {"spent_usd": "8.000000", "cap_usd": "8"}
        await spend("1")
        await guard.refresh()
        assert events(alerter) == [("soft_cap_reached", "2026-03")]
        await spend("1")
        await guard.refresh()
        await guard.snapshot()
        assert events(alerter) == [
            ("soft_cap_reached", "2026-03"),
            ("hard_cap_reached", "2026-03"),
        ]
        clock.advance(3 * 86400)  # April: the caps may alert again
        await guard.refresh()
        await spend("9")
        assert events(alerter)[-1] == ("soft_cap_reached", "2026-04")
        assert len(events(alerter)) == 3
        assert alerter.snapshot()["active"] == ["soft_cap_reached:2026-04"]
    finally:
        await guard.close()


# -- the pacing backlog ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


async def test_backlog_over_an_hour_alerts_once_and_resolves_when_it_drains(
    tmp_path: Path,
) -> None:
    alerter = Alerter(instance="t1")
    clock = Clock()
    limits = RateLimits.from_dict(
        {"dm.send": {"max": 1, "per_sec": 1800}, "upwork.*": {"max": 5, "per_sec": 60}}
    )
    pacer = Pacer(limits, SqlitePaceStore(tmp_path / "pace.sqlite3"), clock=clock)
    await pacer.open()
    watch = BacklogWatch(pacer, alerter)
    try:
        for _ in range(3):  # one now, then slots booked 30 and 60 minutes ahead
            await pacer.reserve_slot("dm.send")
        await watch.check()
        assert events(alerter) == []  # exactly an hour behind is not more than an hour
        await pacer.reserve_slot("dm.send")  # a slot 90 minutes ahead
        await watch.check()
        await watch.check()
        assert events(alerter) == [("rate_limit_backlog", "dm.send")]
        assert last(alerter)["fields"] == {"deferred": 3, "backlog_s": 5400.0}
        clock.now = T0 + timedelta(minutes=31)  # the first booked slot passed
        await watch.check()
        assert alerter.snapshot()["active"] == []
        for _ in range(2):
            await pacer.reserve_slot("dm.send")
        await watch.check()
        assert events(alerter) == [("rate_limit_backlog", "dm.send")] * 2
    finally:
        await pacer.aclose()


async def test_the_backlog_watch_runs_in_the_background_until_closed(tmp_path: Path) -> None:
    alerter = Alerter(instance="t1")
    pacer = Pacer(
        RateLimits.from_dict({"dm.send": {"max": 1, "per_sec": 7200}}),
        SqlitePaceStore(tmp_path / "pace.sqlite3"),
    )
    await pacer.open()
    watch = BacklogWatch(pacer, alerter, interval_s=0.01)
    watch.start()
    try:
        for _ in range(2):
            await pacer.reserve_slot("dm.send")
        await until(lambda: bool(events(alerter)), what="the backlog alert")
    finally:
        await watch.close()
        await pacer.aclose()
    assert events(alerter) == [("rate_limit_backlog", "dm.send")]
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "backlog-watch"]


def test_a_cap_of_zero_is_a_choice_not_an_alert() -> None:
    from cost_ledger import MonthTotals

    alerter = Alerter(instance="t1")
    watch = CapWatch(alerter, soft_cap_usd=Decimal(0), hard_cap_usd=Decimal(0))
    watch(MonthTotals.empty("2026-03"))
    assert events(alerter) == []
    watch = CapWatch(alerter, soft_cap_usd=Decimal(0), hard_cap_usd=Decimal(5))
    watch(MonthTotals("2026-03", Decimal(5), Decimal(0)))
    assert events(alerter) == [("hard_cap_reached", "2026-03")]
