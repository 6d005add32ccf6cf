"""The SyncBus's SQLite queue: fallback messages, group cursors, retry counts, parked messages.

Blocking functions over one ``sqlite3.Connection``, and ``SqliteQueue``, the bus's backend
that runs them on its ``SqliteFile`` worker thread. The table the PRD names is
``hybrid_messages(id, topic, payload_json, created_at, consumed_at)`` (ISO 8601 UTC text, like
the other tables under DATA_DIR); the rest is the bus's bookkeeping:

    hybrid_bus_cursors   per (topic, group): id of the last message the group finished
    hybrid_bus_attempts  deliveries so far of a message that failed, and the last error
    hybrid_bus_dead      messages parked after max_deliveries, shown by /status
    hybrid_bus_leases    which local process consumes a group / forwards the backlog now

``consumed_at`` is set when Redis took the message over (forwarded), or, when SQLite is the
only bus, once every group's cursor is past it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bus_subscription import READ_COUNT, Subscription, log
from sqlite_file import SqliteFile, Synchronous, transaction, utc_iso

T = TypeVar("T")

EPHEMERAL_STALE_S = 600.0  # an ephemeral cursor nobody renewed for this long is dropped

SCHEMA = """
CREATE TABLE IF NOT EXISTS hybrid_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    created_at TEXT NOT NULL,
    consumed_at TEXT
);
CREATE INDEX IF NOT EXISTS hybrid_messages_unconsumed
    ON hybrid_messages (topic, id) WHERE consumed_at IS NULL;
CREATE TABLE IF NOT EXISTS hybrid_bus_cursors (
    topic TEXT NOT NULL, grp TEXT NOT NULL, last_id INTEGER NOT NULL,
    durable INTEGER NOT NULL, renewed_unix_s REAL NOT NULL, PRIMARY KEY (topic, grp)
);
CREATE TABLE IF NOT EXISTS hybrid_bus_attempts (
    grp TEXT NOT NULL, message_id INTEGER NOT NULL, attempts INTEGER NOT NULL,
    last_error TEXT, PRIMARY KEY (grp, message_id)
);
CREATE TABLE IF NOT EXISTS hybrid_bus_dead (
    id INTEGER PRIMARY KEY AUTOINCREMENT, message_id INTEGER, topic TEXT NOT NULL,
    grp TEXT NOT NULL, payload_json TEXT NOT NULL, attempts INTEGER NOT NULL,
    error TEXT, parked_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS hybrid_bus_leases (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, until_unix_s REAL NOT NULL
);
"""


@dataclass(frozen=True)
class BacklogRow:
    """A message waiting to be forwarded to Redis, and what this machine already did with it."""

    id: int
    topic: str
    payload_json: str
    handled: tuple[str, ...] = ()  # groups that finished it here
    attempts: dict[str, int] = field(default_factory=dict)  # failed deliveries per group


def insert(conn: sqlite3.Connection, topic: str, payload_json: str) -> int:
    cur = conn.execute(
        "INSERT INTO hybrid_messages (topic, payload_json, created_at) VALUES (?, ?, ?)",
        (topic, payload_json, utc_iso(time.time())),
    )
    return int(cur.lastrowid or 0)


def ensure_cursor(conn: sqlite3.Connection, topic: str, grp: str, durable: bool) -> None:
    """Start a group at the newest message: it gets what is published after it subscribed."""
    conn.execute(
        "INSERT OR IGNORE INTO hybrid_bus_cursors (topic, grp, last_id, durable, renewed_unix_s) "
        "SELECT ?, ?, COALESCE(MAX(id), 0), ?, ? FROM hybrid_messages",
        (topic, grp, int(durable), time.time()),
    )


def drop_cursor(conn: sqlite3.Connection, topic: str, grp: str) -> None:
    conn.execute("DELETE FROM hybrid_bus_cursors WHERE topic = ? AND grp = ?", (topic, grp))


def take_lease(conn: sqlite3.Connection, name: str, owner: str, lease_s: float) -> bool:
    """Take or renew the lease ``name``; False while another owner holds it."""
    now = time.time()
    cur = conn.execute(
        "INSERT INTO hybrid_bus_leases (name, owner, until_unix_s) VALUES (?, ?, ?) "
        "ON CONFLICT(name) DO UPDATE SET owner = excluded.owner, "
        "until_unix_s = excluded.until_unix_s "
        "WHERE hybrid_bus_leases.owner = excluded.owner OR hybrid_bus_leases.until_unix_s < ?",
        (name, owner, now + lease_s, now),
    )
    return cur.rowcount == 1


def release_leases(conn: sqlite3.Connection, owner: str, name: str | None = None) -> None:
    if name is None:
        conn.execute("DELETE FROM hybrid_bus_leases WHERE owner = ?", (owner,))
    else:
        conn.execute("DELETE FROM hybrid_bus_leases WHERE owner = ? AND name = ?", (owner, name))


def next_for_group(
    conn: sqlite3.Connection,
    topic: str,
    grp: str,
    durable: bool,
    owner: str,
    lease_s: float,
    limit: int,
) -> list[tuple[int, str]] | None:
    """Return the group's next unconsumed messages, or None if another process holds it."""
    if durable and not take_lease(conn, f"group:{topic}:{grp}", owner, lease_s):
        return None
    ensure_cursor(conn, topic, grp, durable)
    rows = conn.execute(
        "SELECT m.id, m.payload_json FROM hybrid_messages m, hybrid_bus_cursors c "
        "WHERE c.topic = ? AND c.grp = ? AND m.topic = c.topic AND m.id > c.last_id "
        "AND m.consumed_at IS NULL ORDER BY m.id LIMIT ?",
        (topic, grp, limit),
    ).fetchall()
    return [(int(r[0]), str(r[1])) for r in rows]


def begin_attempt(conn: sqlite3.Connection, grp: str, message_id: int) -> int:
    """Count one more delivery before the handler runs (so a crash counts too)."""
    row = conn.execute(
        "INSERT INTO hybrid_bus_attempts (grp, message_id, attempts) VALUES (?, ?, 1) "
        "ON CONFLICT(grp, message_id) DO UPDATE SET attempts = attempts + 1 "
        "RETURNING attempts",
        (grp, message_id),
    ).fetchone()
    return int(row[0])


def record_failure(conn: sqlite3.Connection, grp: str, message_id: int, error: str) -> None:
    conn.execute(
        "UPDATE hybrid_bus_attempts SET last_error = ? WHERE grp = ? AND message_id = ?",
        (error, grp, message_id),
    )


def ack(conn: sqlite3.Connection, topic: str, grp: str, message_id: int) -> None:
    transaction(conn, lambda c: _advance(c, topic, grp, message_id))


def park(
    conn: sqlite3.Connection,
    topic: str,
    grp: str,
    message_id: int,
    payload_json: str,
    attempts: int,
    error: str,
) -> None:
    def write(c: sqlite3.Connection) -> None:
        c.execute(
            "INSERT INTO hybrid_bus_dead (message_id, topic, grp, payload_json, attempts, "
            "error, parked_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (message_id, topic, grp, payload_json, attempts, error, utc_iso(time.time())),
        )
        _advance(c, topic, grp, message_id)

    transaction(conn, write)


def _advance(conn: sqlite3.Connection, topic: str, grp: str, message_id: int) -> None:
    conn.execute(
        "UPDATE hybrid_bus_cursors SET last_id = MAX(last_id, ?), renewed_unix_s = ? "
        "WHERE topic = ? AND grp = ?",
        (message_id, time.time(), topic, grp),
    )
    conn.execute(
        "DELETE FROM hybrid_bus_attempts WHERE grp = ? AND message_id = ?", (grp, message_id)
    )


def backlog(conn: sqlite3.Connection, limit: int) -> list[BacklogRow]:
    """Return the oldest rows not yet forwarded, with the groups that handled them here."""
    rows = conn.execute(
        "SELECT id, topic, payload_json FROM hybrid_messages "
        "WHERE consumed_at IS NULL ORDER BY id LIMIT ?",
        (limit,),
    ).fetchall()
    if not rows:
        return []
    cursors: dict[str, list[tuple[str, int]]] = {}
    for topic, grp, last_id in conn.execute("SELECT topic, grp, last_id FROM hybrid_bus_cursors"):
        cursors.setdefault(topic, []).append((grp, int(last_id)))
    attempts: dict[int, dict[str, int]] = {}
    for grp, message_id, count in conn.execute(
        "SELECT grp, message_id, attempts FROM hybrid_bus_attempts WHERE message_id BETWEEN ? "
        "AND ?",
        (rows[0][0], rows[-1][0]),
    ):
        attempts.setdefault(int(message_id), {})[grp] = int(count)
    return [
        BacklogRow(
            id=int(mid),
            topic=topic,
            payload_json=payload,
            handled=tuple(g for g, last in cursors.get(topic, []) if last >= mid),
            attempts=attempts.get(int(mid), {}),
        )
        for mid, topic, payload in rows
    ]


def mark_consumed(conn: sqlite3.Connection, ids: list[int]) -> None:
    now = utc_iso(time.time())
    transaction(
        conn,
        lambda c: c.executemany(
            "UPDATE hybrid_messages SET consumed_at = ? WHERE id = ?", [(now, i) for i in ids]
        ),
    )


def count_backlog(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT COUNT(*) FROM hybrid_messages WHERE consumed_at IS NULL").fetchone()
    return int(row[0])


def housekeep(
    conn: sqlite3.Connection, own: list[tuple[str, str]], redis_configured: bool, keep: int
) -> None:
    """Renew this bus's ephemeral cursors, drop dead ones, mark consumed, trim history."""
    now = time.time()

    def work(c: sqlite3.Connection) -> None:
        c.executemany(
            "UPDATE hybrid_bus_cursors SET renewed_unix_s = ? WHERE topic = ? AND grp = ?",
            [(now, topic, grp) for topic, grp in own],
        )
        c.execute(
            "DELETE FROM hybrid_bus_cursors WHERE durable = 0 AND renewed_unix_s < ?",
            (now - EPHEMERAL_STALE_S,),
        )
        if not redis_configured:
            # SQLite is the bus: a message is consumed once every group is past it.
            c.execute(
                "UPDATE hybrid_messages SET consumed_at = ? WHERE consumed_at IS NULL AND "
                "id <= COALESCE((SELECT MIN(k.last_id) FROM hybrid_bus_cursors k "
                "WHERE k.topic = hybrid_messages.topic), id)",
                (utc_iso(now),),
            )
        c.execute(
            "DELETE FROM hybrid_messages WHERE consumed_at IS NOT NULL AND "
            "id <= (SELECT MAX(id) FROM hybrid_messages) - ?",
            (keep,),
        )
        c.execute(
            "DELETE FROM hybrid_bus_dead WHERE id <= (SELECT MAX(id) FROM hybrid_bus_dead) - ?",
            (keep,),
        )

    transaction(conn, work)


def stats(conn: sqlite3.Connection) -> dict[str, Any]:
    """Backlog, parked count and the ten newest parked messages."""
    recent = [
        {"topic": t, "group": g, "message_id": m, "attempts": a, "error": e, "parked_at": p}
        for t, g, m, a, e, p in conn.execute(
            "SELECT topic, grp, message_id, attempts, error, parked_at FROM hybrid_bus_dead "
            "ORDER BY id DESC LIMIT 10"
        )
    ]
    parked = int(conn.execute("SELECT COUNT(*) FROM hybrid_bus_dead").fetchone()[0])
    return {"backlog": count_backlog(conn), "parked": parked, "recent_parked": recent}


# -- the backend: publish and consume on this file ----------------------------------------------


class SqliteQueue:
    """The bus on this SQLite file: when Redis is not configured, or while it is away.

    Publishing commits a row; each subscription polls its group's cursor every
    ``poll_interval_s`` (and is woken at once by publishes of this process). ``paused()`` says
    that Redis took over: a step in progress stops and leaves the rest to the forwarder.
    """

    def __init__(
        self,
        path: Path,
        *,
        consumer_name: str,
        max_deliveries: int,
        poll_interval_s: float,
        paused: Callable[[], bool],
    ) -> None:
        self.path = path
        self.consumer_name = consumer_name
        self.max_deliveries = max_deliveries
        self.poll_interval_s = poll_interval_s
        self._paused = paused
        self._lease_s = max(30.0, 3 * poll_interval_s)
        # FULL: a publish that returned survives a power cut too, not only a killed process.
        self._db = SqliteFile(path, synchronous=Synchronous.FULL, name="sync-bus")

    async def open(self) -> None:
        await self._db.open(SCHEMA)

    async def close(self) -> None:
        await self._db.close()

    async def sql(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(connection, *args)`` (a function of this module) on the database thread."""
        return await self._db.run(lambda conn: fn(conn, *args))

    async def publish(self, topic: str, data: str) -> str:
        return f"sqlite:{await self.sql(insert, topic, data)}"

    async def step(self, sub: Subscription) -> None:
        progressed = False
        sub.wake.clear()  # before reading: a publish during this step wakes the next wait
        async with sub.step_lock:
            if self._paused():
                return
            rows = await self.sql(
                next_for_group,
                sub.topic,
                sub.group,
                sub.durable,
                self.consumer_name,
                self._lease_s,
                READ_COUNT,
            )
            for message_id, payload_json in rows or []:
                if self._paused():
                    return  # the forwarder takes the rest to Redis
                if not await self._deliver(sub, message_id, payload_json):
                    break
                progressed = True
        if progressed and rows is not None and len(rows) == READ_COUNT:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sub.wake.wait(), timeout=self.poll_interval_s)

    async def _deliver(self, sub: Subscription, message_id: int, payload_json: str) -> bool:
        """Deliver one row; False stops the batch (a failure is retried at the next poll)."""
        attempt = await self.sql(begin_attempt, sub.group, message_id)
        key = f"sqlite:{message_id}"
        if attempt > self.max_deliveries:
            error = sub.errors.pop(key, "handler failed (or its process died) earlier")
            await self._park(sub, message_id, payload_json, attempt - 1, error)
            return True
        try:
            payload = json.loads(payload_json)
            await sub.handler(payload)
        except Exception as exc:
            sub.handler_failed(key, attempt, exc)
            await self.sql(record_failure, sub.group, message_id, sub.errors[key])
            if attempt >= self.max_deliveries:
                await self._park(sub, message_id, payload_json, attempt, sub.errors.pop(key))
                return True
            return False
        sub.errors.pop(key, None)
        sub.delivered += 1
        await self.sql(ack, sub.topic, sub.group, message_id)
        return True

    async def _park(
        self, sub: Subscription, message_id: int, payload_json: str, attempts: int, error: str
    ) -> None:
        await self.sql(park, sub.topic, sub.group, message_id, payload_json, attempts, error)
        sub.parked += 1
        log.error(
            "SyncBus: parked SQLite message %d of %s (group %s) after %d attempt(s): %s",
            message_id,
            sub.topic,
            sub.group,
            attempts,
            error,
        )
