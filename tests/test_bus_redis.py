"""bus_redis: the bus on real Redis Streams — at-least-once, retries, claims, parking."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from bus_redis import DEAD_SUFFIX, STREAM_PREFIX, RedisStreamsBackend, stream_key
from bus_store import BacklogRow
from bus_subscription import Handler, Subscription
from redis_client import open_redis, redis_down
from tests.conftest import free_port

pytestmark = pytest.mark.redis

TOPIC = "orders"
MAX = 3


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Any]:
    redis = open_redis(redis_url)
    yield redis
    await redis.aclose()


def backend(client: Any, name: str = "c1", **over: Any) -> RedisStreamsBackend:
    settings: dict[str, Any] = {
        "consumer_name": name,
        "max_deliveries": MAX,
        "stream_maxlen": 10_000,
        "retry_delay_s": 0.02,
        "claim_idle_s": 30.0,
        "block_s": 0.02,
    }
    settings.update(over)
    return RedisStreamsBackend(client, **settings)


def subscription(handler: Handler, group: str = "g1", topic: str = TOPIC) -> Subscription:
    return Subscription(
        topic=topic,
        group=group,
        durable=True,
        handler=handler,
        stream=stream_key(topic),
        max_deliveries=MAX,
    )


class Recorder:
    """A handler that records payloads and fails the first ``fail`` calls (or all: -1)."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, payload: dict[str, Any]) -> None:
        self.calls.append(payload)
        if self.fail < 0 or len(self.calls) <= self.fail:
            raise RuntimeError(f"boom {len(self.calls)}")


async def pump(
    steps: list[tuple[RedisStreamsBackend, Subscription]],
    done: Callable[[], Awaitable[bool] | bool],
    *,
    what: str,
) -> None:
    """Run consuming steps until ``done()``; the limit only stops a hung test."""
    deadline = time.monotonic() + 15
    while True:
        result = done()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for: {what}")
        for back, sub in steps:
            await back.step(sub)


async def pending(client: Any, group: str = "g1") -> int:
    return int((await client.xpending(stream_key(TOPIC), group))["pending"])


def test_stream_key() -> None:
    assert stream_key("orders") == f"{STREAM_PREFIX}orders" == "everreach:bus:orders"


async def test_published_message_is_delivered_once_and_acked(client: Any) -> None:
    back, rec = backend(client), Recorder()
    sub = subscription(rec)
    await back.ensure_group(sub)
    entry_id = await back.publish(TOPIC, json.dumps({"n": 1}))
    [(stored_id, fields)] = await client.xrange(stream_key(TOPIC))
    assert stored_id == entry_id
    assert fields == {"payload": '{"n": 1}', "origin": "c1"}
    await pump([(back, sub)], lambda: sub.delivered == 1, what="the delivery")
    for _ in range(3):
        await back.step(sub)
    assert rec.calls == [{"n": 1}]
    assert await pending(client) == 0
    assert sub.view()["delivered"] == 1 and sub.failures == 0


async def test_every_group_gets_every_message(client: Any) -> None:
    back = backend(client)
    rec_a, rec_b = Recorder(), Recorder()
    a, b = subscription(rec_a, "a"), subscription(rec_b, "b")
    await back.ensure_group(a)
    await back.ensure_group(b)
    for n in range(5):
        await back.publish(TOPIC, json.dumps({"n": n}))
    await pump([(back, a), (back, b)], lambda: a.delivered == b.delivered == 5, what="both")
    assert rec_a.calls == rec_b.calls == [{"n": n} for n in range(5)]


async def test_consumers_of_one_group_share_the_messages(client: Any) -> None:
    rec_1, rec_2 = Recorder(), Recorder()
    b1, b2 = backend(client, "c1"), backend(client, "c2")
    s1, s2 = subscription(rec_1), subscription(rec_2)
    await b1.ensure_group(s1)
    for n in range(20):
        await b1.publish(TOPIC, json.dumps({"n": n}))
    await pump([(b1, s1), (b2, s2)], lambda: s1.delivered + s2.delivered == 20, what="all 20")
    assert sorted(c["n"] for c in rec_1.calls + rec_2.calls) == list(range(20))


async def test_a_failed_message_is_retried_and_then_acked(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    back, rec = backend(client), Recorder(fail=1)
    sub = subscription(rec)
    await back.ensure_group(sub)
    await back.publish(TOPIC, json.dumps({"n": 1}))
    await pump([(back, sub)], lambda: sub.delivered == 1, what="the retry to succeed")
    assert rec.calls == [{"n": 1}, {"n": 1}]
    assert (sub.failures, sub.parked) == (1, 0)
    assert sub.errors == {}  # the error of a message that went through is forgotten
    assert await pending(client) == 0
    assert any("attempt 1/3: RuntimeError: boom 1" in r.getMessage() for r in caplog.records)


async def test_a_message_that_keeps_failing_is_parked_after_max_deliveries(client: Any) -> None:
    back, rec = backend(client), Recorder(fail=-1)
    sub = subscription(rec)
    await back.ensure_group(sub)
    entry_id = await back.publish(TOPIC, json.dumps({"n": 1}))
    await pump([(back, sub)], lambda: sub.parked == 1, what="the message to be parked")
    for _ in range(3):
        await back.step(sub)
    assert len(rec.calls) == MAX
    assert await pending(client) == 0
    [(_dead_id, dead)] = await client.xrange(stream_key(TOPIC) + DEAD_SUFFIX)
    assert dead["payload"] == '{"n": 1}'
    assert (dead["topic"], dead["group"], dead["original_id"]) == (TOPIC, "g1", entry_id)
    assert dead["attempts"] == str(MAX)
    assert dead["error"] == "RuntimeError: boom 3"
    assert dead["parked_at"].endswith("+00:00")
    assert (await back.group_info(sub))["dead"] == 1


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"payload": "{not json"}, "undecodable: JSONDecodeError"),
        ({"payload": "[1, 2]"}, "undecodable: TypeError: payload is not a JSON object"),
        ({"other": "x"}, "undecodable: KeyError: 'payload'"),
    ],
)
async def test_an_undecodable_message_is_parked_at_once_without_running(
    client: Any, fields: dict[str, str], reason: str
) -> None:
    back, rec = backend(client), Recorder()
    sub = subscription(rec)
    await back.ensure_group(sub)
    await client.xadd(stream_key(TOPIC), fields)
    await pump([(back, sub)], lambda: sub.parked == 1, what="the parking")
    assert rec.calls == []
    [(_id, dead)] = await client.xrange(stream_key(TOPIC) + DEAD_SUFFIX)
    assert dead["error"].startswith(reason)
    assert dead["attempts"] == "1"
    assert await pending(client) == 0


async def _taken_by_dead_consumer(client: Any, back: RedisStreamsBackend, sub: Subscription) -> str:
    """Publish one message and read it as consumer ``dead``, which never acks it."""
    await back.ensure_group(sub)
    entry_id = await back.publish(TOPIC, json.dumps({"n": 1}))
    reply = await client.xreadgroup("g1", "dead", {stream_key(TOPIC): ">"}, count=10)
    assert reply[0][1][0][0] == entry_id
    return entry_id


async def test_a_live_member_claims_a_dead_consumers_message_after_claim_idle(
    client: Any,
) -> None:
    rec = Recorder()
    back = backend(client, "live", claim_idle_s=0.05)
    sub = subscription(rec)
    await _taken_by_dead_consumer(client, back, sub)
    await pump([(back, sub)], lambda: sub.delivered == 1, what="the claim")
    assert rec.calls == [{"n": 1}]
    assert await pending(client) == 0


async def test_a_dead_consumers_message_is_not_claimed_before_claim_idle(client: Any) -> None:
    rec = Recorder()
    back = backend(client, "live", claim_idle_s=3600)
    sub = subscription(rec)
    await _taken_by_dead_consumer(client, back, sub)
    for _ in range(5):
        await back.step(sub)
    assert rec.calls == []
    assert await pending(client) == 1


async def test_a_restarted_process_with_the_same_name_takes_its_messages_back_at_once(
    client: Any,
) -> None:
    rec = Recorder()
    back = backend(client, "dead", retry_delay_s=3600, claim_idle_s=3600)
    sub = subscription(rec)  # a new subscription: its first sweep takes our own at once
    await _taken_by_dead_consumer(client, back, sub)
    await back.step(sub)
    assert rec.calls == [{"n": 1}]
    assert await pending(client) == 0


async def test_a_claimed_message_that_used_up_its_deliveries_is_parked_unrun(
    client: Any,
) -> None:
    rec = Recorder()
    back = backend(client, "live", claim_idle_s=0.0)
    sub = subscription(rec)
    entry_id = await _taken_by_dead_consumer(client, back, sub)
    for _ in range(MAX - 1):  # the dead consumer's process died with it MAX times in all
        await client.xclaim(stream_key(TOPIC), "g1", "dead", 0, [entry_id])
    await pump([(back, sub)], lambda: sub.parked == 1, what="the parking")
    assert rec.calls == []
    [(_id, dead)] = await client.xrange(stream_key(TOPIC) + DEAD_SUFFIX)
    assert dead["attempts"] == str(MAX)
    assert dead["error"] == "handler failed (or its process died) earlier"


async def test_forwarded_backlog_skips_groups_that_handled_it_and_counts_attempts(
    client: Any,
) -> None:
    back = backend(client)
    rec_done, rec_tried = Recorder(), Recorder(fail=-1)
    done, tried = subscription(rec_done, "done"), subscription(rec_tried, "tried")
    await back.ensure_group(done)
    await back.ensure_group(tried)
    await back.forward(
        [
            BacklogRow(1, TOPIC, '{"n": 1}', handled=("done",), attempts={"tried": MAX - 1}),
            BacklogRow(2, TOPIC, '{"n": 2}'),
        ]
    )
    entries = await client.xrange(stream_key(TOPIC))
    assert [f["payload"] for _id, f in entries] == ['{"n": 1}', '{"n": 2}']  # in order
    assert json.loads(entries[0][1]["handled"]) == ["done"]
    assert "handled" not in entries[1][1] and "attempts" not in entries[1][1]
    await pump([(back, done)], lambda: done.delivered == 1, what="the second row")
    assert rec_done.calls == [{"n": 2}]  # the first was handled here during the outage
    await pump([(back, tried)], lambda: tried.parked == 2, what="both rows parked")
    # Row 1 had MAX-1 failed attempts before the outage ended: one more, and it is parked.
    assert rec_tried.calls.count({"n": 1}) == 1
    assert rec_tried.calls.count({"n": 2}) == MAX
    assert await pending(client, "done") == 0 and await pending(client, "tried") == 0


async def test_group_info_reports_pending_lag_and_dead(client: Any) -> None:
    back = backend(client, "c1")
    sub = subscription(Recorder())
    await back.ensure_group(sub)
    for n in range(3):
        await back.publish(TOPIC, json.dumps({"n": n}))
    await client.xreadgroup("g1", "other", {stream_key(TOPIC): ">"}, count=1)
    info = await back.group_info(sub)
    assert info == {"pending": 1, "lag": 2, "dead": 0}


async def test_ensure_group_twice_is_fine_and_destroy_group_removes_it(client: Any) -> None:
    back = backend(client)
    sub = subscription(Recorder())
    await back.ensure_group(sub)
    await back.ensure_group(sub)  # BUSYGROUP is not an error
    assert sub.group_ready
    assert [g["name"] for g in await client.xinfo_groups(stream_key(TOPIC))] == ["g1"]
    await back.destroy_group(sub)
    assert await client.xinfo_groups(stream_key(TOPIC)) == []


async def test_ensure_group_raises_other_refusals(client: Any) -> None:
    from redis.exceptions import ResponseError

    await client.set(stream_key(TOPIC), "not a stream")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await backend(client).ensure_group(subscription(Recorder()))


async def test_streams_are_trimmed_to_about_maxlen(client: Any) -> None:
    back = backend(client, stream_maxlen=10)
    for n in range(600):
        await back.publish(TOPIC, json.dumps({"n": n}))
    length = await client.xlen(stream_key(TOPIC))
    assert 10 <= length < 600


async def test_a_redis_that_is_down_raises_to_the_caller() -> None:
    dead = open_redis(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.5)
    try:
        back = backend(dead)
        with pytest.raises(redis_down()):
            await back.publish(TOPIC, "{}")
        with pytest.raises(redis_down()):
            await back.step(subscription(Recorder()))
    finally:
        await dead.aclose()
