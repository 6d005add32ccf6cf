"""The bus's SQLite queue on a real SQLite file: cursors, leases, attempts, parking, backlog."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

import bus_store

pytestmark = pytest.mark.prd200


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(tmp_path / "bus.db", isolation_level=None)
    connection.executescript(bus_store.SCHEMA)
    yield connection
    connection.close()


def publish(conn: sqlite3.Connection, topic: str, n: int) -> list[int]:
    return [bus_store.insert(conn, topic, json.dumps({"n": i})) for i in range(n)]


def test_a_group_gets_what_was_published_after_it_subscribed(conn) -> None:
    publish(conn, "t", 2)
    bus_store.ensure_cursor(conn, "t", "g", durable=True)
    later = publish(conn, "t", 2)
    got = bus_store.next_for_group(conn, "t", "g", True, "me", 30.0, limit=10)
    assert [message_id for message_id, _ in got or []] == later


def test_an_ack_moves_the_cursor_and_the_next_read_starts_after_it(conn) -> None:
    bus_store.ensure_cursor(conn, "t", "g", durable=True)
    ids = publish(conn, "t", 3)
    bus_store.ack(conn, "t", "g", ids[0])
    got = bus_store.next_for_group(conn, "t", "g", True, "me", 30.0, limit=10)
    assert [message_id for message_id, _ in got or []] == ids[1:]


def test_a_durable_group_is_read_by_one_process_at_a_time(conn) -> None:
    bus_store.ensure_cursor(conn, "t", "g", durable=True)
    publish(conn, "t", 1)
    assert bus_store.next_for_group(conn, "t", "g", True, "first", 30.0, limit=10)
    assert bus_store.next_for_group(conn, "t", "g", True, "second", 30.0, limit=10) is None
    bus_store.release_leases(conn, "first")
    assert bus_store.next_for_group(conn, "t", "g", True, "second", 30.0, limit=10)


def test_an_expired_lease_goes_to_the_next_owner(conn) -> None:
    assert bus_store.take_lease(conn, "forward", "first", lease_s=-1.0)  # expired at once
    assert bus_store.take_lease(conn, "forward", "second", lease_s=30.0)
    assert not bus_store.take_lease(conn, "forward", "first", lease_s=30.0)


def test_attempts_count_up_and_parking_moves_the_message_out_of_the_group(conn) -> None:
    bus_store.ensure_cursor(conn, "t", "g", durable=True)
    (message_id,) = publish(conn, "t", 1)
    assert [bus_store.begin_attempt(conn, "g", message_id) for _ in range(3)] == [1, 2, 3]
    bus_store.record_failure(conn, "g", message_id, "ValueError: bad")
    assert bus_store.backlog(conn, limit=10)[0].attempts == {"g": 3}
    bus_store.park(conn, "t", "g", message_id, '{"n": 0}', 3, "ValueError: bad")
    assert bus_store.next_for_group(conn, "t", "g", True, "me", 30.0, limit=10) == []
    stats = bus_store.stats(conn)
    assert stats["parked"] == 1
    assert stats["recent_parked"][0] | {"parked_at": None} == {
        "topic": "t",
        "group": "g",
        "message_id": message_id,
        "attempts": 3,
        "error": "ValueError: bad",
        "parked_at": None,
    }


def test_the_backlog_names_the_groups_that_handled_each_message_here(conn) -> None:
    for group in ("a", "b"):
        bus_store.ensure_cursor(conn, "t", group, durable=True)
    first, second = publish(conn, "t", 2)
    bus_store.ack(conn, "t", "a", first)
    rows = bus_store.backlog(conn, limit=10)
    assert [(row.id, row.handled) for row in rows] == [(first, ("a",)), (second, ())]
    bus_store.mark_consumed(conn, [first])
    assert [row.id for row in bus_store.backlog(conn, limit=10)] == [second]
    assert bus_store.count_backlog(conn) == 1


def test_without_redis_a_message_is_consumed_once_every_group_is_past_it(conn) -> None:
    for group in ("a", "b"):
        bus_store.ensure_cursor(conn, "t", group, durable=True)
    (message_id,) = publish(conn, "t", 1)
    bus_store.ack(conn, "t", "a", message_id)
    bus_store.housekeep(conn, own=[], redis_configured=False, keep=100)
    assert bus_store.count_backlog(conn) == 1
    bus_store.ack(conn, "t", "b", message_id)
    bus_store.housekeep(conn, own=[], redis_configured=False, keep=100)
    assert bus_store.count_backlog(conn) == 0


def test_with_redis_only_forwarding_consumes_a_message(conn) -> None:
    bus_store.ensure_cursor(conn, "t", "a", durable=True)
    (message_id,) = publish(conn, "t", 1)
    bus_store.ack(conn, "t", "a", message_id)
    bus_store.housekeep(conn, own=[], redis_configured=True, keep=100)
    assert bus_store.count_backlog(conn) == 1  # Redis has not taken it over yet
