"""StateSync: outbox replay with a fake send, state push/pull over httpx.MockTransport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud_client import CloudClient
from config.hybrid_config import HybridConfig
from errors import (
    CircuitOpen,
    CloudTimeout,
    CloudUnavailable,
    Indeterminate,
    InvalidParams,
    KeyBusy,
    Unauthorized,
    UnknownAction,
)
from state_sync import Outbox, OutboxStatus, StateStore, StateSync

pytestmark = pytest.mark.prd200

CLOUD = "http://cloud.test"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class FakeSend:
    """The cloud call: records every call; raises the exceptions queued for a key first."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], str]] = []
        self.failures: dict[str, list[Exception]] = {}
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, action: str, params: dict[str, Any], key: str) -> Any:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self.calls.append((action, params, key))
            await asyncio.sleep(0)
            queued = self.failures.get(key)
            if queued:
                raise queued.pop(0)
            return {"done": key}
        finally:
            self.in_flight -= 1

    @property
    def keys(self) -> list[str]:
        return [key for _, _, key in self.calls]


class Parts:
    """An opened outbox and store on one file, and a factory of StateSync over them."""

    def __init__(self, outbox: Outbox, store: StateStore, send: FakeSend) -> None:
        self.outbox, self.store, self.send = outbox, store, send
        self.clients: list[httpx.AsyncClient] = []

    def sync(
        self,
        handler: Callable[[httpx.Request], Any] | None = None,
        *,
        endpoint: str | None = CLOUD,
        api_key: str | None = None,
    ) -> StateSync:
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler)) if handler else None
        if client is not None:
            self.clients.append(client)
        cloud = None
        if client is not None and endpoint is not None:
            cloud = CloudClient(endpoint=endpoint, api_key=api_key, http=client)
        return StateSync(outbox=self.outbox, store=self.store, send=self.send, cloud=cloud)


async def _open_parts(path: Path, *, max_attempts: int = 10) -> Parts:
    outbox = Outbox(path, max_attempts=max_attempts)
    store = StateStore(path, clock=lambda: T0.timestamp())
    await outbox.open()
    await store.open()
    return Parts(outbox, store, FakeSend())


async def _close_parts(parts: Parts) -> None:
    for client in parts.clients:
        await client.aclose()
    await parts.outbox.close()
    await parts.store.close()


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    opened = await _open_parts(tmp_path / "terminal" / "hybrid.sqlite3", max_attempts=3)
    yield opened
    await _close_parts(opened)


@pytest.fixture
async def cloud_parts(tmp_path: Path) -> AsyncIterator[Parts]:
    opened = await _open_parts(tmp_path / "cloud" / "hybrid.sqlite3")
    yield opened
    await _close_parts(opened)


async def _queue(outbox: Outbox, n: int) -> list[str]:
    keys = [f"idem-{i}" for i in range(n)]
    for i, key in enumerate(keys):
        await outbox.enqueue("dm.send", {"to": f"user{i}"}, key)
    return keys


def _ok_state_handler(seen: list[httpx.Request]) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"applied": 1, "rejected": 0})

    return handler


# -- replaying the outbox ---------------------------------------------------------------------


async def test_push_replays_in_order_with_the_original_keys(parts: Parts) -> None:
    keys = await _queue(parts.outbox, 5)
    counts = await parts.sync().push_pending_sync()
    assert parts.send.keys == keys
    assert [params for _, params, _ in parts.send.calls] == [{"to": f"user{i}"} for i in range(5)]
    assert counts == {"sent": 5, "dead": 0, "failed": 0, "remaining": 0, "state_pushed": 0}
    assert await parts.outbox.depth() == 0


async def test_a_transient_failure_stops_the_pass_and_keeps_order(parts: Parts) -> None:
    keys = await _queue(parts.outbox, 4)
    parts.send.failures[keys[1]] = [CloudUnavailable("HTTP 503")]
    sync = parts.sync()
    counts = await sync.push_pending_sync()
    assert parts.send.keys == keys[:2]
    assert (counts["sent"], counts["failed"], counts["remaining"]) == (1, 1, 3)
    head = (await parts.outbox.pending())[0]
    assert (head.idempotency_key, head.attempts) == (keys[1], 1)
    assert head.last_error == "cloud_unavailable: HTTP 503"

    counts = await sync.push_pending_sync()
    assert parts.send.keys == [*keys[:2], *keys[1:]]
    assert (counts["sent"], counts["remaining"]) == (3, 0)


@pytest.mark.parametrize(
    "error", [InvalidParams("bad to"), UnknownAction("no such action")], ids=type
)
async def test_a_4xx_makes_a_dead_letter_and_the_pass_goes_on(
    parts: Parts, error: Exception
) -> None:
    keys = await _queue(parts.outbox, 3)
    parts.send.failures[keys[0]] = [error]
    counts = await parts.sync().push_pending_sync()
    assert parts.send.keys == keys
    assert (counts["sent"], counts["dead"], counts["remaining"]) == (2, 1, 0)
    (dead,) = await parts.outbox.dead_letters()
    assert dead.idempotency_key == keys[0]
    assert dead.status is OutboxStatus.DEAD


@pytest.mark.parametrize(
    "error",
    [
        CircuitOpen("cloud circuit open"),
        CloudUnavailable("connection refused", never_ran=True),
        Unauthorized("HTTP 401"),
    ],
    ids=lambda e: e.detail,
)
async def test_a_failure_that_never_reached_the_cloud_stops_without_spending_attempts(
    parts: Parts, error: Exception
) -> None:
    keys = await _queue(parts.outbox, 2)
    parts.send.failures[keys[0]] = [error, error, error, error]
    sync = parts.sync()
    for _ in range(4):
        counts = await sync.push_pending_sync()
        assert (counts["sent"], counts["dead"], counts["remaining"]) == (0, 0, 2)
    head = (await parts.outbox.pending())[0]
    assert head.attempts == 0
    assert head.last_error is not None
    assert parts.send.keys == [keys[0]] * 4


async def test_ambiguous_failures_make_a_dead_letter_after_max_attempts(parts: Parts) -> None:
    keys = await _queue(parts.outbox, 2)
    parts.send.failures[keys[0]] = [CloudTimeout("read timeout")] * 3
    sync = parts.sync()
    assert (await sync.push_pending_sync())["failed"] == 1
    assert (await sync.push_pending_sync())["failed"] == 1
    counts = await sync.push_pending_sync()  # third attempt: max_attempts=3 reached
    assert (counts["dead"], counts["sent"], counts["remaining"]) == (1, 0, 1)
    counts = await sync.push_pending_sync()
    assert (counts["sent"], counts["remaining"]) == (1, 0)
    assert parts.send.keys == [keys[0]] * 3 + [keys[1]]


async def test_an_unexpected_exception_counts_as_an_ambiguous_failure(parts: Parts) -> None:
    keys = await _queue(parts.outbox, 1)
    parts.send.failures[keys[0]] = [RuntimeError("bug in send")]
    counts = await parts.sync().push_pending_sync()
    assert (counts["failed"], counts["remaining"]) == (1, 1)
    (item,) = await parts.outbox.pending()
    assert item.attempts == 1 and item.last_error == "RuntimeError: bug in send"


async def test_concurrent_passes_never_send_an_item_twice(parts: Parts) -> None:
    keys = await _queue(parts.outbox, 20)
    sync = parts.sync()
    await asyncio.gather(*(sync.push_pending_sync() for _ in range(4)))
    assert parts.send.keys == keys
    assert parts.send.max_in_flight == 1


async def test_a_corrupt_outbox_row_is_skipped_during_replay(
    parts: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlite3

    keys = await _queue(parts.outbox, 3)
    with sqlite3.connect(parts.outbox.path) as conn:
        conn.execute(
            "UPDATE hybrid_outbox SET params_json = 'x' WHERE idempotency_key = ?", (keys[1],)
        )
    counts = await parts.sync().push_pending_sync()
    assert parts.send.keys == [keys[0], keys[2]]
    assert (counts["sent"], counts["remaining"]) == (2, 0)
    (dead,) = await parts.outbox.dead_letters()
    assert dead.idempotency_key == keys[1]


# -- pushing local state ----------------------------------------------------------------------


async def test_push_posts_local_changes_and_marks_them_pushed(parts: Parts) -> None:
    await parts.store.set_local("content.pending.1", {"text": "a"}, kind="content_pending_publish")
    await parts.store.set_local("feedback.strategy", {"mode": "b"}, kind="feedback")
    seen: list[httpx.Request] = []
    sync = parts.sync(_ok_state_handler(seen), api_key="k")
    counts = await sync.push_pending_sync()
    assert counts["state_pushed"] == 2
    (request,) = seen
    assert (request.method, str(request.url)) == ("POST", f"{CLOUD}/api/sync/state")
    assert request.headers["Authorization"] == "Bearer k"
    assert json.loads(request.content) == {
        "changes": [
            {
                "key": "content.pending.1",
                "value": {"text": "a"},
                "kind": "content_pending_publish",
                "updated_at": T0.isoformat(),
            },
            {
                "key": "feedback.strategy",
                "value": {"mode": "b"},
                "kind": "feedback",
                "updated_at": T0.isoformat(),
            },
        ]
    }
    assert await parts.store.pending_changes() == []


@pytest.mark.parametrize("failure", [500, 401, "refused"])
async def test_a_failed_state_push_keeps_the_changes(parts: Parts, failure: int | str) -> None:
    await parts.store.set_local("a.key", 1, kind="generic")

    def handler(request: httpx.Request) -> httpx.Response:
        if failure == "refused":
            raise httpx.ConnectError("refused")
        return httpx.Response(int(failure))

    counts = await parts.sync(handler).push_pending_sync()
    assert counts["state_pushed"] == 0
    assert len(await parts.store.pending_changes()) == 1


async def test_without_an_endpoint_no_state_is_pushed(parts: Parts) -> None:
    await parts.store.set_local("a.key", 1, kind="generic")
    await _queue(parts.outbox, 1)
    counts = await parts.sync(endpoint=None).push_pending_sync()
    assert (counts["sent"], counts["state_pushed"]) == (1, 0)


# -- pulling the cloud's state ----------------------------------------------------------------


def _state_body(**entries: tuple[Any, str, datetime]) -> dict[str, Any]:
    return {
        "state": {
            key.replace("_", "."): {"value": v, "kind": k, "updated_at": t.isoformat()}
            for key, (v, k, t) in entries.items()
        }
    }


async def test_pull_applies_the_cloud_state_by_the_conflict_rules(parts: Parts) -> None:
    await parts.store.set_local("crm.stats", {"leads": 1}, kind="crm")
    await parts.store.set_local("content.pending", "local draft", kind="content_pending_publish")
    await parts.store.set_local("feedback.strategy", "local", kind="feedback")
    body = _state_body(
        crm_stats=({"leads": 40}, "crm", T0 - timedelta(days=1)),
        workflows_active=(["wf1"], "pipeline", T0),
        feedback_strategy=("cloud but older", "feedback", T0 - timedelta(hours=1)),
        content_pending=("cloud draft", "content_pending_publish", T0 + timedelta(hours=1)),
    )
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=body)

    result = await parts.sync(handler, api_key="k").pull_cloud_state()
    assert (seen[0].method, str(seen[0].url)) == ("GET", f"{CLOUD}/api/sync/state")
    assert seen[0].headers["Authorization"] == "Bearer k"
    assert sorted(result["keys"]) == ["crm.stats", "workflows.active"]
    assert (result["applied"], result["rejected"]) == (2, 2)
    values = {k: e["value"] for k, e in (await parts.store.snapshot())["state"].items()}
    assert values == {
        "crm.stats": {"leads": 40},
        "workflows.active": ["wf1"],
        "feedback.strategy": "local",
        "content.pending": "local draft",
    }


async def test_pull_skips_malformed_entries(parts: Parts, caplog: pytest.LogCaptureFixture) -> None:
    body = {
        "state": {
            "good.key": {"value": 1, "kind": "generic", "updated_at": T0.isoformat()},
            "no.time": {"value": 1, "kind": "generic"},
            "not.object": 5,
        }
    }
    result = await parts.sync(lambda r: httpx.Response(200, json=body)).pull_cloud_state()
    assert (result["applied"], result["rejected"], result["keys"]) == (1, 2, ["good.key"])
    assert "skipping" in caplog.text


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (httpx.Response(503), CloudUnavailable),
        (httpx.Response(401), Unauthorized),
        (httpx.Response(200, text="<html>"), CloudUnavailable),
        (httpx.Response(200, json={"nope": 1}), CloudUnavailable),
        (httpx.ConnectError("refused"), CloudUnavailable),
        (httpx.ReadTimeout("slow"), CloudTimeout),
    ],
    ids=["503", "401", "not-json", "no-state", "refused", "timeout"],
)
async def test_pull_failures_raise_from_the_exception_tree(
    parts: Parts, answer: httpx.Response | Exception, error: type[Exception]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(answer, Exception):
            raise answer
        return answer

    with pytest.raises(error):
        await parts.sync(handler).pull_cloud_state()


async def test_pull_without_an_endpoint_is_cloud_unavailable(parts: Parts) -> None:
    with pytest.raises(CloudUnavailable) as info:
        await parts.sync(endpoint=None).pull_cloud_state()
    assert info.value.never_ran is True


# -- the serving side -------------------------------------------------------------------------


async def test_serve_state_is_the_documented_shape(parts: Parts) -> None:
    await parts.store.set_local("crm.stats", {"leads": 3}, kind="crm")
    assert await parts.sync().serve_state() == {
        "state": {"crm.stats": {"value": {"leads": 3}, "kind": "crm", "updated_at": T0.isoformat()}}
    }


async def test_accept_state_applies_pushed_changes_as_the_cloud(parts: Parts) -> None:
    store = parts.store
    await store.apply_remote("crm.stats", "cloud crm", kind="crm", updated_at=T0)
    await store.apply_remote("feedback.strategy", "cloud fb", kind="feedback", updated_at=T0)
    await store.apply_remote(
        "content.pending",
        "cloud",
        kind="content_pending_publish",
        updated_at=T0 + timedelta(days=1),
    )
    later = (T0 + timedelta(hours=1)).isoformat()
    earlier = (T0 - timedelta(hours=1)).isoformat()
    result = await parts.sync().accept_state(
        {
            "changes": [
                {"key": "crm.stats", "value": "t", "kind": "crm", "updated_at": later},
                {
                    "key": "content.pending",
                    "value": "t",
                    "kind": "content_pending_publish",
                    "updated_at": earlier,
                },
                {
                    "key": "feedback.strategy",
                    "value": "t old",
                    "kind": "feedback",
                    "updated_at": earlier,
                },
                {"key": "new.key", "value": "t", "kind": "generic", "updated_at": earlier},
            ]
        }
    )
    assert result == {"applied": 2, "rejected": 2}
    values = {k: e["value"] for k, e in (await store.snapshot())["state"].items()}
    assert values == {
        "crm.stats": "cloud crm",
        "content.pending": "t",
        "feedback.strategy": "cloud fb",
        "new.key": "t",
    }


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"changes": "x"},
        {"changes": [{"key": "", "value": 1, "kind": "generic", "updated_at": "2025-01-01"}]},
        {"changes": [{"key": "a.b", "kind": "generic", "updated_at": "2025-01-01"}]},
        {"changes": [{"key": "a.b", "value": 1, "kind": "generic", "updated_at": "later"}]},
        {"changes": [{"key": "a.b", "value": 1, "kind": 5, "updated_at": "2025-01-01"}]},
    ],
    ids=["empty", "not-list", "empty-key", "no-value", "bad-time", "bad-kind"],
)
async def test_accept_state_rejects_a_malformed_body_whole(
    parts: Parts, body: dict[str, Any]
) -> None:
    good = {"key": "ok.key", "value": 1, "kind": "generic", "updated_at": T0.isoformat()}
    if isinstance(body.get("changes"), list):
        body = {"changes": [good, *body["changes"]]}
    with pytest.raises(InvalidParams):
        await parts.sync().accept_state(body)
    assert await parts.store.get("ok.key") is None


async def test_a_terminal_and_a_cloud_converge_through_push_and_pull(
    parts: Parts, cloud_parts: Parts
) -> None:
    cloud = cloud_parts.sync()
    await cloud_parts.store.set_local("crm.stats", {"leads": 50}, kind="crm")

    async def cloud_routes(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=await cloud.serve_state())
        return httpx.Response(200, json=await cloud.accept_state(json.loads(request.content)))

    terminal = parts.sync(cloud_routes)
    await parts.store.set_local("crm.stats", {"leads": 1}, kind="crm")
    await parts.store.set_local("content.pending.9", "batch piece", kind="content_pending_publish")

    counts = await terminal.push_pending_sync()
    assert counts["state_pushed"] == 2
    await terminal.pull_cloud_state()

    terminal_state = (await terminal.serve_state())["state"]
    cloud_state = (await cloud.serve_state())["state"]
    assert terminal_state == cloud_state
    assert cloud_state["crm.stats"]["value"] == {"leads": 50}
    assert cloud_state["content.pending.9"]["value"] == "batch piece"


def test_from_config_sends_the_cloud_key(tmp_path: Path) -> None:
    config = HybridConfig.from_mapping(
        {
            "EVERREACH_ENV": "hybrid",
            "CLOUD_ENDPOINT": CLOUD + "/",
            "EVERREACH_CLOUD_KEY": "s3cret",
            "CLOUD_TIMEOUT_SEC": "4",
            "DATA_DIR": str(tmp_path),
        }
    )
    sync = StateSync.from_config(
        config,
        outbox=Outbox.from_config(config),
        store=StateStore.from_config(config),
        send=FakeSend(),
        cloud=CloudClient.from_config(config, httpx.AsyncClient()),
    )
    assert sync.endpoint == CLOUD
    assert sync.timeout_s == 4.0
    assert sync.cloud is not None
    assert sync.cloud.auth_headers == {"Authorization": "Bearer s3cret"}


# -- keys the cloud still runs, and keys that may have run ------------------------------------


async def test_a_busy_key_neither_stops_the_pass_nor_spends_an_attempt(parts: Parts) -> None:
    keys = await _queue(parts.outbox, 4)
    parts.send.failures[keys[1]] = [KeyBusy("the cloud still runs this request (409)")] * 5
    counts = await parts.sync().push_pending_sync()
    assert parts.send.keys == keys  # tried once this pass, the others went on
    assert counts["sent"] == 3 and counts["remaining"] == 1 and counts["dead"] == 0
    (left,) = await parts.outbox.pending()
    assert left.idempotency_key == keys[1] and left.attempts == 0
    for _ in range(5):  # never a dead letter, however long the first run takes
        await parts.sync().push_pending_sync()
    assert await parts.outbox.dead_letters() == []
    await parts.sync().push_pending_sync()
    assert await parts.outbox.depth() == 0


async def test_a_key_that_may_have_run_is_parked_and_the_pass_goes_on(parts: Parts) -> None:
    keys = await _queue(parts.outbox, 3)
    parts.send.failures[keys[0]] = [Indeterminate("the cloud says it may have run (409)")]
    counts = await parts.sync().push_pending_sync()
    assert parts.send.keys == keys
    assert counts["sent"] == 2 and counts["dead"] == 1 and counts["remaining"] == 0
    (parked,) = await parts.outbox.dead_letters()
    assert parked.status is OutboxStatus.INDETERMINATE and parked.attempts == 0
    assert "may have run" in (parked.last_error or "")
    await parts.sync().push_pending_sync()  # parked items are not replayed
    assert parts.send.keys == keys
