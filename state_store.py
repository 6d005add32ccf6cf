"""StateStore: local state ``key -> {value, kind, updated_at, origin}`` and its conflict rules.

Besides the current entries, the store keeps the queue of local changes not yet pushed to the
cloud (``set_local`` writes both in one transaction). Entries from the other side go through
``apply_remote``, which asks ``resolve_conflict`` who wins.

Conflicts are decided by *authority*, not by who is receiving: the cloud owns CRM and pipeline
data, the terminal owns batch-generated content pending publish, and for everything else the
newer ``updated_at`` wins (a tie goes to the cloud's copy, so both sides converge at once).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from errors import InvalidParams
from sqlite_file import (
    HYBRID_DB_FILENAME,
    SqliteFile,
    Synchronous,
    parse_timestamp,
    transaction,
    utc_iso,
)

if TYPE_CHECKING:
    from config.hybrid_config import HybridConfig

log = logging.getLogger(__name__)

Winner = Literal["local", "remote"]


class StateKind(StrEnum):
    """What a state entry is; decides who wins a conflict. Unknown kinds count as GENERIC."""

    CRM = "crm"
    PIPELINE = "pipeline"
    CONTENT_PENDING_PUBLISH = "content_pending_publish"
    FEEDBACK = "feedback"
    GENERIC = "generic"


class StateOrigin(StrEnum):
    LOCAL = "local"
    REMOTE = "remote"


# The state the PRD names for the start-up pull, and its kinds.
WELL_KNOWN_KEYS: dict[str, StateKind] = {
    "crm.stats": StateKind.CRM,
    "workflows.active": StateKind.PIPELINE,
    "feedback.strategy": StateKind.FEEDBACK,
}


def resolve_conflict(
    kind: str,
    local: Mapping[str, Any] | None,
    remote: Mapping[str, Any],
    *,
    local_is_cloud: bool = False,
) -> Winner:
    """Decide whether the receiver keeps its ``local`` entry or takes the incoming ``remote``.

    ``local_is_cloud`` says which side is the cloud: False on a terminal applying a pulled
    entry (the default), True on the cloud accepting a pushed change. ``kind`` is the incoming
    entry's kind.
    """
    if local is None:
        return "remote"
    cloud: Winner = "local" if local_is_cloud else "remote"
    terminal: Winner = "remote" if local_is_cloud else "local"
    try:
        state_kind = StateKind(kind)
    except ValueError:
        state_kind = StateKind.GENERIC
    if state_kind in (StateKind.CRM, StateKind.PIPELINE):
        return cloud
    if state_kind is StateKind.CONTENT_PENDING_PUBLISH:
        return terminal
    local_at, remote_at = _updated_at(local), _updated_at(remote)
    if remote_at > local_at:
        return "remote"
    if local_at > remote_at:
        return "local"
    return cloud


def _updated_at(entry: Mapping[str, Any]) -> datetime:
    try:
        return parse_timestamp(entry["updated_at"])
    except (KeyError, TypeError, ValueError):
        return datetime.min.replace(tzinfo=UTC)  # no readable time: older than anything


_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS hybrid_state (
    key        TEXT PRIMARY KEY,
    value_json TEXT NOT NULL,
    kind       TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    origin     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS hybrid_state_changes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    key        TEXT NOT NULL,
    value_json TEXT NOT NULL,
    kind       TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
"""


def _dump_value(key: str, value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidParams(f"the value of state key {key!r} is not JSON-serialisable") from exc


class StateStore:
    """Local state ``key -> {value, kind, updated_at, origin}`` and the queue of local changes."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._db = SqliteFile(self.path, synchronous=Synchronous.FULL, name="state")

    @classmethod
    def from_config(cls, config: HybridConfig) -> StateStore:
        """State store in ``DATA_DIR/hybrid.sqlite3``."""
        return cls(config.data_dir / HYBRID_DB_FILENAME)

    async def open(self) -> None:
        await self._db.open(_STATE_SCHEMA)

    async def close(self) -> None:
        await self._db.close()

    async def get(self, key: str) -> dict[str, Any] | None:
        """``{value, kind, updated_at (ISO 8601), origin}`` of ``key``, or None."""
        row = await self._db.run(
            lambda conn: conn.execute(
                "SELECT key, value_json, kind, updated_at, origin FROM hybrid_state WHERE key = ?",
                (key,),
            ).fetchone()
        )
        return None if row is None else await self._decode_or_drop(row)

    async def _decode_or_drop(self, row: tuple[Any, ...]) -> dict[str, Any] | None:
        try:
            return _decode_state(row)
        except ValueError as exc:
            log.error("state store: dropping the unreadable entry %r: %s", row[0], exc)
            await self._db.run(
                lambda conn: conn.execute("DELETE FROM hybrid_state WHERE key = ?", (row[0],))
            )
            return None

    async def set_local(self, key: str, value: Any, *, kind: str) -> None:
        """Store a local change and queue it for the next push."""
        value_json = _dump_value(key, value)
        now = utc_iso(self._clock())
        kind_value = str(getattr(kind, "value", kind))

        def write(conn: sqlite3.Connection) -> None:
            _upsert_state(conn, key, value_json, kind_value, now, StateOrigin.LOCAL)
            conn.execute(
                "INSERT INTO hybrid_state_changes (key, value_json, kind, updated_at) "
                "VALUES (?, ?, ?, ?)",
                (key, value_json, kind_value, now),
            )

        await self._db.run(lambda conn: transaction(conn, write))

    async def apply_remote(
        self,
        key: str,
        value: Any,
        *,
        kind: str,
        updated_at: datetime,
        local_is_cloud: bool = False,
    ) -> bool:
        """Apply an entry from the other side through ``resolve_conflict``; True if it won."""
        value_json = _dump_value(key, value)
        kind_value = str(getattr(kind, "value", kind))
        incoming = {"value": value, "kind": kind_value, "updated_at": parse_timestamp(updated_at)}

        def write(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT key, value_json, kind, updated_at, origin FROM hybrid_state WHERE key = ?",
                (key,),
            ).fetchone()
            local: dict[str, Any] | None = None
            if row is not None:
                try:
                    local = _decode_state(row)
                except ValueError as exc:
                    log.error("state store: replacing the unreadable entry %r: %s", key, exc)
            winner = resolve_conflict(kind_value, local, incoming, local_is_cloud=local_is_cloud)
            if winner == "remote":
                stamp = incoming["updated_at"].isoformat()
                _upsert_state(conn, key, value_json, kind_value, stamp, StateOrigin.REMOTE)
            return winner == "remote"

        return await self._db.run(lambda conn: transaction(conn, write))

    async def pending_changes(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Local changes not yet pushed, oldest first: ``{id, key, value, kind, updated_at}``."""

        def read(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT id, key, value_json, kind, updated_at FROM hybrid_state_changes "
                "ORDER BY id LIMIT ?",
                (-1 if limit is None else limit,),
            ).fetchall()
            changes = []
            for change_id, key, value_json, kind, updated_at in rows:
                try:
                    value = json.loads(value_json)
                    stamp = parse_timestamp(updated_at).isoformat()
                except (TypeError, ValueError) as exc:
                    log.error(
                        "state store: dropping unreadable change %s of %r: %s", change_id, key, exc
                    )
                    conn.execute("DELETE FROM hybrid_state_changes WHERE id = ?", (change_id,))
                    continue
                changes.append(
                    {"id": change_id, "key": key, "value": value, "kind": kind, "updated_at": stamp}
                )
            return changes

        return await self._db.run(read)

    async def mark_pushed(self, change_ids: list[int]) -> None:
        """The cloud took these changes: drop them from the queue."""
        if not change_ids:
            return
        await self._db.run(
            lambda conn: conn.executemany(
                "DELETE FROM hybrid_state_changes WHERE id = ?", [(i,) for i in change_ids]
            )
        )

    async def snapshot(self) -> dict[str, Any]:
        """``{"state": {key: {value, kind, updated_at, origin}}, "pending_changes": n}``."""
        rows, (pending,) = await self._db.run(
            lambda conn: (
                conn.execute(
                    "SELECT key, value_json, kind, updated_at, origin FROM hybrid_state "
                    "ORDER BY key"
                ).fetchall(),
                conn.execute("SELECT count(*) FROM hybrid_state_changes").fetchone(),
            )
        )
        state: dict[str, Any] = {}
        for row in rows:
            entry = await self._decode_or_drop(row)
            if entry is not None:
                state[row[0]] = entry
        return {"state": state, "pending_changes": int(pending)}


def _decode_state(row: tuple[Any, ...]) -> dict[str, Any]:
    _key, value_json, kind, updated_at, origin = row
    try:
        value = json.loads(value_json)
        stamp = parse_timestamp(updated_at).isoformat()
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    return {"value": value, "kind": kind, "updated_at": stamp, "origin": origin}


def _upsert_state(
    conn: sqlite3.Connection,
    key: str,
    value_json: str,
    kind: str,
    updated_at: str,
    origin: StateOrigin,
) -> None:
    conn.execute(
        "INSERT INTO hybrid_state (key, value_json, kind, updated_at, origin) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET value_json = excluded.value_json, "
        "kind = excluded.kind, updated_at = excluded.updated_at, origin = excluded.origin",
        (key, value_json, kind, updated_at, origin.value),
    )
