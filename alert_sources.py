"""Where alerts come from: the observers the runtime hands to each part, and the backlog watch.

Each part says what changed through a plain callback it was given (it never imports
``alerts.py``); the functions here turn those changes into ``Alerter.emit`` calls:

    ConnectivityChecker.on_transition -> cloud_online_alerts()  cloud_offline, cloud_online
    CostGuard.on_totals               -> CapWatch               soft_cap_reached, hard_cap_reached
    CircuitBreaker(on_change=...)     -> circuit_alerts()       circuit_open (resolved on close)
    Outbox.on_dead_letter             -> dead_letter_alerts()   dead_letter
    Pacer.snapshot() every minute     -> BacklogWatch           rate_limit_backlog

``alerter_from_config()`` builds the Alerter from the configuration. Every callback here is cheap,
does no I/O and never raises: it runs on the request path of whatever noticed the change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx

from alerts import Alerter, AlertEvent
from background_task import BackgroundTask
from config.hybrid_config import redact_url

if TYPE_CHECKING:
    from config.hybrid_config import HybridConfig
    from connectivity_check import ConnectivityChecker
    from cost_ledger import MonthTotals
    from pacing import Pacer

log = logging.getLogger(__name__)

# An alert is a small POST to a service that answers at once, or not at all.
ALERT_TIMEOUT_S = 5.0
# The first wait between two attempts (then 2x, 4x, 8x, with jitter; 5 attempts per sink).
ALERT_BACKOFF_S = 1.0
# How long queued alerts get to go out when the server stops.
ALERT_DRAIN_S = 2.0
BACKLOG_THRESHOLD_S = 3600.0
BACKLOG_CHECK_S = 60.0

RunAction = Callable[[str, dict[str, Any]], Awaitable[Any]]


def alerter_from_config(
    config: HybridConfig, *, instance: str, run_action: RunAction
) -> tuple[Alerter, httpx.AsyncClient | None]:
    """The Alerter ALERT_WEBHOOK_URL and ALERT_ACTION ask for, and the webhook's own client.

    The client (``None`` without a webhook) is the caller's to close, after the Alerter.
    ``run_action(name, params)`` runs ALERT_ACTION on this instance (its service registry).
    With neither set, events are still recorded for ``/status``; nothing is sent.
    """
    url = config.alert_webhook_url.get_secret_value() if config.alert_webhook_url else None
    client = httpx.AsyncClient(timeout=ALERT_TIMEOUT_S) if url else None
    action_name = config.alert_action

    async def call_action(params: dict[str, Any]) -> Any:
        assert action_name is not None
        return await run_action(action_name, params)

    alerter = Alerter(
        instance=instance,
        webhook_url=url,
        client=client,
        action=call_action if action_name else None,
        timeout_s=ALERT_TIMEOUT_S,
        backoff_s=ALERT_BACKOFF_S,
    )
    return alerter, client


# -- connectivity ------------------------------------------------------------------------------


def cloud_online_alerts(alerter: Alerter, checker: ConnectivityChecker) -> Callable[[bool], None]:
    """The ``on_transition`` callback: ``cloud_offline``, then ``cloud_online`` when it is back."""

    # Read once here, not from inside the checker's own call: the cloud endpoint never changes,
    # and the checker goes offline exactly when its failures in a row reach ``offline_after``.
    endpoint = redact_url(checker.endpoint)
    failures = checker.offline_after

    def on_transition(online: bool) -> None:
        if online:
            alerter.emit(
                AlertEvent.CLOUD_ONLINE, f"cloud {endpoint} answers again", endpoint=endpoint
            )
        else:
            alerter.emit(
                AlertEvent.CLOUD_OFFLINE,
                f"cloud {endpoint} stopped answering ({failures} failed probes or calls in a row)",
                endpoint=endpoint,
                failures=failures,
            )

    return on_transition


# -- circuits and dead letters -----------------------------------------------------------------


def circuit_alerts(alerter: Alerter) -> Callable[[str, bool], None]:
    """``on_circuit(name, opened)``: ``circuit_open`` once per opening, resolved on closing."""

    def on_circuit(name: str, opened: bool) -> None:
        if opened:
            alerter.emit(
                AlertEvent.CIRCUIT_OPEN,
                f"circuit {name} opened after repeated failures; calls to it are skipped",
                subject=name,
            )
        else:
            alerter.resolve(AlertEvent.CIRCUIT_OPEN, name)

    return on_circuit


def dead_letter_alerts(alerter: Alerter) -> Callable[[str, str, str, bool], None]:
    """``on_dead_letter(id, action, error, indeterminate)``: one ``dead_letter`` per item."""

    def on_dead_letter(item_id: str, action: str, error: str, indeterminate: bool) -> None:
        why = "may have run: a person decides" if indeterminate else "gave up"
        alerter.emit(
            AlertEvent.DEAD_LETTER,
            f"outbox item {item_id} ({action}) {why}: {error[:300]}",
            subject=item_id,
            action=action,
            indeterminate=indeterminate,
        )
        # Each dead letter is its own event: the item may be retried and die again.
        alerter.resolve(AlertEvent.DEAD_LETTER, item_id)

    return on_dead_letter


# -- the cost caps -----------------------------------------------------------------------------


class CapWatch:
    """``CostGuard.on_totals``: one alert per cap and month, when the spend reaches it.

    The spend is what the guard routes by: committed + reserved. The month is the subject, so
    a new month may alert again; the old month's problems are forgotten when it rolls over.
    """

    def __init__(self, alerter: Alerter, *, soft_cap_usd: Decimal, hard_cap_usd: Decimal) -> None:
        self._alerter = alerter
        self._caps = (
            (AlertEvent.SOFT_CAP_REACHED, "COST_SOFT_CAP", Decimal(soft_cap_usd)),
            (AlertEvent.HARD_CAP_REACHED, "MONTHLY_COST_CAP", Decimal(hard_cap_usd)),
        )
        self._month: str | None = None
        self._reached: set[AlertEvent] = set()  # this month's; called on every reserve: stay cheap

    def __call__(self, totals: MonthTotals) -> None:
        if totals.month != self._month:
            if self._month is not None:
                for event, _, _ in self._caps:
                    self._alerter.resolve(event, self._month)
            self._month = totals.month
            self._reached.clear()
        spent = totals.total_usd
        for event, name, cap in self._caps:
            # A cap of 0 is a choice (no cloud spend), not news.
            if event not in self._reached and cap > 0 and spent >= cap:
                self._reached.add(event)
                self._alerter.emit(
                    event,
                    f"cloud spend of {totals.month} reached {name}: ${spent} "
                    f"(committed + reserved) of ${cap}",
                    subject=totals.month,
                    spent_usd=str(spent),
                    cap_usd=str(cap),
                )


# -- the pacing backlog ------------------------------------------------------------------------


class BacklogWatch:
    """Alert when a rate limit's deferred work is more than ``threshold_s`` behind.

    Reads ``Pacer.snapshot()`` every ``interval_s`` (and on ``check()``): ``rate_limit_backlog``
    once per limit while its last booked slot is over the threshold ahead; resolved when it is
    back under. A limit whose store does not answer is left as it was.
    """

    def __init__(
        self,
        pacer: Pacer,
        alerter: Alerter,
        *,
        threshold_s: float = BACKLOG_THRESHOLD_S,
        interval_s: float = BACKLOG_CHECK_S,
    ) -> None:
        self._pacer = pacer
        self._alerter = alerter
        self.threshold_s = threshold_s
        self.interval_s = interval_s
        self._task = BackgroundTask("backlog-watch")

    async def check(self) -> None:
        for limit in await self._pacer.snapshot():
            if not limit.available:
                continue
            if limit.backlog_s > self.threshold_s:
                self._alerter.emit(
                    AlertEvent.RATE_LIMIT_BACKLOG,
                    f"rate limit {limit.key}: {limit.deferred} deferred, the last "
                    f"{limit.backlog_s / 3600:.1f} h behind",
                    subject=limit.key,
                    deferred=limit.deferred,
                    backlog_s=round(limit.backlog_s, 3),
                )
            else:
                self._alerter.resolve(AlertEvent.RATE_LIMIT_BACKLOG, limit.key)

    def start(self) -> None:
        self._task.start(self._run)

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # a bug must not end the watch
                log.exception("rate-limit backlog check failed")
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        await self._task.close()
