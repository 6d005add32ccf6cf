"""Alerter: one alert per transition, sent off the request path to a webhook and/or an action.

``emit()`` is a plain function that never blocks or raises: it decides (dedupe, rate limit),
records the event in the timeline and puts it on a queue. One background task, owned by the
Alerter (``start()`` / ``aclose()``), delivers each alert to every sink with bounded retries:

    webhook   POST ALERT_WEBHOOK_URL  {"event", "at", "instance", "detail", ...fields}
    action    the ALERT_ACTION handler, called with {"text": ..., "event": ...}

Dedupe: an event with the same ``subject`` is sent once until it is resolved — by its opposite
transition (``cloud_online`` resolves ``cloud_offline``), by ``resolve()``, or by ``reset()``.
A recovery event (``cloud_online``) is sent only when it ends an active problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import httpx

log = logging.getLogger(__name__)

ActionSink = Callable[[dict[str, Any]], Awaitable[Any]]


class AlertEvent(StrEnum):
    """The events an alert is sent for."""

    CLOUD_OFFLINE = "cloud_offline"
    CLOUD_ONLINE = "cloud_online"
    SOFT_CAP_REACHED = "soft_cap_reached"
    HARD_CAP_REACHED = "hard_cap_reached"
    DEAD_LETTER = "dead_letter"
    CIRCUIT_OPEN = "circuit_open"
    RATE_LIMIT_BACKLOG = "rate_limit_backlog"


# A recovery event and the problem it ends.
RECOVERS: dict[AlertEvent, AlertEvent] = {AlertEvent.CLOUD_ONLINE: AlertEvent.CLOUD_OFFLINE}


class Delivery(StrEnum):
    """Where one alert stands."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    SUPPRESSED = "suppressed"  # over the rate limit or the queue was full: recorded, not sent
    RECORDED = "recorded"  # no sink configured


@dataclass
class AlertRecord:
    """One alert of the timeline."""

    event: AlertEvent
    at: datetime
    detail: str
    subject: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    status: Delivery = Delivery.PENDING
    attempts: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "event": self.event.value,
            "at": self.at.isoformat(),
            "detail": self.detail,
            "subject": self.subject,
            "status": self.status.value,
            "attempts": self.attempts,
            **({"fields": self.fields} if self.fields else {}),
        }


@dataclass(frozen=True, slots=True)
class DeliveryFailure:
    """An alert a sink did not take after every attempt."""

    event: AlertEvent
    at: datetime
    sink: str
    error: str

    def as_json(self) -> dict[str, Any]:
        return {
            "event": self.event.value,
            "at": self.at.isoformat(),
            "sink": self.sink,
            "error": self.error,
        }


class _Permanent(Exception):
    """A sink refused the alert in a way a retry will not change (a 4xx answer)."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Alerter:
    """Deduplicate, rate-limit and deliver alerts from one background task."""

    def __init__(
        self,
        *,
        instance: str,
        webhook_url: str | None = None,
        client: httpx.AsyncClient | None = None,
        action: ActionSink | None = None,
        timeout_s: float = 10.0,
        attempts: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        max_per_window: int = 20,
        window_s: float = 60.0,
        queue_size: int = 1000,
        history: int = 50,
        clock: Callable[[], datetime] = _utc_now,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if webhook_url and client is None:
            raise ValueError("a webhook URL needs the shared httpx.AsyncClient")
        self.instance = instance
        self._webhook_url = webhook_url
        self._client = client
        self._action = action
        self._timeout_s = timeout_s
        self._attempts = max(1, attempts)
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._max_per_window = max_per_window
        self._window_s = window_s
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._queue: asyncio.Queue[AlertRecord] = asyncio.Queue(maxsize=queue_size)
        self._active: set[tuple[AlertEvent, str]] = set()
        self._sent_at: deque[float] = deque()
        self._timeline: deque[AlertRecord] = deque(maxlen=history)
        self._failures: deque[DeliveryFailure] = deque(maxlen=history)
        self._suppressed = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def has_sink(self) -> bool:
        return bool(self._webhook_url) or self._action is not None

    # -- the request path: never blocks, never raises ------------------------------------------

    def emit(
        self, event: AlertEvent | str, detail: str, *, subject: str = "", **fields: Any
    ) -> bool:
        """Record ``event`` and queue it for delivery; False when deduplicated or not a change.

        ``subject`` tells apart problems of one kind (a circuit's name, a dead letter's id).
        """
        try:
            return self._emit(AlertEvent(event), detail, subject, fields)
        except Exception:  # an alert must never fail the caller
            log.exception("alerts: could not record %s", event)
            return False

    def _emit(self, event: AlertEvent, detail: str, subject: str, fields: dict[str, Any]) -> bool:
        problem = RECOVERS.get(event)
        if problem is not None:
            if (problem, subject) not in self._active:
                return False  # nothing to recover from: not a transition
            self._active.discard((problem, subject))
        else:
            if (event, subject) in self._active:
                return False
            self._active.add((event, subject))
        record = AlertRecord(event, self._clock(), detail, subject, dict(fields))
        self._timeline.append(record)
        if not self.has_sink:
            record.status = Delivery.RECORDED
        elif not self._within_rate():
            record.status = Delivery.SUPPRESSED
            self._suppressed += 1
            log.warning(
                "alerts: %s suppressed (over %d per %g s)",
                event,
                self._max_per_window,
                self._window_s,
            )
        else:
            try:
                self._queue.put_nowait(record)
            except asyncio.QueueFull:
                record.status = Delivery.SUPPRESSED
                self._suppressed += 1
        return True

    def _within_rate(self) -> bool:
        now = self._monotonic()
        while self._sent_at and self._sent_at[0] <= now - self._window_s:
            self._sent_at.popleft()
        if len(self._sent_at) >= self._max_per_window:
            return False
        self._sent_at.append(now)
        return True

    def resolve(self, event: AlertEvent | str, subject: str = "") -> None:
        """End an active problem without an alert (a circuit closed, a backlog drained)."""
        self._active.discard((AlertEvent(event), subject))

    def snapshot(self) -> dict[str, Any]:
        """For ``/status``: the last events (newest first), delivery failures, counters."""
        return {
            "events": [record.as_json() for record in reversed(self._timeline)],
            "failures": [failure.as_json() for failure in reversed(self._failures)],
            "active": sorted(f"{event.value}:{subject}" if subject else event.value
                             for event, subject in self._active),
            "pending": self._queue.qsize(),
            "suppressed": self._suppressed,
            "sinks": [name for name, on in (("webhook", bool(self._webhook_url)),
                                            ("action", self._action is not None)) if on],
        }  # fmt: skip

    # -- the background task -------------------------------------------------------------------

    def start(self) -> None:
        """Start the delivery task (idempotent); call from inside the running event loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="alerts")

    async def aclose(self, *, drain_s: float = 2.0) -> None:
        """Give queued alerts up to ``drain_s`` to go out, then stop the task (idempotent)."""
        task, self._task = self._task, None
        if task is None:
            return
        if not task.done() and drain_s > 0:
            drained = asyncio.ensure_future(self._queue.join())
            await asyncio.wait(
                {drained, task}, timeout=drain_s, return_when=asyncio.FIRST_COMPLETED
            )
            drained.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drained
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        while True:
            record = await self._queue.get()
            try:
                await self._deliver(record)
            except Exception:  # a bug here must not end delivery of later alerts
                log.exception("alerts: delivering %s failed", record.event)
                record.status = Delivery.FAILED
            finally:
                self._queue.task_done()

    async def _deliver(self, record: AlertRecord) -> None:
        sinks: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        if self._webhook_url:
            sinks.append(("webhook", lambda: self._post(record)))
        if self._action is not None:
            sinks.append(("action", lambda: self._call_action(record)))
        ok = True
        for name, send in sinks:
            error = await self._with_retries(record, send)
            if error is not None:
                ok = False
                self._failures.append(DeliveryFailure(record.event, self._clock(), name, error))
                log.warning("alerts: %s not delivered to the %s: %s", record.event, name, error)
        record.status = Delivery.SENT if ok else Delivery.FAILED

    async def _with_retries(
        self, record: AlertRecord, send: Callable[[], Awaitable[None]]
    ) -> str | None:
        """Send with exponential backoff and jitter; the last error, or None once delivered."""
        error = "not attempted"
        for attempt in range(self._attempts):
            if attempt:
                delay = min(self._max_backoff_s, self._backoff_s * 2 ** (attempt - 1))
                await self._sleep(delay * (0.5 + self._rng.random() / 2))
            record.attempts += 1
            try:
                await send()
                return None
            except _Permanent as exc:
                return str(exc)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if self._webhook_url:  # it may carry a token: never in /status or the logs
                    error = error.replace(self._webhook_url, "<ALERT_WEBHOOK_URL>")
        return error

    def body(self, record: AlertRecord) -> dict[str, Any]:
        """The webhook's JSON body."""
        return {
            **record.fields,
            "event": record.event.value,
            "at": record.at.isoformat(),
            "instance": self.instance,
            "detail": record.detail,
            **({"subject": record.subject} if record.subject else {}),
        }

    async def _post(self, record: AlertRecord) -> None:
        assert self._client is not None and self._webhook_url
        response = await self._client.post(
            self._webhook_url, json=self.body(record), timeout=self._timeout_s
        )
        if response.status_code == 429 or response.status_code >= 500:
            raise RuntimeError(f"webhook answered {response.status_code}")
        if response.status_code >= 400:
            raise _Permanent(f"webhook answered {response.status_code}")

    async def _call_action(self, record: AlertRecord) -> None:
        assert self._action is not None
        text = f"[{self.instance}] {record.event.value}: {record.detail}"
        await asyncio.wait_for(
            self._action({"text": text, "event": record.event.value}), self._timeout_s
        )
