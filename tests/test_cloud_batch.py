"""The cloud calls of a /batch go out together (``cloud_batch``), and nothing else changes.

In process (``httpx.MockTransport``): how calls of one loop turn are grouped, how each answer
line reaches its call, what a call hears when the shared request fails, the fallback for a
cloud without ``/api/batch``. The cloud's side (``POST /api/batch``) in an app: each item runs
as its own ``/api/services`` call would. End to end (real uvicorn processes): a /batch of DMs
through a proxy that counts the requests, an answer lost after the cloud ran everything, and a
cloud SIGKILLed while a group runs: every DM delivered or parked, none twice.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud_batch import BATCH_PATH, DELIVER_SLICE, CloudBatcher
from cloud_client import CloudClient, CloudTimeouts
from cloud_executor import CloudExecutor, RetryPolicy
from errors import CloudUnavailable, Indeterminate, RateLimited, UnknownAction
from tests.conftest import free_port, wait_until_it_sees_its_cloud
from tests.fault_proxy import FaultProxy

KEY = "batch-cloud-key-123"


def _envelope(action: str, result: Any) -> dict[str, Any]:
    return {"ok": True, "action": action, "source": "cloud", "result": result, "cost_usd": 0}


class FakeCloud:
    """A MockTransport cloud: ``/api/batch`` answers lines (``order`` reverses them)."""

    def __init__(self, *, batch_status: int = 200, drop: int | None = None) -> None:
        self.requests: list[tuple[str, Any, dict[str, str]]] = []
        self.batch_status = batch_status
        self.drop = drop  # the index of an item whose line never comes

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append((request.url.path, body, dict(request.headers)))
        if request.url.path == BATCH_PATH:
            if self.batch_status != 200:
                return httpx.Response(self.batch_status, json={"ok": False, "error": "not_found"})
            lines = []
            for index, item in reversed(list(enumerate(body["items"]))):
                if index == self.drop:
                    continue
                result = {"params": item["params"], "key": item.get("idempotency_key")}
                line = {
                    "i": index,
                    "status": 200,
                    "headers": {},
                    "body": _envelope(item["action"], result),
                }
                lines.append(json.dumps(line) + "\n")
            return httpx.Response(200, content="".join(lines).encode())
        result = {"params": body["params"], "key": request.headers.get("idempotency-key")}
        return httpx.Response(200, json=_envelope("x.y", result))


def _executor(transport: httpx.AsyncBaseTransport) -> tuple[CloudExecutor, CloudBatcher]:
    http = httpx.AsyncClient(transport=transport)
    client = CloudClient(
        endpoint="http://cloud.test", api_key=KEY, http=http, timeouts=CloudTimeouts(5.0)
    )
    batcher = CloudBatcher(client)
    executor = CloudExecutor(
        endpoint=client.endpoint,
        api_key=None,
        client=http,
        cloud_client=client,
        batcher=batcher,
        policy=RetryPolicy(retries=0),
    )
    return executor, batcher


async def _together(executor: CloudExecutor, name: str, count: int) -> list[Any]:
    """``count`` batched calls of ``dm.send`` made in one loop turn: results or exceptions."""
    return await asyncio.gather(
        *(
            executor.call("dm.send", {}, request_id=f"key-{name}-{n}", batched=True)
            for n in range(count)
        ),
        return_exceptions=True,
    )


async def test_calls_of_one_loop_turn_go_out_in_one_request_and_each_gets_its_own_answer():
    cloud = FakeCloud()
    executor, batcher = _executor(httpx.MockTransport(cloud.handler))
    done = await asyncio.gather(
        *(
            executor.call(
                "dm.send",
                {"n": n},
                request_id=f"key-{n:04d}",
                batched=True,
                cost_limit_usd=None,
            )
            for n in range(5)
        )
    )
    assert [d.result for d in done] == [
        {"params": {"n": n}, "key": f"key-{n:04d}"} for n in range(5)
    ]
    assert [path for path, _, _ in cloud.requests] == [BATCH_PATH]
    _, body, headers = cloud.requests[0]
    assert headers["authorization"] == f"Bearer {KEY}"
    assert [item["idempotency_key"] for item in body["items"]] == [f"key-{n:04d}" for n in range(5)]
    assert batcher.requests_sent == 1


async def test_each_line_is_read_as_the_answer_of_a_call_of_its_own_headers_and_body_included():
    # Each call's line carries what its own answer would have: a status, headers (read by
    # name in any case) and a body that need not be an envelope.
    lines = [
        (429, {"retry-after": "120"}, {"ok": False, "error": "rate_limited", "detail": "slow"}),
        (409, {}, {"ok": False, "error": "indeterminate", "detail": "it died mid-handler"}),
        (200, {}, "not an envelope"),
        (404, {}, {"ok": False, "error": "unknown_action", "detail": "no such handler"}),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        body = [
            {"i": i, "status": status, "headers": headers, "body": answer}
            for i, (status, headers, answer) in enumerate(lines)
        ]
        return httpx.Response(200, content="".join(json.dumps(b) + "\n" for b in body).encode())

    executor, _ = _executor(httpx.MockTransport(handler))
    before = datetime.now(UTC)
    limited, indeterminate, junk, unknown = await _together(executor, "lines", len(lines))
    assert isinstance(limited, RateLimited)
    assert timedelta(seconds=110) < limited.not_before - before < timedelta(seconds=130)
    assert isinstance(indeterminate, Indeterminate)
    assert isinstance(junk, CloudUnavailable) and "not an envelope" in junk.detail
    assert isinstance(unknown, UnknownAction) and "no such handler" in unknown.detail


async def test_calls_answered_first_end_before_the_rest_of_the_lines_are_handed_out():
    # 40 answers arrive in one piece; a call answered in the first slice ends, and what it
    # does next reaches the cloud while others still wait for their lines.
    cloud = FakeCloud()
    ended: list[int] = []
    seen_when_next_call_came: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path != BATCH_PATH:
            seen_when_next_call_came.append(len(ended))
        return cloud.handler(request)

    executor, _ = _executor(httpx.MockTransport(handler))

    async def one(n: int) -> None:
        await executor.call("dm.send", {"n": n}, request_id=f"key-s-{n}", batched=True)
        ended.append(n)
        if len(ended) == 1:
            await executor.call("dm.send", {}, request_id="key-next", batched=True)

    await asyncio.gather(*(one(n) for n in range(40)))
    assert len(ended) == 40
    # Handed out all at once, every call would have ended first (40).
    assert seen_when_next_call_came and seen_when_next_call_came[0] < 40 - DELIVER_SLICE


async def test_a_call_alone_in_its_turn_and_an_unbatched_call_go_out_as_calls_of_their_own():
    cloud = FakeCloud()
    executor, _ = _executor(httpx.MockTransport(cloud.handler))
    await executor.call("dm.send", {"n": 1}, request_id="key-alone", batched=True)
    await asyncio.gather(
        executor.call("dm.send", {"n": 2}, request_id="key-two-a"),
        executor.call("dm.send", {"n": 3}, request_id="key-two-b"),
    )
    assert [path for path, _, _ in cloud.requests] == ["/api/services/dm/send"] * 3


async def test_the_cost_limit_travels_with_each_item():
    from decimal import Decimal

    cloud = FakeCloud()
    executor, _ = _executor(httpx.MockTransport(cloud.handler))
    await asyncio.gather(
        executor.call(
            "dm.send", {}, request_id="key-cost-a", batched=True, cost_limit_usd=Decimal("0.0100")
        ),
        executor.call("dm.send", {}, request_id="key-cost-b", batched=True),
    )
    items = cloud.requests[0][1]["items"]
    assert items[0]["cost_limit"] == "0.01" and "cost_limit" not in items[1]


async def test_a_call_whose_line_never_comes_hears_that_it_may_have_run():
    cloud = FakeCloud(drop=1)
    executor, _ = _executor(httpx.MockTransport(cloud.handler))
    outcomes = await _together(executor, "drop", 3)
    assert not isinstance(outcomes[0], Exception) and not isinstance(outcomes[2], Exception)
    assert isinstance(outcomes[1], CloudUnavailable) and outcomes[1].never_ran is False


async def test_a_refused_connection_reaches_every_call_as_never_ran_and_refused():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    executor, _ = _executor(httpx.MockTransport(refuse))
    outcomes = await _together(executor, "ref", 3)
    assert all(isinstance(o, CloudUnavailable) for o in outcomes), outcomes
    assert all(isinstance(o, CloudUnavailable) and o.never_ran for o in outcomes)
    assert len({id(o) for o in outcomes}) == 3  # each call its own exception


async def test_a_cloud_without_api_batch_is_called_one_by_one_from_then_on():
    cloud = FakeCloud(batch_status=404)
    executor, batcher = _executor(httpx.MockTransport(cloud.handler))
    for _ in range(2):
        done = await asyncio.gather(
            *(
                executor.call("dm.send", {"n": n}, request_id=f"key-old-{n}-{_}", batched=True)
                for n in range(3)
            )
        )
        assert [d.result["params"] for d in done] == [{"n": n} for n in range(3)]
    paths = [path for path, _, _ in cloud.requests]
    assert paths == [BATCH_PATH] + ["/api/services/dm/send"] * 6
    assert batcher.supported is False


async def test_a_refused_key_for_the_whole_request_is_each_calls_unauthorized():
    from errors import Unauthorized

    cloud = FakeCloud(batch_status=401)
    executor, _ = _executor(httpx.MockTransport(cloud.handler))
    outcomes = await _together(executor, "401", 2)
    assert all(isinstance(o, Unauthorized) for o in outcomes), outcomes


# -- the cloud's side: POST /api/batch ---------------------------------------------------------


def _lines(answer: httpx.Response) -> dict[int, dict[str, Any]]:
    assert answer.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in answer.text.splitlines() if line]
    return {row["i"]: row for row in rows}


def test_api_batch_runs_each_item_as_its_own_call_would(app_client):
    client = app_client(
        EVERREACH_ENV="cloud", EVERREACH_CLOUD_KEY=KEY, EVERREACH_SERVICES="tests.e2e_services"
    )
    auth = {"Authorization": f"Bearer {KEY}"}
    items = [
        {
            "action": "research.platform",
            "params": {"platform": "x"},
            "idempotency_key": "key-one-0001",
        },
        {
            "action": "research.platform",
            "params": {"platform": "x"},
            "idempotency_key": "key-one-0001",
        },
        {"action": "no.such", "params": {}},
        {"action": "Bad Name"},
        {"action": "research.platform", "idempotency_key": "short"},
        {"action": "research.platform", "params": [1]},
        "not an object",
        {"action": "research.platform", "surprise": 1},
    ]
    answer = client.post("/api/batch", json={"items": items}, headers=auth)
    assert answer.status_code == 200
    lines = _lines(answer)
    assert sorted(lines) == list(range(len(items)))
    first, repeat = lines[0], lines[1]
    assert first["status"] == 200 and first["body"]["result"]["platform"] == "x"
    # The same key twice: one ran, the other waited for it or replayed its answer.
    assert repeat["status"] in (200, 409)
    if repeat["status"] == 200:
        assert repeat["body"]["result"] == first["body"]["result"]
    assert lines[2]["status"] == 404 and lines[2]["body"]["error"] == "unknown_action"
    for index in (3, 4, 5, 6, 7):
        assert lines[index]["status"] == 422, lines[index]
        assert lines[index]["body"]["ok"] is False and lines[index]["body"]["detail"]
    again = client.post("/api/batch", json={"items": items[:1]}, headers=auth)
    assert _lines(again)[0]["headers"] == {"idempotent-replayed": "true"}


def test_api_batch_needs_the_cloud_key_and_a_list_of_items(app_client):
    client = app_client(EVERREACH_ENV="cloud", EVERREACH_CLOUD_KEY=KEY)
    assert client.post("/api/batch", json={"items": []}).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    refused = client.post("/api/batch", json={"items": {"a": 1}}, headers=auth)
    assert refused.status_code == 422 and refused.json()["error"] == "invalid_params"


def test_api_batch_refuses_an_item_priced_over_its_cost_limit(app_client):
    client = app_client(
        EVERREACH_ENV="cloud", EVERREACH_CLOUD_KEY=KEY, EVERREACH_SERVICES="tests.e2e_services"
    )
    auth = {"Authorization": f"Bearer {KEY}"}
    items = [{"action": "claude.complete", "params": {}, "cost_limit": "0.000001"}]
    line = _lines(client.post("/api/batch", json={"items": items}, headers=auth))[0]
    assert line["status"] == 402 and line["body"]["error"] == "cost_limit_exceeded"


# -- end to end --------------------------------------------------------------------------------


def _executions(log: Path) -> Counter[str]:
    if not log.exists():
        return Counter()
    return Counter(json.loads(line)["id"] for line in log.read_text().splitlines() if line)


def _running_keys(cloud) -> int:
    """How many keys the cloud has claimed and not finished (its DMs held mid-handler)."""
    path = Path(cloud.env["DATA_DIR"]) / "hybrid.sqlite3"
    if not path.exists():
        return 0
    with sqlite3.connect(path, timeout=5) as conn:
        try:
            row = conn.execute(
                "SELECT COUNT(*) FROM hybrid_idempotency WHERE state = 'running'"
            ).fetchone()
        except sqlite3.OperationalError:  # the table is not there yet
            return 0
    return int(row[0])


def _done_keys(cloud) -> int:
    """How many keys the cloud has run to their end and recorded the answer of."""
    path = Path(cloud.env["DATA_DIR"]) / "hybrid.sqlite3"
    with sqlite3.connect(path, timeout=5) as conn:
        row = conn.execute("SELECT COUNT(*) FROM hybrid_idempotency WHERE state = 'done'")
        return int(row.fetchone()[0])


def _pair_through_proxy(server_factory, plan=()):
    cloud = server_factory(name="cloud", EVERREACH_ENV="cloud", EVERREACH_CLOUD_KEY=KEY)
    proxy = FaultProxy(cloud.url, free_port(), plan).start()
    term = server_factory(
        name="terminal",
        EVERREACH_ENV="hybrid",
        CLOUD_ENDPOINT=proxy.url,
        EVERREACH_CLOUD_KEY=KEY,
        EVERREACH_SERVICES="tests.e2e_terminal_services",
        CLOUD_BACKOFF_SEC="0.05",
        CONNECTIVITY_INTERVAL_SEC="0.3",
    )
    wait_until_it_sees_its_cloud(term)
    return cloud, proxy, term


def _dm_batch(log: Path, count: int, **params: Any) -> list[dict[str, Any]]:
    return [
        {"action": "dm.send", "params": {"to": "x", "id": f"m{n:03d}", "log": str(log), **params}}
        for n in range(count)
    ]


@pytest.mark.e2e
def test_a_batch_of_dms_goes_to_the_cloud_in_few_requests_each_dm_once_in_order(
    server_factory, tmp_path
):
    _, proxy, term = _pair_through_proxy(server_factory)
    try:
        log = tmp_path / "dm.log"
        items = _dm_batch(log, 30, sleep_s=0.05)
        answer = httpx.post(
            f"{term.url}/batch", json={"items": items, "max_concurrent": 30}, timeout=60
        )
        body = answer.json()
        assert answer.status_code == 200, body
        assert [r["result"]["id"] for r in body["results"]] == [f"m{n:03d}" for n in range(30)]
        assert {r["source"] for r in body["results"]} == {"cloud"}
        assert len({r["request_id"] for r in body["results"]}) == 30  # a key each
        assert _executions(log) == Counter({f"m{n:03d}": 1 for n in range(30)})
        batches = [path for path, _ in proxy.seen if path == "api/batch"]
        singles = [path for path, _ in proxy.seen if path.startswith("api/services")]
        assert batches and len(batches) + len(singles) < 30, proxy.seen
    finally:
        proxy.stop()


@pytest.mark.e2e
def test_a_caller_gone_mid_answer_leaves_every_item_of_its_request_run_once_and_recorded(
    server_factory, tmp_path
):
    cloud = server_factory(name="cloud", EVERREACH_ENV="cloud", EVERREACH_CLOUD_KEY=KEY)
    log = tmp_path / "dm.log"
    fast = {"action": "dm.send", "params": {"to": "x", "id": "m000", "log": str(log)}}
    slow = [
        {
            "action": "dm.send",
            "params": {"to": "x", "id": f"m{n:03d}", "log": str(log), "sleep_s": 0.5},
        }
        for n in range(1, 6)
    ]
    items = [
        {**item, "idempotency_key": f"gone-key-{n:04d}"} for n, item in enumerate([fast, *slow])
    ]
    auth = {"Authorization": f"Bearer {KEY}"}
    with (
        httpx.Client(base_url=cloud.url, headers=auth, timeout=30) as client,
        client.stream("POST", "/api/batch", json={"items": items}) as answer,
    ):
        first = next(answer.iter_lines())
        assert json.loads(first)["i"] == 0
    # The connection is closed while five DMs still run: each ends and records its answer.
    from tests.test_e2e_offline import wait_for

    wait_for(lambda: _done_keys(cloud) == len(items), what="every key's answer recorded")
    with httpx.Client(base_url=cloud.url, headers=auth, timeout=30) as client:
        lines = _lines(client.post("/api/batch", json={"items": items}))
    assert all(line["headers"].get("idempotent-replayed") == "true" for line in lines.values())
    assert _executions(log) == Counter({f"m{n:03d}": 1 for n in range(6)})


@pytest.mark.e2e
def test_an_answer_lost_after_the_cloud_ran_the_group_is_retried_and_runs_nothing_twice(
    server_factory, tmp_path
):
    _, proxy, term = _pair_through_proxy(server_factory, plan=["500_after"])
    try:
        log = tmp_path / "dm.log"
        items = _dm_batch(log, 10)
        answer = httpx.post(
            f"{term.url}/batch", json={"items": items, "max_concurrent": 10}, timeout=60
        )
        body = answer.json()
        assert answer.status_code == 200, body
        assert all(r["ok"] and r["source"] == "cloud" for r in body["results"]), body
        assert next(f for p, f in proxy.seen if p == "api/batch") == "500_after"
        assert _executions(log) == Counter({f"m{n:03d}": 1 for n in range(10)})
    finally:
        proxy.stop()


@pytest.mark.e2e
def test_a_cloud_killed_while_a_group_runs_leaves_each_dm_delivered_or_parked_none_twice(
    server_factory, tmp_path
):
    from tests.test_e2e_offline import _outbox_items, start_cloud, start_pair, wait_for

    port = free_port()
    cloud, term = start_pair(server_factory, port)
    log = tmp_path / "dm.log"
    gate = tmp_path / "hold"  # handlers wait while it exists (at most 30 s)
    gate.touch()
    items = _dm_batch(log, 40, sleep_s=30, sleep_while=str(gate))
    answers: list[httpx.Response] = []
    sender = threading.Thread(
        target=lambda: answers.append(
            httpx.post(
                f"{term.url}/batch", json={"items": items, "max_concurrent": 20}, timeout=120
            )
        )
    )
    sender.start()
    wait_for(lambda: _running_keys(cloud) >= 20, what="20 DMs claimed in the cloud")
    cloud.kill(signal.SIGKILL)  # mid-handler: each of the group's DMs is held by the gate
    gate.unlink()
    start_cloud(server_factory, port)
    sender.join(timeout=120)
    body = answers[0].json()
    assert answers[0].status_code == 200, body
    outcomes = Counter(
        "ok" if r["ok"] else "queued" if r.get("queued") else r["error"] for r in body["results"]
    )
    assert set(outcomes) <= {"ok", "queued"}, outcomes  # every DM acknowledged

    def settled() -> bool:
        left = _outbox_items(term)
        return not [s for _, s in left if s == "pending"]

    wait_for(settled, what="the outbox replayed", timeout_s=60)
    ran = _executions(log)
    parked = {dm for dm, status in _outbox_items(term) if status == "indeterminate"}
    assert not ran or max(ran.values()) == 1, ran  # none twice
    assert {f"m{n:03d}" for n in range(40)} <= set(ran) | parked


async def test_a_failed_shared_request_counts_once_against_the_breaker():
    cloud = FakeCloud(batch_status=503)
    executor, _ = _executor(httpx.MockTransport(cloud.handler))
    outcomes = await _together(executor, "503", 8)
    assert all(isinstance(o, CloudUnavailable) and not o.never_ran for o in outcomes), outcomes
    assert executor.breaker.failures == 1  # one request failed, not eight


async def test_a_dropped_shared_request_counts_once_against_the_breaker():
    def drop(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection reset", request=request)

    executor, _ = _executor(httpx.MockTransport(drop))
    outcomes = await _together(executor, "rst", 8)
    assert all(isinstance(o, CloudUnavailable) and not o.never_ran for o in outcomes), outcomes
    assert executor.breaker.failures == 1
