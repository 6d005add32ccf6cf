"""outbox_rows: the outbox table, decoding a row (strict and lenient) and ``rerun_key``."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from outbox_rows import (
    ADDED_COLUMNS,
    DEAD_STATES,
    DUE,
    MAX_KEY_CHARS,
    OUTBOX_COLUMNS,
    OUTBOX_SCHEMA,
    OutboxStatus,
    decode_item,
    lenient_item,
    rerun_key,
    when,
)

CREATED = "2026-03-04T05:06:07+00:00"


def _row(**over: Any) -> tuple[Any, ...]:
    values: dict[str, Any] = {
        "id": "ob-1",
        "seq": 7,
        "action": "dm.send",
        "params_json": '{"to": "x"}',
        "idempotency_key": "k-1",
        "created_at": CREATED,
        "attempts": 2,
        "status": "pending",
        "last_error": None,
        "not_before": None,
        "pace_slot": None,
    }
    values.update(over)
    return tuple(values[c.strip()] for c in OUTBOX_COLUMNS.split(","))


@pytest.fixture
def db(tmp_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(tmp_path / "outbox.db")
    conn.executescript(OUTBOX_SCHEMA)
    for name, kind in ADDED_COLUMNS.items():
        conn.execute(f"ALTER TABLE hybrid_outbox ADD COLUMN {name} {kind}")
    return conn


def _insert(conn: sqlite3.Connection, item_id: str, key: str, **over: Any) -> None:
    values = {
        "id": item_id,
        "action": "dm.send",
        "params_json": json.dumps({"n": item_id}),
        "idempotency_key": key,
        "created_at": CREATED,
        "updated_at": CREATED,
    }
    values.update(over)
    cols = ", ".join(values)
    conn.execute(
        f"INSERT INTO hybrid_outbox ({cols}) VALUES ({', '.join('?' * len(values))})",
        tuple(values.values()),
    )


def test_a_row_read_from_a_real_table_decodes(db: sqlite3.Connection) -> None:
    _insert(db, "ob-1", "k-1", not_before=1_800_000_000.5, pace_slot="slot-9")
    row = db.execute(f"SELECT {OUTBOX_COLUMNS} FROM hybrid_outbox").fetchone()
    item = decode_item(row)
    assert item.id == "ob-1" and item.seq == 1 and item.action == "dm.send"
    assert item.params == {"n": "ob-1"}
    assert item.idempotency_key == "k-1"
    assert item.created_at == datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert item.attempts == 0 and item.status is OutboxStatus.PENDING
    assert item.last_error is None
    assert item.not_before == datetime.fromtimestamp(1_800_000_000.5, UTC)
    assert item.pace_slot == "slot-9"


def test_the_schema_refuses_a_second_row_with_the_same_key(db: sqlite3.Connection) -> None:
    _insert(db, "ob-1", "k-1")
    with pytest.raises(sqlite3.IntegrityError):
        _insert(db, "ob-2", "k-1")


def test_the_schema_can_be_applied_twice(db: sqlite3.Connection) -> None:
    db.executescript(OUTBOX_SCHEMA)  # opening an existing file again


def test_due_selects_pending_rows_whose_time_has_come(db: sqlite3.Connection) -> None:
    _insert(db, "now", "k1")
    _insert(db, "past", "k2", not_before=100.0)
    _insert(db, "future", "k3", not_before=300.0)
    _insert(db, "dead", "k4", status="dead")
    _insert(db, "limbo", "k5", status="indeterminate")
    due = db.execute(f"SELECT id FROM hybrid_outbox WHERE {DUE} ORDER BY seq", (200.0,))
    assert [r[0] for r in due] == ["now", "past"]
    dead = db.execute(
        f"SELECT id FROM hybrid_outbox WHERE status IN ({','.join('?' * len(DEAD_STATES))})",
        DEAD_STATES,
    )
    assert sorted(r[0] for r in dead) == ["dead", "limbo"]


def test_naive_created_at_is_taken_as_utc() -> None:
    item = decode_item(_row(created_at="2026-03-04T05:06:07"))
    assert item.created_at == datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"params_json": "{not json"}, "params_json is not valid JSON"),
        ({"params_json": None}, "params_json is not valid JSON"),
        ({"params_json": "[1, 2]"}, "params_json is a list, not an object"),
        ({"params_json": '"text"'}, "params_json is a str, not an object"),
        ({"created_at": "yesterday"}, "yesterday"),
        ({"status": "lost"}, "'lost' is not a valid OutboxStatus"),
        ({"attempts": "many"}, "many"),
        ({"not_before": "soon"}, "soon"),
        ({"not_before": 1e300}, "out of range"),
    ],
)
def test_an_unreadable_row_raises_value_error_naming_it(over: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_item(_row(**over))


def test_lenient_item_shows_what_it_can_of_an_unreadable_row() -> None:
    row = _row(params_json="{bad", created_at="??", status="lost", attempts="x")
    item = lenient_item(row, "params_json is not valid JSON")
    assert item.id == "ob-1" and item.seq == 7 and item.action == "dm.send"
    assert item.params == {}
    assert item.created_at == datetime.min.replace(tzinfo=UTC)
    assert item.status is OutboxStatus.DEAD
    assert item.attempts == 0
    assert item.last_error == "params_json is not valid JSON"


def test_lenient_item_keeps_the_readable_fields_and_the_rows_own_error() -> None:
    row = _row(params_json="[]", status="indeterminate", attempts=5, last_error="timeout")
    item = lenient_item(row, "params_json is a list, not an object")
    assert item.status is OutboxStatus.INDETERMINATE
    assert item.attempts == 5
    assert item.created_at == datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert item.last_error == "timeout"


def test_when() -> None:
    assert when(None) is None
    assert when(0) == datetime(1970, 1, 1, tzinfo=UTC)
    assert when("1.5") == datetime.fromtimestamp(1.5, UTC)


@pytest.mark.parametrize(
    ("key", "fresh"),
    [
        ("abc", "abc~r1"),
        ("abc~r1", "abc~r2"),
        ("abc~r9", "abc~r10"),
        ("a~rb", "a~rb~r1"),  # "~r" not followed by digits is part of the key
        ("abc~r", "abc~r~r1"),
        ("x~r1~r2", "x~r1~r3"),
    ],
)
def test_rerun_key_counts_up(key: str, fresh: str) -> None:
    assert rerun_key(key) == fresh


def test_rerun_key_is_deterministic_and_chains() -> None:
    assert rerun_key("k") == rerun_key("k")
    assert rerun_key(rerun_key(rerun_key("k"))) == "k~r3"


def test_rerun_key_of_a_long_key_stays_within_the_limit_and_keeps_counting() -> None:
    long_key = "k" * MAX_KEY_CHARS
    first = rerun_key(long_key)
    digest = hashlib.sha256(long_key.encode()).hexdigest()
    assert first == f"{digest}~r1"
    assert len(first) <= MAX_KEY_CHARS
    assert rerun_key(first) == f"{digest}~r2"


def test_rerun_key_at_the_limit_exactly_is_kept_readable() -> None:
    key = "k" * (MAX_KEY_CHARS - 3)
    assert rerun_key(key) == key + "~r1"
    assert len(rerun_key(key)) == MAX_KEY_CHARS
