"""Tests of metrics.py: bounded labels, per-object registries, scrape-time gauges, promtool."""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
import time
from collections.abc import Mapping
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from errors import ErrorCode, Source
from metrics import CONTENT_TYPE, OTHER, Metrics
from tests.conftest import modules_loaded_by, service_missing

pytestmark = pytest.mark.prd200

KNOWN = ("research.keyword", "dm.send", "content.analyze_video")

FULL_STATUS: dict[str, Any] = {
    "circuits": {"content.analyze_video": "degraded", "dm.send": "closed"},
    "cloud_circuit": "open",
    "online": False,
    "offline_mode": True,
    "outbox_depth": 4,
    "dead_letters": 1,
    "cost_month_usd": 381.25,
    "cost_soft_cap_usd": 380.0,
    "cost_hard_cap_usd": 400.0,
    "bus_backend": "sqlite",
    "bus_backlog": 12,
    "cache_entries": 33,
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: Metrics) -> Samples:
    body, _ = metrics.render()
    found: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def populated(status: Mapping[str, Any] | None = None) -> Metrics:
    metrics = Metrics(KNOWN)
    metrics.observe_dispatch("research.keyword", "cloud", "ok", 0.042)
    metrics.observe_dispatch("dm.send", "outbox", "queued", 0.003)
    metrics.observe_dispatch("content.analyze_video", "local", "handler_error", 1.5)
    metrics.inc_cloud_retry("research.keyword")
    metrics.set_status_provider(lambda: dict(status if status is not None else FULL_STATUS))
    return metrics


def test_dispatch_is_counted_by_action_source_and_outcome() -> None:
    metrics = Metrics(KNOWN)
    metrics.observe_dispatch("dm.send", "cloud", "ok", 0.2)
    metrics.observe_dispatch("dm.send", "cloud", "ok", 0.3)
    metrics.observe_dispatch("dm.send", "local_fallback", "ok", 0.01)
    samples = scrape(metrics)
    total = "everreach_dispatch_total"
    assert value(samples, total, action="dm.send", source="cloud", outcome="ok") == 2
    assert value(samples, total, action="dm.send", source="local_fallback", outcome="ok") == 1


def test_unknown_actions_sources_and_outcomes_share_one_other_series() -> None:
    metrics = Metrics(KNOWN)
    for i in range(50):
        metrics.observe_dispatch(f"evil.action_{i}", f"src{i}", f"outcome{i}", 0.001)
    samples = scrape(metrics)
    series = [key for key in samples if key[0] == "everreach_dispatch_total"]
    assert series == [
        (
            "everreach_dispatch_total",
            frozenset({("action", OTHER), ("source", OTHER), ("outcome", OTHER)}),
        )
    ]
    assert (
        value(samples, "everreach_dispatch_total", action=OTHER, source=OTHER, outcome=OTHER) == 50
    )


def test_str_enum_members_give_their_values_as_labels() -> None:
    metrics = Metrics(KNOWN)
    metrics.observe_dispatch("research.keyword", Source.CACHE, ErrorCode.TIMEOUT, 0.5)
    samples = scrape(metrics)
    assert (
        value(
            samples,
            "everreach_dispatch_total",
            action="research.keyword",
            source="cache",
            outcome="timeout",
        )
        == 1
    )


def test_a_dispatch_without_a_source_is_labelled_none() -> None:
    metrics = Metrics(KNOWN)
    metrics.observe_dispatch("dm.send", None, "cost_cap_reached", 0.001)
    samples = scrape(metrics)
    labels = {"action": "dm.send", "source": "none", "outcome": "cost_cap_reached"}
    assert value(samples, "everreach_dispatch_total", **labels) == 1


def test_duration_histogram_records_seconds_per_action_and_source() -> None:
    metrics = Metrics(KNOWN)
    metrics.observe_dispatch("research.keyword", "cloud", "ok", 0.004)
    metrics.observe_dispatch("research.keyword", "cloud", "ok", 7.0)
    samples = scrape(metrics)
    labels = {"action": "research.keyword", "source": "cloud"}
    assert value(samples, "everreach_dispatch_duration_seconds_count", **labels) == 2
    assert math.isclose(value(samples, "everreach_dispatch_duration_seconds_sum", **labels), 7.004)
    assert value(samples, "everreach_dispatch_duration_seconds_bucket", le="0.005", **labels) == 1
    assert value(samples, "everreach_dispatch_duration_seconds_bucket", le="10.0", **labels) == 2


def test_each_duration_lands_in_the_bucket_prometheus_client_would_put_it_in() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from metrics import DURATION_BUCKETS_S

    durations = [0.0, 1e-9, *DURATION_BUCKETS_S, *(b * 1.0001 for b in DURATION_BUCKETS_S), 1e9]
    metrics = Metrics(KNOWN)
    registry = CollectorRegistry()
    reference = Histogram("ref", "ref", ("action", "source"), buckets=DURATION_BUCKETS_S,
                          registry=registry)  # fmt: skip
    for duration in durations:
        metrics.observe_dispatch("dm.send", "cloud", "ok", duration)
        reference.labels("dm.send", "cloud").observe(duration)
    ours = {
        (name.removeprefix("everreach_dispatch_duration_seconds"), labels): count
        for (name, labels), count in scrape(metrics).items()
        if name.startswith("everreach_dispatch_duration_seconds") and "_created" not in name
    }
    theirs = {
        (sample.name.removeprefix("ref"), frozenset(sample.labels.items())): sample.value
        for family in registry.collect()
        for sample in family.samples
        if "_created" not in sample.name
    }
    assert ours == theirs and len(ours) == len(DURATION_BUCKETS_S) + 3  # buckets, +Inf, count, sum


def test_an_impossible_duration_is_counted_but_not_observed() -> None:
    metrics = Metrics(KNOWN)
    metrics.observe_dispatch("dm.send", "cloud", "ok", float("nan"))
    metrics.observe_dispatch("dm.send", "cloud", "ok", -1.0)
    samples = scrape(metrics)
    assert (
        value(samples, "everreach_dispatch_total", action="dm.send", source="cloud", outcome="ok")
        == 2
    )
    assert "everreach_dispatch_duration_seconds_count" not in names(samples)


def test_cloud_retries_are_counted_per_known_action() -> None:
    metrics = Metrics(KNOWN)
    metrics.inc_cloud_retry("dm.send")
    metrics.inc_cloud_retry("dm.send")
    metrics.inc_cloud_retry("no.such_action")
    samples = scrape(metrics)
    assert value(samples, "everreach_cloud_retries_total", action="dm.send") == 2
    assert value(samples, "everreach_cloud_retries_total", action=OTHER) == 1


def test_two_metrics_objects_keep_separate_series() -> None:
    first, second = Metrics(KNOWN), Metrics(KNOWN)
    first.observe_dispatch("dm.send", "cloud", "ok", 0.1)
    labels = {"action": "dm.send", "source": "cloud", "outcome": "ok"}
    assert value(scrape(first), "everreach_dispatch_total", **labels) == 1
    assert ("everreach_dispatch_total", frozenset(labels.items())) not in scrape(second)


def test_status_provider_values_become_gauges() -> None:
    samples = scrape(populated())
    assert value(samples, "everreach_online") == 0
    assert value(samples, "everreach_offline_mode") == 1
    assert value(samples, "everreach_outbox_depth") == 4
    assert value(samples, "everreach_outbox_dead_letters") == 1
    assert value(samples, "everreach_cost_month_to_date_usd") == 381.25
    assert value(samples, "everreach_cost_soft_cap_usd") == 380
    assert value(samples, "everreach_cost_hard_cap_usd") == 400
    assert value(samples, "everreach_bus_backlog") == 12
    assert value(samples, "everreach_cache_entries") == 33
    assert value(samples, "everreach_bus_backend", backend="sqlite") == 1
    assert value(samples, "everreach_bus_backend", backend="redis") == 0
    assert value(samples, "everreach_cloud_circuit_state", state="open") == 1
    assert value(samples, "everreach_cloud_circuit_state", state="closed") == 0


def test_circuit_states_are_a_state_set_per_known_action() -> None:
    samples = scrape(populated())
    video = "content.analyze_video"
    assert value(samples, "everreach_circuit_state", action=video, state="degraded") == 1
    assert value(samples, "everreach_circuit_state", action=video, state="closed") == 0
    assert value(samples, "everreach_circuit_state", action="dm.send", state="closed") == 1
    assert value(samples, "everreach_circuits", state="degraded") == 1
    assert value(samples, "everreach_circuits", state="closed") == 1


def test_circuit_of_an_unknown_action_is_only_in_the_totals() -> None:
    samples = scrape(populated({"circuits": {"made.up": "open", "dm.send": "open"}}))
    assert value(samples, "everreach_circuits", state="open") == 2
    per_action = {
        dict(labels)["action"] for name, labels in samples if name == "everreach_circuit_state"
    }
    assert per_action == {"dm.send"}


def test_status_is_read_at_each_scrape() -> None:
    state = {"outbox_depth": 1}
    metrics = Metrics(KNOWN)
    metrics.set_status_provider(lambda: state)
    assert value(scrape(metrics), "everreach_outbox_depth") == 1
    state["outbox_depth"] = 9
    assert value(scrape(metrics), "everreach_outbox_depth") == 9


def test_missing_and_malformed_status_keys_are_left_out() -> None:
    samples = scrape(
        populated(
            {
                "outbox_depth": "lots",
                "cloud_circuit": "exploded",
                "bus_backend": "kafka",
                "online": True,
                "cost_month_usd": float("inf"),
            }
        )
    )
    assert value(samples, "everreach_online") == 1
    for absent in (
        "everreach_outbox_depth",
        "everreach_cloud_circuit_state",
        "everreach_bus_backend",
        "everreach_cost_month_to_date_usd",
        "everreach_offline_mode",
        "everreach_cache_entries",
        "everreach_circuit_state",
    ):
        assert absent not in names(samples), absent


def test_no_status_provider_means_no_gauges_but_counters_still_render() -> None:
    metrics = Metrics(KNOWN)
    metrics.observe_dispatch("dm.send", "cloud", "ok", 0.1)
    samples = scrape(metrics)
    assert "everreach_dispatch_total" in names(samples)
    assert "everreach_outbox_depth" not in names(samples)


def test_a_failing_status_provider_does_not_break_the_scrape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = populated()

    def broken() -> dict[str, Any]:
        raise RuntimeError("ledger unreachable")

    metrics.set_status_provider(broken)
    with caplog.at_level(logging.ERROR, logger="metrics"):
        scrape(metrics)
        samples = scrape(metrics)
    assert "everreach_dispatch_total" in names(samples)
    assert "everreach_outbox_depth" not in names(samples)
    assert "ledger unreachable" in caplog.text

    metrics.set_status_provider(lambda: FULL_STATUS)
    samples = scrape(metrics)
    assert value(samples, "everreach_status_provider_errors_total") == 2
    assert value(samples, "everreach_outbox_depth") == 4


def test_render_returns_the_prometheus_text_content_type() -> None:
    body, content_type = populated().render()
    assert content_type == CONTENT_TYPE
    assert content_type.startswith("text/plain; version=0.0.4")
    assert body.startswith(b"# HELP ")


def test_every_family_is_prefixed_and_counters_end_in_total() -> None:
    body, _ = populated().render()
    families = list(text_string_to_metric_families(body.decode()))
    assert families
    for family in families:
        assert family.name.startswith("everreach_"), family.name
    type_lines = [line.split() for line in body.decode().splitlines() if line.startswith("# TYPE ")]
    for _, _, name, kind in type_lines:
        if kind == "counter":
            assert name.endswith("_total"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name


@pytest.mark.process
def test_promtool_check_metrics_is_clean_on_a_populated_scrape() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        service_missing("promtool (Debian package: prometheus)")
    assert promtool is not None
    body, _ = populated().render()
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
    assert proc.stdout.strip() == b"" and proc.stderr.strip() == b"", proc.stderr.decode()


def test_cost_overruns_are_counted_and_a_closed_budget_is_a_gauge() -> None:
    metrics = Metrics(KNOWN)
    metrics.set_status_provider(lambda: {"cost_budget_closed": True})
    assert value(scrape(metrics), "everreach_cost_overruns_total") == 0
    metrics.inc_cost_overrun()
    samples = scrape(metrics)
    assert value(samples, "everreach_cost_overruns_total") == 1
    assert value(samples, "everreach_cost_budget_closed") == 1


def test_a_scrape_before_any_dispatch_shows_the_counters_at_zero_since_construction() -> None:
    made_before = time.time()
    metrics = Metrics(KNOWN)
    made_after = time.time()
    samples = scrape(metrics)
    assert value(samples, "everreach_cost_overruns_total") == 0
    assert value(samples, "everreach_status_provider_errors_total") == 0
    for name in ("everreach_cost_overruns_created", "everreach_status_provider_errors_created"):
        assert made_before <= value(samples, name) <= made_after


@pytest.mark.process
def test_prometheus_client_is_loaded_on_first_use_not_with_the_metrics() -> None:
    made = "from metrics import Metrics\nmetrics = Metrics(['dm.send'])"
    assert "prometheus_client" not in modules_loaded_by(made)
    used = f"{made}\nmetrics.observe_dispatch('dm.send', 'local', 'ok', 0.1)"
    assert "prometheus_client" in modules_loaded_by(used)
