"""Prometheus metrics of one orchestrator instance, rendered for ``GET /metrics``.

Each ``Metrics`` object owns its own ``CollectorRegistry``, so several apps in one process (tests,
a cloud and a terminal side by side) never share or collide on series.

Label values are closed sets: ``action`` comes only from the ``known_actions`` given at start-up
(the route table and the registry), ``source`` from ``Source`` and ``outcome`` from ``ok``,
``queued`` and the ``ErrorCode`` values. Anything else is counted under ``other``, so a client
sending random action names cannot grow the number of series.

Point-in-time values (circuit states, offline flag, outbox depth, spend against the caps, bus
backend and backlog, cache size) are not pushed: a status provider — a plain sync function — is
called once per scrape and its dict turned into gauges. Missing keys are simply not exported.

The ``prometheus_client`` objects are built, and the package imported, on first use (the first
dispatch counted, or the first scrape): an idle server does not hold them (about 1 MiB resident
and 10 ms of start-up, measured with ``bench_startup``). A scrape before any dispatch still shows
every family, the unlabelled counters at zero and created when the ``Metrics`` was.
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from errors import ErrorCode, Source

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily, Metric

OTHER = "other"
# Label children kept per raw (action, source, outcome); beyond this many, looked up per call.
_MAX_CACHED_CHILDREN = 4096
"""The label value every unknown action, source or outcome is folded into."""

NO_SOURCE = "none"
"""The ``source`` label of a dispatch that failed before any path produced a result."""

CIRCUIT_STATES: tuple[str, ...] = ("closed", "open", "degraded", "half_open")
"""States a circuit breaker can report; one 0/1 series per state (a Prometheus state set)."""

BUS_BACKENDS: tuple[str, ...] = ("redis", "sqlite")

OUTCOMES: frozenset[str] = frozenset({"ok", "queued", *(code.value for code in ErrorCode)})

SOURCES: frozenset[str] = frozenset(source.value for source in Source)

# Local handlers answer in milliseconds; a cloud call may take CLOUD_TIMEOUT_SEC (30 s) per attempt
# and, with retries and backoff, about two minutes in all. The buckets cover both ends.
DURATION_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)

# The classic text format, which every Prometheus version parses; names here are plain ASCII, so
# the body is the same as the newer 1.0.0 format prometheus-client would otherwise announce.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

StatusProvider = Callable[[], Mapping[str, Any]]

logger = logging.getLogger(__name__)


class Metrics:
    """The counters, histogram and scrape-time gauges of one instance."""

    def __init__(self, known_actions: Iterable[str]) -> None:
        self.known_actions: frozenset[str] = frozenset(known_actions)
        self._created_s = time.time()
        self._series: _Series | None = None
        self._provider: StatusProvider | None = None
        # Per raw (action, source, outcome): the count's increment, the duration's observe (or
        # None until the first), the label values.
        self._children: dict[tuple[Any, Any, Any], list[Any]] = {}

    @property
    def registry(self) -> CollectorRegistry:
        """This instance's own ``CollectorRegistry`` (built on first use)."""
        return self._built().registry

    def _built(self) -> _Series:
        series = self._series
        if series is None:
            series = self._series = _Series(self)
        return series

    # -- label hygiene --------------------------------------------------------------------------

    def action_label(self, action: str) -> str:
        """Return ``action`` if it is a known action, else ``other``."""
        return action if action in self.known_actions else OTHER

    @staticmethod
    def source_label(source: str | None) -> str:
        """Return the source's value, ``none`` when nothing produced a result, else ``other``."""
        value = _enum_value(source)
        if value is None:
            return NO_SOURCE
        return value if value in SOURCES else OTHER

    @staticmethod
    def outcome_label(outcome: str) -> str:
        value = _enum_value(outcome)
        return value if value in OUTCOMES else OTHER

    # -- recording ------------------------------------------------------------------------------

    def observe_dispatch(
        self, action: str, source: str | None, outcome: str, duration_s: float
    ) -> None:
        """Count one dispatch and record how long it took."""
        key = (action, source, outcome)
        children = self._children.get(key)
        if children is None:
            # labels() costs a few µs a call; the label sets are bounded, so keep the children.
            labels = (
                self.action_label(action),
                self.source_label(source),
                self.outcome_label(outcome),
            )
            children = [_counting(self._built().dispatches.labels(*labels)), None, labels]
            if len(self._children) < _MAX_CACHED_CHILDREN:
                self._children[key] = children
        children[0](1)
        if math.isfinite(duration_s) and duration_s >= 0:
            if children[1] is None:  # a series appears with its first observation only
                children[1] = _observing(self._built().duration.labels(*children[2][:2]))
            children[1](duration_s)

    def inc_cloud_retry(self, action: str) -> None:
        """Count one retried cloud attempt."""
        self._built().cloud_retries.labels(self.action_label(action)).inc()

    def inc_cost_overrun(self) -> None:
        """Count one cloud call that cost more than its reservation."""
        self._built().cost_overruns.inc()

    def set_status_provider(self, fn: StatusProvider) -> None:
        """Install the function read at scrape time for the point-in-time gauges."""
        self._provider = fn

    # -- exposition -----------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """Return the Prometheus text exposition and its content type."""
        from prometheus_client.exposition import generate_latest

        return generate_latest(self._built().registry), CONTENT_TYPE

    def record_status_failure(self) -> None:
        """Count a scrape whose status provider raised."""
        self._built().status_errors.inc()


def _counting(child: Any) -> Callable[[float], None]:
    """What ``child.inc`` does for a labelled counter, without its checks: ~0.5 µs less.

    ``inc`` checks that the child is labelled and the amount is not negative (both hold here)
    and then adds to its value; that value's own ``inc`` is called directly. A client whose
    counters are built otherwise gets ``child.inc``.
    """
    value = getattr(child, "_value", None)
    inc = getattr(value, "inc", None)
    return inc if callable(inc) else child.inc  # type: ignore[no-any-return]


def _observing(child: Any) -> Callable[[float], None]:
    """What ``child.observe`` does for a labelled histogram, with the bucket found by bisection.

    ``observe`` adds the amount to the sum and one to the first bucket whose upper bound is at
    least the amount, found by a loop in Python: ``bisect_left`` over the same bounds finds the
    same bucket in C (the last bound is +Inf). ~1 µs less. A client whose histograms are built
    otherwise gets ``child.observe``.
    """
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if not (
        isinstance(bounds, list)
        and isinstance(buckets, list)
        and len(bounds) == len(buckets) > 0
        and bounds[-1] == math.inf
        and callable(getattr(total, "inc", None))
        and all(callable(getattr(bucket, "inc", None)) for bucket in buckets)
    ):
        return child.observe  # type: ignore[no-any-return]
    add = total.inc  # type: ignore[union-attr]
    increments = [bucket.inc for bucket in buckets]
    ordered = tuple(bounds)

    def observe(amount: float) -> None:
        add(amount)
        increments[bisect_left(ordered, amount)](1)

    return observe


class _Series:
    """The ``prometheus_client`` registry and series of one ``Metrics``."""

    def __init__(self, metrics: Metrics) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.dispatches = Counter(
            "everreach_dispatch",
            "Dispatched actions by action, source that produced the result, and outcome.",
            ("action", "source", "outcome"),
            registry=self.registry,
        )
        self.duration = Histogram(
            "everreach_dispatch_duration_seconds",
            "Time from receiving an action to its result envelope, by action and source.",
            ("action", "source"),
            buckets=DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.cloud_retries = Counter(
            "everreach_cloud_retries",
            "Cloud call attempts that were retried (5xx, 429, timeout, connection error).",
            ("action",),
            registry=self.registry,
        )
        self.cost_overruns = Counter(
            "everreach_cost_overruns",
            "Cloud calls that cost more than they reserved; each closes the month's budget.",
            registry=self.registry,
        )
        self.status_errors = Counter(
            "everreach_status_provider_errors",
            "Scrapes where the status provider raised; its gauges were left out of that scrape.",
            registry=self.registry,
        )
        # Counting began when the Metrics was made, not when these objects were: the unlabelled
        # counters' ``_created`` samples say so, as they did when all was built up front.
        for counter in (self.cost_overruns, self.status_errors):
            counter._created = metrics._created_s
        self.registry.register(_StatusCollector(metrics))


class _StatusCollector:
    """Turn the status provider's dict into gauges at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return list(_status_families({}, self._metrics, describing=True))

    def collect(self) -> Iterable[Metric]:
        provider = self._metrics._provider
        if provider is None:
            return []
        try:
            status = provider()
            return list(_status_families(status, self._metrics))
        except Exception:
            # A scrape must not fail because one part of the status is broken: the counters
            # are still worth having; the failure is counted and logged.
            logger.exception("metrics status provider failed")
            self._metrics.record_status_failure()
            return []


def _status_families(
    status: Mapping[str, Any], metrics: Metrics, *, describing: bool = False
) -> Iterator[Metric]:
    """Yield the gauges for the keys present in ``status`` (all of them when describing)."""
    from prometheus_client.core import GaugeMetricFamily

    circuits = status.get("circuits")
    if describing or isinstance(circuits, Mapping):
        per_action = GaugeMetricFamily(
            "everreach_circuit_state",
            "Local circuit breaker of an action: 1 for its current state, 0 for the others.",
            labels=("action", "state"),
        )
        totals = GaugeMetricFamily(
            "everreach_circuits",
            "Number of local circuit breakers in each state (all actions, known or not).",
            labels=("state",),
        )
        counts = dict.fromkeys(CIRCUIT_STATES, 0)
        for action, state in sorted((circuits or {}).items()):
            state_v = _enum_value(state)
            if state_v not in counts:
                continue
            counts[state_v] += 1
            # Only known actions get series of their own; the label set stays bounded.
            if action in metrics.known_actions:
                for name in CIRCUIT_STATES:
                    per_action.add_metric((action, name), 1.0 if name == state_v else 0.0)
        for name, count in counts.items():
            totals.add_metric((name,), float(count))
        yield per_action
        yield totals

    cloud = _enum_value(status.get("cloud_circuit"))
    if describing or cloud in CIRCUIT_STATES:
        yield _state_set(
            "everreach_cloud_circuit_state",
            "Cloud circuit breaker: 1 for its current state, 0 for the others.",
            "state",
            CIRCUIT_STATES,
            cloud,
        )

    flags = (
        ("online", "everreach_online", "1 while the cloud is reachable, 0 while offline."),
        ("offline_mode", "everreach_offline_mode", "1 when OFFLINE_MODE forces offline."),
        (
            "cost_budget_closed",
            "everreach_cost_budget_closed",
            "1 while a call that cost more than it reserved keeps this month's budget closed.",
        ),
    )
    for key, name, help_text in flags:
        if describing or isinstance(status.get(key), bool):
            yield GaugeMetricFamily(name, help_text, value=1.0 if status.get(key) else 0.0)

    gauges = (
        ("outbox_depth", "everreach_outbox_depth", "Side-effect actions waiting for replay."),
        (
            "dead_letters",
            "everreach_outbox_dead_letters",
            "Outbox entries that exhausted their replays and need a person.",
        ),
        (
            "cost_month_usd",
            "everreach_cost_month_to_date_usd",
            "Cloud spend this calendar month in US dollars (reserved and committed).",
        ),
        (
            "cost_soft_cap_usd",
            "everreach_cost_soft_cap_usd",
            "COST_SOFT_CAP: from here on actions with a local handler run locally.",
        ),
        (
            "cost_hard_cap_usd",
            "everreach_cost_hard_cap_usd",
            "MONTHLY_COST_CAP: no cloud call is made at or above it.",
        ),
        ("bus_backlog", "everreach_bus_backlog", "Sync bus messages not yet delivered."),
        ("cache_entries", "everreach_cache_entries", "Entries in the offline response cache."),
    )
    for key, name, help_text in gauges:
        value = _number(status.get(key))
        if describing or value is not None:
            yield GaugeMetricFamily(name, help_text, value=value or 0.0)

    backend = _enum_value(status.get("bus_backend"))
    if describing or backend in BUS_BACKENDS:
        yield _state_set(
            "everreach_bus_backend",
            "Sync bus backend in use: 1 for the active one (redis, or the sqlite fallback).",
            "backend",
            BUS_BACKENDS,
            backend,
        )


def _state_set(
    name: str, help_text: str, label: str, states: Iterable[str], current: Any
) -> GaugeMetricFamily:
    """One 0/1 series per possible state, 1 for ``current`` (Prometheus' state-set pattern)."""
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily(name, help_text, labels=(label,))
    for state in states:
        family.add_metric((state,), 1.0 if state == current else 0.0)
    return family


def _enum_value(value: Any) -> Any:
    """A str Enum member's value, or the value itself (for plain strings and None)."""
    return getattr(value, "value", value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
