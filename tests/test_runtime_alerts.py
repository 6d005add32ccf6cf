"""The runtime's alerts: opened from the configuration, fed by the parts, shown in /status.

In-process (the runtime in this event loop) with a real webhook listener on loopback and a real
cloud endpoint nobody answers; the process-level test is in test_e2e_alerts.py.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
from decimal import Decimal
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import alert_sources
from config.hybrid_config import HybridConfig
from errors import ConfigError
from pacing import Pacer
from pacing_stores import SqlitePaceStore
from rate_limits import RateLimits
from runtime import Runtime
from tests import alert_services
from tests.conftest import free_port, until
from tests.doc_blocks import DOCS, blocks
from tests.test_alerts import Listener, listener  # noqa: F401 (a fixture)


def _config(tmp_path: Path, **variables: Any) -> HybridConfig:
    return HybridConfig.from_mapping({"DATA_DIR": str(tmp_path / "data"), **variables})


def _dead_cloud() -> dict[str, str]:
    """A cloud endpoint nobody listens on, probed often: offline after three probes."""
    return {
        "CLOUD_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "CONNECTIVITY_INTERVAL_SEC": "0.05",
        "SYNC_INTERVAL_SEC": "0.05",
    }


async def test_an_alert_reaches_the_webhook_and_the_action_once(
    tmp_path: Path,
    listener: Listener,  # noqa: F811
) -> None:
    alert_services.RECEIVED.clear()
    secret_url = f"{listener.url}?token=s3cret-hook"
    config = _config(
        tmp_path,
        **_dead_cloud(),
        ALERT_WEBHOOK_URL=secret_url,
        ALERT_ACTION="ops.notify",
        EVERREACH_SERVICES="tests.alert_services",
    )
    async with Runtime.open(config) as runtime:
        await until(lambda: bool(listener.bodies), what="the cloud_offline alert")
        await until(lambda: bool(alert_services.RECEIVED), what="the alert action")
        await until(
            lambda: (
                runtime.connectivity is not None and runtime.connectivity.consecutive_failures >= 8
            ),
            what="more failed probes",
        )
        status = await runtime.instance_status.status()
    assert [b["event"] for b in listener.bodies] == ["cloud_offline"]
    body = listener.bodies[0]
    assert body["instance"] == runtime.instance_name
    assert {"event", "at", "instance", "detail", "endpoint", "failures"} <= set(body)
    text = f"[{runtime.instance_name}] cloud_offline: {body['detail']}"
    received = alert_services.RECEIVED
    assert received == [{"text": text, "event": "cloud_offline"}]
    alerts = status["alerts"]
    assert alerts["sinks"] == ["webhook", "action"]
    assert [(e["event"], e["status"]) for e in alerts["events"]] == [("cloud_offline", "sent")]
    assert alerts["failures"] == []
    assert "s3cret-hook" not in json.dumps(status)
    assert runtime.alerts_client is not None and runtime.alerts_client.is_closed
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "alerts"]


async def test_an_undeliverable_alert_fails_no_dispatch_and_shows_in_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(alert_sources, "ALERT_BACKOFF_S", 0.01)
    hook = f"http://127.0.0.1:{free_port()}/hook?token=s3cret-hook"  # nobody listens
    async with Runtime.open(_config(tmp_path, **_dead_cloud(), ALERT_WEBHOOK_URL=hook)) as runtime:
        await until(lambda: bool(runtime.alerter.snapshot()["events"]), what="cloud_offline")
        answer = await runtime.orchestrator.route("system.echo", {"hi": 1})
        assert answer.ok and answer.source == "local"
        await until(lambda: bool(runtime.alerter.snapshot()["failures"]), what="a failed delivery")
        status = await runtime.instance_status.status()
    failure = status["alerts"]["failures"][0]
    assert failure["event"] == "cloud_offline" and failure["sink"] == "webhook"
    assert "ConnectError" in failure["error"]
    assert status["alerts"]["events"][0]["status"] == "failed"
    assert status["alerts"]["events"][0]["attempts"] == 5
    assert "s3cret-hook" not in json.dumps(status)


async def test_without_sinks_events_are_recorded_for_the_timeline(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        COST_SOFT_CAP="0.5",
        MONTHLY_COST_CAP="1",
        CLOUD_ENDPOINT=f"http://127.0.0.1:{free_port()}",
        CONNECTIVITY_INTERVAL_SEC="3600",  # one probe: offline needs three failures
    )
    async with Runtime.open(config) as runtime:
        assert runtime.alerts_client is None
        assert runtime.cloud is not None
        for _ in range(runtime.cloud.breaker.failure_threshold):
            runtime.cloud.breaker.record_failure()
        outbox = runtime.outbox
        item = await outbox.enqueue("dm.send", {"to": "a"}, "key-1")
        await outbox.fail(item.id, "cloud answered 422", permanent=True)
        guard = runtime.cost_guard
        await guard.commit(await guard.reserve("claude.complete", Decimal("0.6"), "r1"))
        status = await runtime.instance_status.status()
    alerts = status["alerts"]
    assert alerts["sinks"] == []
    assert [(e["event"], e["subject"], e["status"]) for e in reversed(alerts["events"])] == [
        ("circuit_open", "cloud", "recorded"),
        ("dead_letter", item.id, "recorded"),
        ("soft_cap_reached", status["cost"]["month"], "recorded"),
    ]


async def test_an_alert_action_without_a_local_handler_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ALERT_ACTION=telegram\.send has no handler"):
        async with Runtime.open(_config(tmp_path, ALERT_ACTION="telegram.send")):
            pytest.fail("start-up must not get this far")


async def test_the_backlog_watch_is_started_for_a_pacer_and_stops_with_the_runtime(
    tmp_path: Path,
) -> None:
    pacer = Pacer(
        RateLimits.from_dict({"dm.send": {"max": 1, "per_sec": 7200}}),
        SqlitePaceStore(tmp_path / "pace.sqlite3"),
    )
    await pacer.open()
    try:
        for _ in range(2):  # one now, one booked two hours ahead
            await pacer.reserve_slot("dm.send")
        async with Runtime.open(_config(tmp_path)) as runtime:
            runtime.watch_backlog(pacer)
            await until(lambda: bool(runtime.alerter.snapshot()["events"]), what="the alert")
            status = await runtime.instance_status.status()
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "backlog-watch"]
    finally:
        await pacer.aclose()
    event = status["alerts"]["events"][0]
    assert (event["event"], event["subject"]) == ("rate_limit_backlog", "dm.send")


def _documented_body() -> dict[str, Any]:
    """The sample webhook body of docs/pacing-and-alerts.md."""
    (sample,) = [
        b
        for b in blocks(DOCS / "pacing-and-alerts.md")
        if b.lang == "json" and "cloud_offline" in b.text
    ]
    return dict(json.loads(sample.text))


async def test_the_documented_receiver_prints_the_documented_alert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location(
        "alert_receiver", DOCS / "examples" / "alert_receiver.py"
    )
    assert spec is not None and spec.loader is not None
    receiver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(receiver)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), receiver.AlertHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        hook = f"http://127.0.0.1:{httpd.server_address[1]}/alerts"
        config = _config(tmp_path, **_dead_cloud(), ALERT_WEBHOOK_URL=hook)
        async with Runtime.open(config) as runtime:
            await until(
                lambda: [e["status"] for e in runtime.alerter.snapshot()["events"]] == ["sent"],
                what="the alert to be delivered",
            )
            (event,) = runtime.alerter.snapshot()["events"]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"{event['at']} {runtime.instance_name} cloud_offline: {event['detail']}"]
    endpoint = config.cloud_endpoint
    assert event["detail"] == (
        f"cloud {endpoint} stopped answering (3 failed probes or calls in a row)"
    )
    documented = _documented_body()
    assert set(documented) == {"event", "at", "instance", "detail", *event["fields"]}
    assert documented["detail"] == event["detail"].replace(str(endpoint), documented["endpoint"])
