"""Pacing and scheduled actions at the HTTP edge (in-process apps) and in ``deferral``.

Real SQLite files and a real refused Redis connection; the limits file is written per test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import service_registry
from deferral import Deferral
from errors import ConfigError, RateLimited
from outbox import Outbox
from pacing import Pacer
from pacing_stores import RedisPaceStore
from rate_limits import RateLimits
from tests.conftest import free_port

SERVICES = ("tests.e2e_services",)


@pytest.fixture(autouse=True)
def _private_registry() -> Iterator[None]:
    """The apps here import tests.e2e_services into a @register table of their own, so that
    its actions do not clash with the modules later tests import (the table is put back)."""
    table = service_registry._DECLARED
    saved = {name: sys.modules.pop(name) for name in SERVICES if name in sys.modules}
    service_registry._DECLARED = {}
    try:
        yield
    finally:
        service_registry._DECLARED = table
        for name in SERVICES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def _limits(tmp_path: Path, limits: dict[str, Any]) -> str:
    path = tmp_path / "rate_limits.json"
    path.write_text(json.dumps(limits))
    return str(path)


def _local(app_client: Any, tmp_path: Path, limits: dict[str, Any], **more: str) -> Any:
    return app_client(
        EVERREACH_SERVICES="tests.e2e_services",
        RATE_LIMITS_PATH=_limits(tmp_path, limits),
        **more,
    )


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _poll(predicate: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_side_effect_over_its_limit_is_deferred_with_a_202(app_client, tmp_path):
    client = _local(app_client, tmp_path, {"dm.send": {"max": 2, "per_sec": 3600}})
    answers = [
        client.post("/dispatch", json={"action": "dm.send", "params": {"id": i}}) for i in range(3)
    ]
    assert [a.status_code for a in answers] == [200, 200, 202]
    body = answers[2].json()
    assert body["queued"] is True and body["source"] == "outbox" and body["ok"] is False
    assert body["outbox_id"]
    assert body["detail"].startswith("over its rate limit 'dm.send' (2 per 3600 s)")
    until = datetime.fromisoformat(body["deferred_until"])
    assert until.tzinfo is not None
    assert timedelta(minutes=59) < until - datetime.now(UTC) <= timedelta(hours=1)
    status = client.get("/status").json()
    (limit,) = status["rate_limits"]["limits"]
    assert (limit["key"], limit["used"], limit["max"], limit["deferred"]) == ("dm.send", 2, 2, 1)
    assert limit["backlog_s"] > 3500
    assert status["outbox"]["deferred"] == 1


def test_a_read_only_action_over_its_limit_is_429_with_retry_after(app_client, tmp_path):
    client = _local(app_client, tmp_path, {"research.*": {"max": 1, "per_sec": 600}})
    first = client.post("/dispatch", json={"action": "research.keyword", "params": {}})
    assert first.status_code == 200
    second = client.post("/dispatch", json={"action": "research.platform", "params": {}})
    assert second.status_code == 429
    assert second.json()["error"] == "rate_limited"
    assert 590 <= int(second.headers["Retry-After"]) <= 600
    assert "deferred_until" in second.json()
    # Nothing was queued, and the circuits never heard of it.
    status = client.get("/status").json()
    assert status["outbox"]["depth"] == 0
    assert status["circuits"]["local"].get("research.platform", "closed") == "closed"


def test_a_repeated_key_over_the_limit_gets_the_same_deferral(app_client, tmp_path):
    client = _local(app_client, tmp_path, {"dm.send": {"max": 1, "per_sec": 3600}})
    assert client.post("/dispatch", json={"action": "dm.send"}).status_code == 200
    body = {"action": "dm.send", "params": {"to": "x"}, "idempotency_key": "deferred-key-1"}
    first = client.post("/dispatch", json=body)
    again = client.post("/dispatch", json=body)
    assert first.status_code == again.status_code == 202
    assert again.json()["outbox_id"] == first.json()["outbox_id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    status = client.get("/status").json()
    assert status["outbox"]["depth"] == 1
    assert status["rate_limits"]["limits"][0]["deferred"] == 1


def test_batch_items_are_paced_one_by_one_in_order(app_client, tmp_path):
    client = _local(
        app_client,
        tmp_path,
        {"dm.send": {"max": 2, "per_sec": 3600}, "research.*": {"max": 1, "per_sec": 600}},
    )
    items = [{"action": "dm.send", "params": {"id": i}} for i in range(3)]
    items += [{"action": "research.keyword"}, {"action": "research.keyword"}]
    answer = client.post("/batch", json={"items": items, "max_concurrent": 1})
    assert answer.status_code == 200
    results = answer.json()["results"]
    outcomes = [(r["ok"], r.get("queued", False), r["error"]) for r in results]
    assert outcomes == [
        (True, False, None),
        (True, False, None),
        (False, True, None),
        (True, False, None),
        (False, False, "rate_limited"),
    ]
    assert results[2]["deferred_until"] and results[4]["deferred_until"]


def test_a_deferred_item_runs_once_when_its_slot_comes(app_client, tmp_path):
    log = tmp_path / "runs.jsonl"
    client = _local(app_client, tmp_path, {"dm.send": {"max": 1, "per_sec": 1.5}})
    codes = [
        client.post(
            "/dispatch", json={"action": "dm.send", "params": {"id": i, "log": str(log)}}
        ).status_code
        for i in range(3)
    ]
    assert codes == [200, 202, 202]
    _poll(lambda: len(_lines(log)) >= 3, "the two deferred items to run")
    runs = _lines(log)
    assert [r["id"] for r in runs] == [0, 1, 2]  # in order
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(runs)]
    # Never two in one window: a run is at most a tenth of the window late (pacing.LATE_GRACE_S).
    assert all(gap >= 1.5 * 0.9 - 0.05 for gap in gaps), gaps
    _poll(lambda: client.get("/status").json()["outbox"]["depth"] == 0, "the outbox to empty")
    assert len(_lines(log)) == 3


def test_a_scheduled_action_is_kept_and_can_be_cancelled(app_client, tmp_path):
    log = tmp_path / "runs.jsonl"
    client = _local(app_client, tmp_path, {})
    answer = client.post(
        "/dispatch",
        json={"action": "dm.send", "params": {"log": str(log)}, "delay_sec": 1.0},
    )
    assert answer.status_code == 202
    body = answer.json()
    assert body["queued"] is True and body["deferred_until"]
    assert body["detail"].startswith("scheduled: kept in the outbox")
    cancelled = client.delete(f"/outbox/{body['outbox_id']}")
    assert cancelled.status_code == 200 and cancelled.json()["id"] == body["outbox_id"]
    again = client.delete(f"/outbox/{body['outbox_id']}")
    assert again.status_code == 404 and "sent already" in again.json()["detail"]
    # A second one, not cancelled, runs: the first one's time passes with nothing run for it.
    later = client.post(
        "/dispatch",
        json={"action": "dm.send", "params": {"log": str(log), "id": 2}, "delay_sec": 1.5},
    )
    assert later.status_code == 202
    _poll(lambda: len(_lines(log)) >= 1, "the scheduled action to run")
    assert [r["id"] for r in _lines(log)] == [2]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"not_before": "2030-01-02T09:00:00Z", "delay_sec": 5}, "not both"),
        ({"not_before": "2030-01-02T09:00:00"}, "time zone"),
        ({"not_before": "2030-01-02"}, "time zone"),
        ({"not_before": "next tuesday"}, "RFC 3339"),
        ({"not_before": 1893574800}, "RFC 3339"),
        ({"not_before": "2999-01-02T09:00:00Z"}, "days ahead"),
        ({"delay_sec": -1}, "delay_sec"),
        ({"delay_sec": 10**12}, "days ahead"),
        ({"delay_sec": "5"}, "delay_sec"),
        ({"not_before": "0001-01-01T00:00:00+14:00"}, "out of range"),
    ],
)
def test_a_bad_schedule_is_422_saying_why(module_app_client, extra, message):
    client = module_app_client()
    answer = client.post("/dispatch", json={"action": "system.echo", **extra})
    assert answer.status_code == 422, answer.text
    assert message in answer.json()["detail"]


def test_a_schedule_in_the_past_runs_now(module_app_client):
    client = module_app_client()
    answer = client.post(
        "/dispatch", json={"action": "system.echo", "not_before": "2020-01-01T00:00:00+02:00"}
    )
    assert answer.status_code == 200 and answer.json()["ok"] is True


def test_the_cloud_role_answers_429_with_the_time_a_slot_frees(app_client, tmp_path):
    cloud = _local(
        app_client,
        tmp_path,
        {"dm.send": {"max": 1, "per_sec": 600}},
        EVERREACH_ENV="cloud",
        EVERREACH_CLOUD_KEY="cloud-key-123",
    )
    headers = {"Authorization": "Bearer cloud-key-123"}
    first = cloud.post("/api/services/dm/send", json={"params": {}}, headers=headers)
    assert first.status_code == 200
    second = cloud.post(
        "/api/services/dm/send",
        json={"params": {}},
        headers={**headers, "Idempotency-Key": "served-key-0001"},
    )
    assert second.status_code == 429
    assert second.json()["error"] == "rate_limited"
    assert int(second.headers["Retry-After"]) > 590
    assert second.json()["deferred_until"]
    # Refused before anything ran: the key stays free for the retry at the given time.
    state = cloud.get("/api/idempotency/served-key-0001", headers=headers).json()["state"]
    assert state == "unknown"


def test_a_malformed_limits_file_stops_start_up_naming_file_and_entry(app_client, tmp_path):
    path = _limits(tmp_path, {"dm.send": {"max": 0, "per_sec": 5}})
    with pytest.raises(ConfigError, match=r"rate_limits.json.*'dm.send'.*max"):
        app_client(RATE_LIMITS_PATH=path)


async def test_old_outbox_file_gains_the_new_columns(tmp_path):
    path = tmp_path / "hybrid.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            """
            CREATE TABLE hybrid_outbox (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
                action TEXT NOT NULL, params_json TEXT NOT NULL,
                idempotency_key TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0, status TEXT NOT NULL DEFAULT 'pending',
                last_error TEXT, updated_at TEXT NOT NULL);
            INSERT INTO hybrid_outbox (id, action, params_json, idempotency_key, created_at,
                updated_at) VALUES ('old1', 'dm.send', '{"to": "a"}', 'key-old-1',
                '2025-01-01T00:00:00+00:00', '2025-01-01T00:00:00+00:00');
            """
        )
    outbox = Outbox(path)
    await outbox.open()
    try:
        (item,) = await outbox.pending()
        assert (item.id, item.params, item.not_before, item.pace_slot) == (
            "old1",
            {"to": "a"},
            None,
            None,
        )
        later = datetime.now(UTC) + timedelta(hours=1)
        kept = await outbox.enqueue("dm.send", {}, "key-new-1", not_before=later, pace_slot="s1")
        assert kept.pace_slot == "s1" and kept.not_before is not None
        assert abs((kept.not_before - later).total_seconds()) < 0.001
        assert [i.id for i in await outbox.pending()] == ["old1"]  # the new one is not due
        assert await outbox.next_due() == kept.not_before
    finally:
        await outbox.close()
    with sqlite3.connect(path) as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(hybrid_outbox)")}
    assert {"not_before", "pace_slot"} <= columns


async def test_a_pacing_store_that_is_down_defers_and_never_runs(tmp_path):
    limits = RateLimits.from_dict({"dm.send": {"max": 100, "per_sec": 1}})
    dead = RedisPaceStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.5)
    pacer = Pacer(limits, dead)
    outbox = Outbox(tmp_path / "hybrid.sqlite3")
    await outbox.open()
    await pacer.open()
    try:
        deferral = Deferral(pacer, outbox)
        before = datetime.now(UTC)
        item = await deferral.gate("dm.send", {}, "key-down-1", side_effect=True)
        assert item is not None and item.not_before is not None
        assert item.not_before > before  # kept, not run
        with pytest.raises(RateLimited):
            await deferral.gate("dm.send", {}, "key-down-2", side_effect=False)
        # Unlimited actions never touch the store.
        assert await deferral.gate("system.echo", {}, "key-down-3", side_effect=True) is None
        # When it falls due, the replay's claim still fails closed: rescheduled, not sent.
        assert not await deferral.admit(item)
        (kept,) = await outbox._db.run(
            lambda c: c.execute("SELECT not_before FROM hybrid_outbox").fetchone()
        )
        assert kept > before.timestamp()
    finally:
        await pacer.aclose()
        await outbox.close()


async def test_cancelling_gives_the_slot_back(tmp_path):
    from pacing_stores import SqlitePaceStore

    limits = RateLimits.from_dict({"dm.send": {"max": 1, "per_sec": 3600}})
    pacer = Pacer(limits, SqlitePaceStore(tmp_path / "pacing.sqlite3"))
    outbox = Outbox(tmp_path / "hybrid.sqlite3")
    await outbox.open()
    await pacer.open()
    try:
        deferral = Deferral(pacer, outbox)
        assert await deferral.gate("dm.send", {}, "key-slot-00", side_effect=True) is None
        first = await deferral.gate("dm.send", {}, "key-slot-01", side_effect=True)
        second = await deferral.gate("dm.send", {}, "key-slot-02", side_effect=True)
        assert first is not None and second is not None
        assert first.not_before is not None and second.not_before is not None
        assert second.not_before > first.not_before
        assert (await pacer.snapshot())[0].deferred == 2
        await deferral.cancel(first.id)
        assert (await pacer.snapshot())[0].deferred == 1
        assert [i.id for i in await outbox.pending()] == []
        with pytest.raises(KeyError):
            await deferral.cancel(first.id)
    finally:
        await pacer.aclose()
        await outbox.close()
    await asyncio.sleep(0)


def test_cron_jobs_are_paced_like_dispatches(app_client, tmp_path):
    log = tmp_path / "runs.jsonl"
    schedules = tmp_path / "schedules.json"
    job = {"id": "dm", "action": "dm.send", "params": {"log": str(log)}, "interval_sec": 1}
    schedules.write_text(json.dumps([job]))
    client = _local(
        app_client,
        tmp_path,
        {"dm.send": {"max": 1, "per_sec": 3600}},
        SCHEDULES_PATH=str(schedules),
    )

    def deferred() -> int:
        return int(client.get("/status").json()["outbox"]["deferred"])

    _poll(lambda: deferred() >= 2, "two fires of the job to be deferred")
    assert len(_lines(log)) == 1  # one run in the window; the later fires wait their turn
