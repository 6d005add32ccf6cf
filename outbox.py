"""Outbox: the durable FIFO of side-effect actions waiting for the cloud.

An action that could not reach the cloud (offline, circuit open, or an ambiguous failure) is
committed here with ``PRAGMA synchronous=FULL`` before ``enqueue()`` returns: a 202 means the row
is on disk and survives SIGKILL. ``StateSync.push_pending_sync()`` replays items in enqueue order
with their original idempotency key; an item leaves only when the cloud acknowledged it
(``ack()`` deletes the row). A 4xx, or ``max_attempts`` ambiguous failures, makes it a dead
letter: kept, visible, retried only on request (``retry_dead()``) or dropped (``drop()``). A row
that does not decode (hand-edited params JSON) is logged and moved to the dead letters with the
reason.

An *indeterminate* dead letter is an item the cloud may have run: the process that ran it died
mid-handler. Replaying its key would never run it again, and running it again might do it twice,
so a person decides: ``retry_dead(id, rerun=True)`` sends it again under a fresh key derived from
the old one (``rerun_key``), or ``drop(id)`` forgets it.

``on_dead_letter(id, action, error, indeterminate)``, when set, hears of each item that
``fail()`` or ``park()`` makes a dead letter.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from errors import Indeterminate, InvalidParams
from outbox_rows import (
    ADDED_COLUMNS,
    DEAD_STATES,
    DUE,
    MAX_ERROR_CHARS,
    OUTBOX_COLUMNS,
    OUTBOX_SCHEMA,
    OutboxItem,
    OutboxStatus,
    decode_item,
    lenient_item,
    rerun_key,
    when,
)
from params_digest import canonical_json
from sqlite_file import (
    HYBRID_DB_FILENAME,
    SqliteFile,
    Synchronous,
    utc_iso,
)

if TYPE_CHECKING:
    from config.hybrid_config import HybridConfig

log = logging.getLogger(__name__)


class Outbox:
    """Durable FIFO of side-effect actions waiting for the cloud; failures become dead letters."""

    def __init__(
        self, path: Path, *, max_attempts: int = 10, clock: Callable[[], float] = time.time
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.path = Path(path)
        self.max_attempts = max_attempts
        self._clock = clock
        self._db = SqliteFile(self.path, synchronous=Synchronous.FULL, name="outbox")
        self.on_dead_letter: Callable[[str, str, str, bool], None] | None = None

    @classmethod
    def from_config(cls, config: HybridConfig) -> Outbox:
        """Outbox in ``DATA_DIR/hybrid.sqlite3``."""
        return cls(config.data_dir / HYBRID_DB_FILENAME)

    async def open(self) -> None:
        await self._db.open(OUTBOX_SCHEMA)

        def add_columns(conn: sqlite3.Connection) -> None:
            have = {row[1] for row in conn.execute("PRAGMA table_info(hybrid_outbox)")}
            for name, kind in ADDED_COLUMNS.items():
                if name not in have:
                    conn.execute(f"ALTER TABLE hybrid_outbox ADD COLUMN {name} {kind}")

        await self._db.write(add_columns)

    async def close(self) -> None:
        await self._db.close()

    async def enqueue(
        self,
        action: str,
        params: dict[str, Any],
        idempotency_key: str,
        *,
        not_before: datetime | None = None,
        pace_slot: str | None = None,
    ) -> OutboxItem:
        """Queue ``action``; committed and fsync'd before this returns.

        ``not_before``: not sent before then (a deferred or scheduled item); ``pace_slot``: the
        pacing slot booked for it.

        Enqueueing an idempotency key that is already queued returns the queued item (a
        client's retry is not queued twice); the same key with another action or other params
        is ``InvalidParams``, as the cloud would answer.
        """
        try:
            params_json = canonical_json(params)
        except (TypeError, ValueError) as exc:
            raise InvalidParams(f"params of {action} are not JSON-serialisable: {exc}") from exc
        now = utc_iso(self._clock())
        new_id = uuid.uuid4().hex
        due = None if not_before is None else not_before.timestamp()

        def write(conn: sqlite3.Connection) -> tuple[Any, ...]:
            row = conn.execute(
                f"SELECT {OUTBOX_COLUMNS} FROM hybrid_outbox WHERE idempotency_key = ?",
                (idempotency_key,),
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO hybrid_outbox (id, action, params_json, idempotency_key, "
                    "created_at, updated_at, not_before, pace_slot) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (new_id, action, params_json, idempotency_key, now, now, due, pace_slot),
                )
                row = conn.execute(
                    f"SELECT {OUTBOX_COLUMNS} FROM hybrid_outbox WHERE id = ?", (new_id,)
                ).fetchone()
            return tuple(row)

        row = await self._db.write(write)
        if row[0] != new_id and (row[2] != action or row[3] != params_json):
            raise InvalidParams(
                f"idempotency key {idempotency_key!r} is already queued for another action "
                f"or other params (outbox item {row[0]})"
            )
        return decode_item(row)

    async def pending(self, limit: int = 100) -> list[OutboxItem]:
        """Up to ``limit`` pending items that are due (``not_before`` passed, or none), in
        enqueue order; unreadable rows become dead letters."""
        now = self._clock()

        def read(conn: sqlite3.Connection) -> list[OutboxItem]:
            items: list[OutboxItem] = []
            after = -1
            while len(items) < limit:
                rows = conn.execute(
                    f"SELECT {OUTBOX_COLUMNS} FROM hybrid_outbox "
                    f"WHERE {DUE} AND seq > ? ORDER BY seq LIMIT ?",
                    (now, after, limit - len(items)),
                ).fetchall()
                if not rows:
                    break
                for row in rows:
                    after = row[1]
                    try:
                        items.append(decode_item(row))
                    except ValueError as exc:
                        self._bury_corrupt(conn, row[0], str(exc))
            return items

        return await self._db.run(read)

    def _bury_corrupt(self, conn: sqlite3.Connection, item_id: str, reason: str) -> None:
        log.error("outbox item %s is unreadable and moves to the dead letters: %s", item_id, reason)
        conn.execute(
            "UPDATE hybrid_outbox SET status = 'dead', last_error = ?, updated_at = ? WHERE id = ?",
            (f"corrupt row: {reason}"[:MAX_ERROR_CHARS], utc_iso(self._clock()), item_id),
        )

    async def ack(self, item_id: str, result: Any = None) -> None:
        """The cloud acknowledged the item: delete it (acking twice is harmless)."""
        await self._db.run(
            lambda conn: conn.execute("DELETE FROM hybrid_outbox WHERE id = ?", (item_id,))
        )

    async def fail(
        self, item_id: str, error: str, *, permanent: bool, count_attempt: bool = True
    ) -> OutboxStatus | None:
        """Record a failed delivery; return the item's new status (None: no such item).

        ``permanent`` (a 4xx) or ``max_attempts`` counted attempts make it a dead letter.
        ``count_attempt=False`` records the error without spending an attempt: for failures
        that prove the request never reached the cloud, which say nothing about the item.
        """
        now = utc_iso(self._clock())

        def write(conn: sqlite3.Connection) -> tuple[OutboxStatus, str] | None:
            row = conn.execute(
                "SELECT attempts, action FROM hybrid_outbox WHERE id = ?", (item_id,)
            ).fetchone()
            if row is None:
                return None
            attempts = int(row[0]) + (1 if count_attempt else 0)
            dead = permanent or attempts >= self.max_attempts
            status = OutboxStatus.DEAD if dead else OutboxStatus.PENDING
            conn.execute(
                "UPDATE hybrid_outbox SET attempts = ?, status = ?, last_error = ?, "
                "updated_at = ? WHERE id = ?",
                (attempts, status.value, error[:MAX_ERROR_CHARS], now, item_id),
            )
            return status, str(row[1])

        outcome = await self._db.write(write)
        if outcome is None:
            return None
        if outcome[0] is OutboxStatus.DEAD:
            self._dead_letter(item_id, outcome[1], error, indeterminate=False)
        return outcome[0]

    def _dead_letter(self, item_id: str, action: str, error: str, *, indeterminate: bool) -> None:
        if self.on_dead_letter is not None:
            self.on_dead_letter(item_id, action, error, indeterminate)

    async def reschedule(
        self, item_id: str, not_before: datetime | None, pace_slot: str | None
    ) -> None:
        """Move a pending item to ``not_before`` with its new pacing slot (no attempt spent)."""
        due = None if not_before is None else not_before.timestamp()
        await self._db.run(
            lambda conn: conn.execute(
                "UPDATE hybrid_outbox SET not_before = ?, pace_slot = ?, updated_at = ? "
                "WHERE id = ? AND status = 'pending'",
                (due, pace_slot, utc_iso(self._clock()), item_id),
            )
        )

    async def next_due(self) -> datetime | None:
        """The earliest ``not_before`` of a pending item still ahead; None if there is none."""
        (due,) = await self._db.run(
            lambda conn: conn.execute(
                "SELECT min(not_before) FROM hybrid_outbox "
                "WHERE status = 'pending' AND not_before > ?",
                (self._clock(),),
            ).fetchone()
        )
        return when(due)

    async def waiting(self, limit: int = 50) -> list[OutboxItem]:
        """Up to ``limit`` pending items whose time has not come (deferred by pacing, or
        scheduled), soonest first: what a person may still cancel."""
        rows = await self._db.run(
            lambda conn: conn.execute(
                f"SELECT {OUTBOX_COLUMNS} FROM hybrid_outbox "
                "WHERE status = 'pending' AND not_before > ? ORDER BY not_before, seq LIMIT ?",
                (self._clock(), limit),
            ).fetchall()
        )
        items = []
        for row in rows:
            try:
                items.append(decode_item(row))
            except ValueError as exc:  # shown as well as it can be; the replay buries it
                items.append(lenient_item(row, f"corrupt row: {exc}"))
        return items

    async def depth(self) -> int:
        """Number of pending items."""
        return await self._count(OutboxStatus.PENDING)

    async def _count(self, status: OutboxStatus) -> int:
        (rows,) = await self._db.run(
            lambda conn: conn.execute(
                "SELECT count(*) FROM hybrid_outbox WHERE status = ?", (status.value,)
            ).fetchone()
        )
        return int(rows)

    async def dead_letters(self) -> list[OutboxItem]:
        """Every dead letter, indeterminate ones included, oldest first (unreadable rows shown
        with empty params)."""
        rows = await self._db.run(
            lambda conn: conn.execute(
                f"SELECT {OUTBOX_COLUMNS} FROM hybrid_outbox WHERE status IN (?, ?) ORDER BY seq",
                DEAD_STATES,
            ).fetchall()
        )
        items = []
        for row in rows:
            try:
                items.append(decode_item(row))
            except ValueError as exc:
                items.append(lenient_item(row, f"corrupt row: {exc}"))
        return items

    async def park(self, item_id: str, error: str) -> None:
        """Make an item an indeterminate dead letter: it may have run, a person decides."""
        rows = await self._db.run(  # fetchall: the statement runs to its end, and commits
            lambda conn: conn.execute(
                "UPDATE hybrid_outbox SET status = 'indeterminate', last_error = ?, "
                "updated_at = ? WHERE id = ? RETURNING action",
                (error[:MAX_ERROR_CHARS], utc_iso(self._clock()), item_id),
            ).fetchall()
        )
        for (action,) in rows:
            self._dead_letter(item_id, str(action), error, indeterminate=True)

    async def retry_dead(self, item_id: str, *, rerun: bool = False) -> OutboxItem:
        """Put a dead letter back in the queue at its original place, attempts reset.

        An indeterminate one may have run: it is retried only with ``rerun=True`` (a person's
        explicit confirmation), under a fresh key so the cloud really runs it again; without
        it, ``Indeterminate``. An id that is no dead letter is ``KeyError``.
        """
        now = utc_iso(self._clock())

        def write(conn: sqlite3.Connection) -> tuple[Any, ...]:
            row = conn.execute(
                f"SELECT {OUTBOX_COLUMNS} FROM hybrid_outbox WHERE id = ? AND status IN (?, ?)",
                (item_id, *DEAD_STATES),
            ).fetchone()
            if row is None:
                raise KeyError(f"no dead letter with id {item_id!r}")
            key = row[4]
            if row[7] == OutboxStatus.INDETERMINATE:
                if not rerun:
                    raise Indeterminate(
                        f"outbox item {item_id} ({row[2]}) may have run already; retrying runs "
                        f"it again: confirm the re-run to do that"
                    )
                key = rerun_key(key)
            conn.execute(
                "UPDATE hybrid_outbox SET status = 'pending', attempts = 0, idempotency_key = ?, "
                "updated_at = ? WHERE id = ?",
                (key, now, item_id),
            )
            return tuple(
                conn.execute(
                    f"SELECT {OUTBOX_COLUMNS} FROM hybrid_outbox WHERE id = ?", (item_id,)
                ).fetchone()
            )

        return decode_item(await self._db.write(write))

    async def drop(self, item_id: str) -> OutboxItem:
        """Delete a dead letter, or cancel a queued item before it is sent; ``KeyError`` if
        there is no such item."""

        def write(conn: sqlite3.Connection) -> tuple[Any, ...]:
            row = conn.execute(
                f"SELECT {OUTBOX_COLUMNS} FROM hybrid_outbox WHERE id = ?", (item_id,)
            ).fetchone()
            if row is None:
                raise KeyError(f"no outbox item with id {item_id!r}")
            conn.execute("DELETE FROM hybrid_outbox WHERE id = ?", (item_id,))
            return tuple(row)

        row = await self._db.write(write)
        try:
            return decode_item(row)
        except ValueError as exc:
            return lenient_item(row, f"corrupt row: {exc}")

    async def snapshot(self) -> dict[str, Any]:
        """Counts for ``/status``: pending depth, dead letters, oldest pending enqueue time."""

        def read(conn: sqlite3.Connection) -> dict[str, Any]:
            counts = dict(
                conn.execute("SELECT status, count(*) FROM hybrid_outbox GROUP BY status")
            )
            (oldest,) = conn.execute(
                "SELECT min(created_at) FROM hybrid_outbox WHERE status = 'pending'"
            ).fetchone()
            (deferred,) = conn.execute(
                "SELECT count(*) FROM hybrid_outbox WHERE status = 'pending' AND not_before > ?",
                (self._clock(),),
            ).fetchone()
            return {
                "depth": int(counts.get("pending", 0)),
                "deferred": int(deferred),
                "dead_letters": sum(int(counts.get(state, 0)) for state in DEAD_STATES),
                "oldest_pending_at": oldest,
            }

        return await self._db.run(read)
