"""SyncBus on real Redis (the shared test database, or a throwaway redis-server this test may
kill) and on real SQLite files under tmp_path."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from config.hybrid_config import HybridConfig, redact_url
from sync_bus import DEAD_SUFFIX, SyncBus, stream_key
from tests.conftest import ROOT, free_port, service_missing, until

pytestmark = pytest.mark.prd200

FAST: dict[str, Any] = {"poll_interval_s": 0.02, "retry_delay_s": 0.02, "block_s": 0.2}


class Collector:
    """A handler that records the ``n`` of every payload it is given."""

    def __init__(self, fail_on: set[int] | None = None) -> None:
        self.seen: list[int] = []
        self.calls: list[int] = []
        self.fail_on = fail_on or set()

    async def __call__(self, payload: dict[str, Any]) -> None:
        self.calls.append(payload["n"])
        if payload["n"] in self.fail_on:
            raise RuntimeError(f"cannot handle {payload['n']}")
        self.seen.append(payload["n"])


@pytest.fixture
async def make_bus(tmp_path: Path) -> AsyncIterator[Callable[..., SyncBus]]:
    """Build buses (default: SQLite only, fast polling); all are closed at the end."""
    buses: list[SyncBus] = []

    def make(**kwargs: Any) -> SyncBus:
        options: dict[str, Any] = {
            "redis_url": None,
            "sqlite_path": tmp_path / "bus.sqlite3",
            "consumer_name": f"c{len(buses)}",
            **FAST,
        }
        options.update(kwargs)
        bus = SyncBus(**options)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close()


def topic() -> str:
    return f"t.{uuid.uuid4().hex[:8]}"


async def publish_range(bus: SyncBus, name: str, numbers: range) -> list[str]:
    return [await bus.publish(name, {"n": n}) for n in numbers]


# -- SQLite --------------------------------------------------------------------------------------


async def test_sqlite_publish_reaches_subscriber_in_order(make_bus: Callable[..., SyncBus]) -> None:
    bus = make_bus()
    got = Collector()
    name = topic()
    bus.subscribe(name, got)
    await bus.start()
    ids = await publish_range(bus, name, range(20))
    await until(lambda: len(got.seen) == 20, what="20 messages")
    assert got.seen == list(range(20))
    assert bus.backend == "sqlite"
    assert all(i.startswith("sqlite:") for i in ids)


async def test_sqlite_groups_sharing_a_file_each_get_every_message(
    make_bus: Callable[..., SyncBus],
) -> None:
    name = topic()
    first, second = Collector(), Collector()
    a, b = make_bus(), make_bus()
    a.subscribe(name, first, group="audit")
    b.subscribe(name, second, group="status")
    await a.start()
    await b.start()
    await publish_range(a, name, range(10))
    await until(lambda: len(first.seen) == 10 and len(second.seen) == 10, what="both groups")
    assert first.seen == second.seen == list(range(10))


async def test_sqlite_durable_group_resumes_after_restart(
    make_bus: Callable[..., SyncBus],
) -> None:
    name = topic()
    publisher = make_bus(consumer_name="pub")
    await publisher.start()
    old = make_bus(consumer_name="sub")
    old.subscribe(name, Collector(), group="g")
    await old.start()
    await old.close()
    await publish_range(publisher, name, range(5))  # nobody of group g is listening now
    got = Collector()
    new = make_bus(consumer_name="sub")
    new.subscribe(name, got, group="g")
    await new.start()
    await until(lambda: len(got.seen) == 5, what="backlog of group g")
    assert got.seen == list(range(5))


async def test_sqlite_failing_handler_is_retried_then_parked(
    make_bus: Callable[..., SyncBus],
) -> None:
    name = topic()
    bus = make_bus(max_deliveries=3)
    got = Collector(fail_on={1})
    bus.subscribe(name, got, group="g")
    await bus.start()
    await publish_range(bus, name, range(3))
    await until(lambda: got.seen == [0, 2], what="messages after the poison one")
    stats = await bus.stats()
    assert got.calls.count(1) == 3
    assert stats["parked"] == 1
    assert stats["failures"] == 3
    assert stats["recent_parked"][0]["error"].startswith("RuntimeError: cannot handle 1")


# -- Redis (shared test database) ----------------------------------------------------------------


@pytest.mark.redis
async def test_redis_publish_reaches_subscriber_in_order(
    make_bus: Callable[..., SyncBus], redis_url: str
) -> None:
    bus = make_bus(redis_url=redis_url)
    got = Collector()
    name = topic()
    bus.subscribe(name, got, group="g")
    await bus.start()
    ids = await publish_range(bus, name, range(50))
    await until(lambda: len(got.seen) == 50, what="50 messages")
    assert got.seen == list(range(50))
    assert bus.backend == "redis"
    assert all("-" in i and not i.startswith("sqlite:") for i in ids)
    stats = await bus.stats()
    assert stats["subscriptions"][0]["pending"] == 0
    assert stats["backlog"] == 0


@pytest.mark.redis
async def test_redis_subscribers_without_group_each_get_every_message(
    make_bus: Callable[..., SyncBus], redis_url: str
) -> None:
    name = topic()
    first, second = Collector(), Collector()
    a = make_bus(redis_url=redis_url)
    b = make_bus(redis_url=redis_url, consumer_name="other")
    a.subscribe(name, first)
    b.subscribe(name, second)
    await a.start()
    await b.start()
    await publish_range(a, name, range(10))
    await until(lambda: len(first.seen) == 10 and len(second.seen) == 10, what="fan-out")
    assert first.seen == second.seen == list(range(10))
    await a.close()
    groups = redis.Redis.from_url(redis_url).xinfo_groups(stream_key(name))
    assert len(groups) == 1  # a's throwaway group is gone, b's remains


@pytest.mark.redis
async def test_redis_group_gets_what_was_published_while_it_was_away(
    make_bus: Callable[..., SyncBus], redis_url: str
) -> None:
    name = topic()
    publisher = make_bus(redis_url=redis_url, consumer_name="pub")
    await publisher.start()
    old = make_bus(redis_url=redis_url, consumer_name="sub")
    old.subscribe(name, Collector(), group="g")
    await old.start()
    await old.close()
    await publish_range(publisher, name, range(7))
    got = Collector()
    new = make_bus(redis_url=redis_url, consumer_name="sub")
    new.subscribe(name, got, group="g")
    await new.start()
    await until(lambda: len(got.seen) == 7, what="messages published while away")
    assert got.seen == list(range(7))


@pytest.mark.parametrize("same_consumer_name", [True, False])
@pytest.mark.redis
async def test_redis_unacknowledged_message_goes_to_the_restarted_subscriber(
    make_bus: Callable[..., SyncBus], redis_url: str, same_consumer_name: bool
) -> None:
    name = topic()
    started = asyncio.Event()

    async def hang(payload: dict[str, Any]) -> None:
        started.set()
        await asyncio.Event().wait()  # never finishes: the message stays unacknowledged

    old = make_bus(redis_url=redis_url, consumer_name="sub-1")
    old.subscribe(name, hang, group="g")
    await old.start()
    await old.publish(name, {"n": 1})
    await asyncio.wait_for(started.wait(), timeout=10)
    await old.close()  # like a crash: the handler never returned, nothing was acknowledged

    got = Collector()
    new = make_bus(
        redis_url=redis_url,
        consumer_name="sub-1" if same_consumer_name else "sub-2",
        claim_idle_s=0.05,
    )
    new.subscribe(name, got, group="g")
    await new.start()
    await until(lambda: got.seen == [1], what="the unacknowledged message")


@pytest.mark.redis
async def test_redis_failing_handler_is_retried_then_parked_in_dead_stream(
    make_bus: Callable[..., SyncBus], redis_url: str
) -> None:
    name = topic()
    bus = make_bus(redis_url=redis_url, max_deliveries=3)
    got = Collector(fail_on={1})
    bus.subscribe(name, got, group="g")
    await bus.start()
    await publish_range(bus, name, range(3))
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    await until(lambda: client.xlen(stream_key(name) + DEAD_SUFFIX) == 1, what="parked message")
    assert got.seen == [0, 2]
    assert got.calls.count(1) == 3
    parked: Any = client.xrange(stream_key(name) + DEAD_SUFFIX)
    [(_id, dead)] = parked
    assert dead["group"] == "g" and dead["attempts"] == "3"
    assert "cannot handle 1" in dead["error"]
    stats = await bus.stats()
    assert stats["parked"] == 1 and stats["subscriptions"][0]["pending"] == 0


async def test_unreachable_redis_at_start_falls_back_to_sqlite(
    make_bus: Callable[..., SyncBus],
) -> None:
    bus = make_bus(redis_url=f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.5)
    got = Collector()
    name = topic()
    bus.subscribe(name, got, group="g")
    await bus.start()
    assert bus.backend == "sqlite"
    await publish_range(bus, name, range(3))
    await until(lambda: len(got.seen) == 3, what="delivery from SQLite")
    stats = await bus.stats()
    assert stats["redis_connected"] is False
    assert stats["backlog"] == 3  # kept for forwarding once Redis answers
    assert got.seen == [0, 1, 2]


# -- Redis stopped and started again (a throwaway server only this test uses) --------------------


class ThrowawayRedis:
    def __init__(self, workdir: Path, *, persistent: bool) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.persistent = persistent
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else []
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                *aof,
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def throwaway_redis(tmp_path: Path) -> Iterator[Callable[..., ThrowawayRedis]]:
    if shutil.which("redis-server") is None:
        service_missing("redis-server (to start a throwaway Redis)")
    servers: list[ThrowawayRedis] = []

    def make(*, persistent: bool) -> ThrowawayRedis:
        server = ThrowawayRedis(tmp_path, persistent=persistent)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.mark.parametrize("persistent", [True, False], ids=["aof", "empty-restart"])
@pytest.mark.redis
async def test_redis_outage_falls_back_to_sqlite_and_forwards_backlog_in_order(
    make_bus: Callable[..., SyncBus],
    throwaway_redis: Callable[..., ThrowawayRedis],
    tmp_path: Path,
    persistent: bool,
) -> None:
    server = throwaway_redis(persistent=persistent)
    name = topic()
    local, remote = Collector(), Collector()
    bus = make_bus(redis_url=server.url, consumer_name="terminal", socket_timeout_s=0.5)
    other = make_bus(
        redis_url=server.url,
        sqlite_path=tmp_path / "other.sqlite3",
        consumer_name="elsewhere",
        socket_timeout_s=0.5,
    )
    bus.subscribe(name, local, group="local")
    other.subscribe(name, remote, group="remote")
    await bus.start()
    await other.start()

    await publish_range(bus, name, range(10))
    await until(lambda: len(local.seen) == 10 and len(remote.seen) == 10, what="before outage")
    server.kill()
    outage_ids = await publish_range(bus, name, range(10, 30))
    assert bus.backend == "sqlite"
    assert all(i.startswith("sqlite:") for i in outage_ids)
    await until(lambda: len(local.seen) == 30, what="local delivery from SQLite during outage")
    assert len(remote.seen) == 10  # the other instance cannot see this machine's SQLite

    server.start()
    await until(lambda: bus.backend == "redis", what="switch back to Redis")
    if not persistent:
        # An empty Redis forgot the other instance's group; once it has made it again,
        # it gets what is published from then on (run Redis with AOF to lose nothing).
        await until(lambda: other.backend == "redis", what="other instance back on Redis")
        await until(
            lambda: len(redis.Redis(port=server.port).xinfo_groups(stream_key(name))) == 2,
            what="remote group recreated",
        )
    await publish_range(bus, name, range(30, 40))
    await until(lambda: len(local.seen) == 40, what="local after outage")
    stats = await bus.stats()
    assert local.seen == list(range(40))  # each exactly once, in order
    assert stats["backlog"] == 0 and stats["switches"] == 2
    if persistent:
        await until(lambda: len(remote.seen) == 40, what="remote gets the forwarded backlog")
        assert remote.seen == list(range(40))
    else:
        await until(lambda: remote.seen[-10:] == list(range(30, 40)), what="remote after restart")
        assert remote.seen == sorted(set(remote.seen))
    entries: Any = redis.Redis(port=server.port, decode_responses=True).xrange(stream_key(name))
    forwarded = [e for _id, e in entries if "handled" in e]
    assert len(forwarded) == 20 and all('"local"' in e["handled"] for e in forwarded)


# -- a subscriber in another process, killed mid-stream ------------------------------------------

SUBSCRIBER = """
import asyncio, os, sys
from pathlib import Path
from sync_bus import SyncBus

async def main() -> None:
    url, db, topic, out = sys.argv[1:5]
    bus = SyncBus(redis_url=url, sqlite_path=Path(db), consumer_name="worker-1",
                  poll_interval_s=0.05, retry_delay_s=0.05, block_s=0.2)

    async def handle(payload: dict) -> None:
        with open(out, "a") as fh:
            fh.write(f"{payload['n']}\\n")
            fh.flush()
            os.fsync(fh.fileno())
        await asyncio.sleep(0.005)

    bus.subscribe(topic, handle, group="workers")
    await bus.start()
    Path(out + ".ready").touch()
    await asyncio.Event().wait()

asyncio.run(main())
"""


def lines(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.mark.process
@pytest.mark.redis
async def test_subscriber_process_killed_mid_stream_gets_what_it_had_not_acknowledged(
    make_bus: Callable[..., SyncBus], redis_url: str, tmp_path: Path
) -> None:
    name = topic()
    out = tmp_path / "handled.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def spawn() -> subprocess.Popen[bytes]:
        Path(f"{out}.ready").unlink(missing_ok=True)
        args = [redis_url, str(tmp_path / "worker.sqlite3"), name, str(out)]
        return subprocess.Popen([sys.executable, "-c", SUBSCRIBER, *args], env=env, cwd=ROOT)

    async def ready(proc: subprocess.Popen[bytes]) -> None:
        await until(lambda: Path(f"{out}.ready").exists() or proc.poll() is not None, what="up")
        assert proc.poll() is None, "subscriber process died at start-up"

    proc = spawn()
    try:
        await ready(proc)
        publisher = make_bus(redis_url=redis_url, consumer_name="publisher")
        await publisher.start()
        await publish_range(publisher, name, range(300))
        await until(lambda: len(lines(out)) >= 40, what="subscriber mid-stream")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        before = lines(out)
        assert len(before) < 300, "the subscriber finished before it was killed"
        proc = spawn()
        await ready(proc)
        await until(lambda: set(lines(out)) == set(range(300)), what="all 300 after restart")
    finally:
        proc.kill()
        proc.wait(timeout=10)
    handled = lines(out)
    duplicates = len(handled) - len(set(handled))
    assert duplicates <= 1  # at most the one in flight when it was killed
    if duplicates:
        assert handled.count(before[-1]) == 2


# -- the small things ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@cache:6379/0", "redis://***@cache:6379/0"),
        ("redis://user:s3cret@cache/2", "redis://***@cache/2"),
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        (None, None),
    ],
)
def test_redis_url_is_shown_without_password(url: str | None, shown: str | None) -> None:
    assert redact_url(url) == shown


async def test_stats_never_show_the_redis_password(make_bus: Callable[..., SyncBus]) -> None:
    bus = make_bus(redis_url=f"redis://:hunter2@127.0.0.1:{free_port()}/0", socket_timeout_s=0.3)
    await bus.start()
    stats = await bus.stats()
    assert "hunter2" not in repr(stats) and stats["backend"] == "sqlite"


def test_from_config_puts_sqlite_under_data_dir(tmp_path: Path) -> None:
    config = HybridConfig.from_mapping({"DATA_DIR": str(tmp_path), "BUS_POLL_INTERVAL_SEC": 2})
    bus = SyncBus.from_config(config, consumer_name="x")
    assert bus.sqlite_path == tmp_path / "bus.sqlite3"
    assert bus.poll_interval_s == 2 and bus.redis_url is None and bus.backend == "sqlite"


@pytest.mark.parametrize(
    ("topic_name", "payload", "error"),
    [("", {}, ValueError), ("has space", {}, ValueError), ("ok.topic", ["x"], TypeError)],
)
async def test_publish_rejects_bad_topic_or_payload(
    make_bus: Callable[..., SyncBus], topic_name: str, payload: Any, error: type[Exception]
) -> None:
    bus = make_bus()
    await bus.start()
    with pytest.raises(error):
        await bus.publish(topic_name, payload)


async def test_publish_before_start_is_an_error(make_bus: Callable[..., SyncBus]) -> None:
    with pytest.raises(RuntimeError, match="started"):
        await make_bus().publish("a.b", {})


async def test_same_group_twice_on_one_topic_is_an_error(make_bus: Callable[..., SyncBus]) -> None:
    bus = make_bus()
    bus.subscribe("a.b", Collector(), group="g")
    with pytest.raises(ValueError, match="already has a handler"):
        bus.subscribe("a.b", Collector(), group="g")


async def test_close_twice_is_fine(make_bus: Callable[..., SyncBus]) -> None:
    bus = make_bus()
    await bus.start()
    await bus.close()
    await bus.close()


@pytest.mark.redis
async def test_close_right_after_a_delivery_does_not_hang(
    make_bus: Callable[..., SyncBus], redis_url: str
) -> None:
    # redis-py can swallow a cancellation that lands just as the consumer sends its next
    # XREADGROUP (redis/redis-py#2028); close() must still end the consumer loop.
    for _ in range(3):
        name = topic()
        bus = make_bus(redis_url=redis_url, block_s=5.0)
        delivered = asyncio.Event()

        async def handler(payload: dict[str, Any], event: asyncio.Event = delivered) -> None:
            event.set()

        bus.subscribe(name, handler, group="g")
        await bus.start()
        await bus.publish(name, {"n": 1})
        await delivered.wait()
        await asyncio.wait_for(bus.close(), timeout=15)  # only a hang guard
