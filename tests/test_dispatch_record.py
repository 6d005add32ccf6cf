"""DispatchRecord and DispatchObserver: one record per call feeds metrics, the log and /status."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from config.hybrid_config import HybridConfig
from dispatch_record import MAX_COUNTED_ACTIONS, DispatchObserver, DispatchRecord
from envelope import Envelope
from errors import Env, HandlerError, Offline, Source
from hybrid_orchestrator import HybridOrchestrator
from local_executor import LocalExecutor
from metrics import Metrics
from service_registry import ServiceRegistry


def _ok(action: str = "dm.send", source: Source = Source.CLOUD) -> Envelope:
    return Envelope.success(
        action, {"x": 1}, source=source, request_id="r-1", duration_ms=12.5, env=Env.CLOUD
    )


def _record(envelope: Envelope) -> DispatchRecord:
    return DispatchRecord.of(envelope)


def test_a_record_reads_every_field_of_the_envelope_once() -> None:
    record = _record(_ok())
    assert record == DispatchRecord(
        request_id="r-1",
        action="dm.send",
        env="cloud",
        source="cloud",
        outcome="ok",
        error=None,
        duration_ms=12.5,
        attempts=1,
        ok_or_queued=True,
    )


def test_one_record_feeds_metrics_the_log_line_and_the_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics(["dm.send"])
    observer = DispatchObserver(metrics=metrics, logger=logging.getLogger("test.dispatch"))
    with caplog.at_level(logging.INFO, logger="test.dispatch"):
        observer.observe(_record(_ok()))
    assert observer.snapshot() == {"dm.send": {"cloud": 1}}
    text = metrics.render()[0].decode()
    assert 'everreach_dispatch_total{action="dm.send",outcome="ok",source="cloud"} 1.0' in text
    [line] = caplog.records
    assert (line.request_id, line.outcome, line.env) == ("r-1", "ok", "cloud")  # type: ignore[attr-defined]


def test_log_dispatch_off_writes_no_line_and_still_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics(["dm.send"])
    observer = DispatchObserver(
        metrics=metrics, logger=logging.getLogger("test.dispatch"), log_lines=False
    )
    failed = Envelope.failure("dm.send", Offline("x"), source=Source.CLOUD, request_id="r")
    with caplog.at_level(logging.DEBUG, logger="test.dispatch"):
        observer.observe(_record(_ok()))
        observer.observe(_record(failed))
    assert caplog.records == []
    assert observer.snapshot() == {"dm.send": {"cloud": 1, "offline": 1}}
    assert 'source="cloud"} 1.0' in metrics.render()[0].decode()


def test_failures_are_counted_by_error_and_unknown_actions_fold_into_other() -> None:
    observer = DispatchObserver()
    failed = Envelope.failure("dm.send", Offline("x"), source=Source.CLOUD, request_id="r")
    observer.observe(_record(_ok()))
    observer.observe(_record(failed))
    observer.observe(
        _record(Envelope.failure("no.such", HandlerError("x"), source=None, request_id="r"))
    )
    assert observer.snapshot() == {
        "dm.send": {"cloud": 1, "offline": 1},
        "other": {"handler_error": 1},
    }


def test_counted_actions_are_bounded() -> None:
    observer = DispatchObserver()
    for i in range(MAX_COUNTED_ACTIONS + 5):
        observer.observe(_record(_ok(f"svc.a{i}")))
    assert len(observer.counts) == MAX_COUNTED_ACTIONS + 1
    assert observer.counts["other"]["cloud"] == 5


class Recorder(DispatchObserver):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[DispatchRecord] = []

    def observe(self, record: DispatchRecord) -> None:
        self.records.append(record)
        super().observe(record)


async def test_route_and_serve_hand_exactly_one_record_per_call(tmp_path: Path) -> None:
    async def echo(params: dict[str, object]) -> dict[str, object]:
        return params

    config = HybridConfig.from_mapping(
        {"EVERREACH_ENV": "local", "DATA_DIR": str(tmp_path), "EVERREACH_TZ": "UTC"}
    )
    recorder = Recorder()
    orchestrator = HybridOrchestrator(
        config, local=LocalExecutor(ServiceRegistry({"svc.echo": echo})), observer=recorder
    )
    routed = await orchestrator.route("svc.echo", {"a": 1})
    served = await orchestrator.serve("svc.echo", {"a": 2}, "key-00000001")
    refused = await orchestrator.route("svc.echo", {}, force_env="nowhere")
    assert [r.request_id for r in recorder.records] == [
        routed.request_id,
        served.request_id,
        refused.request_id,
    ]
    assert [(r.env, r.source, r.outcome) for r in recorder.records] == [
        ("local", "local", "ok"),
        ("cloud", "cloud", "ok"),
        ("none", None, "invalid_params"),
    ]
    assert orchestrator.snapshot() == {"svc.echo": {"local": 1, "cloud": 1, "invalid_params": 1}}


def test_a_cloud_without_a_handler_is_counted_per_action_within_the_bound(caplog) -> None:
    observer = DispatchObserver(log_lines=False)
    detail = observer.cloud_lacks("research.keyword")
    observer.cloud_lacks("research.keyword")
    assert observer.cloud_missing_handlers == {"research.keyword": 2}
    assert "register it on the cloud instance too" in detail
    assert any(r.__dict__.get("event") == "cloud_missing_handler" for r in caplog.records)
    for i in range(MAX_COUNTED_ACTIONS + 3):
        observer.cloud_lacks(f"a.b{i}")
    assert len(observer.cloud_missing_handlers) == MAX_COUNTED_ACTIONS  # new names stop counting
    assert observer.cloud_missing_handlers["research.keyword"] == 2
