"""OfflineCache: the last good answer of each read-only cloud action, in SQLite.

Table ``hybrid_cache(action, params_hash, response_json, cached_at)``, primary key
``(action, params_hash)``; ``cached_at`` is Unix time in seconds (REAL). ``params_hash`` is the
SHA-256 of the params as canonical JSON, so key order never matters. ``get()`` serves entries
younger than the TTL (``CACHE_TTL_SEC``); ``get_stale()`` returns any entry still stored — the
``cached`` field of an ``offline`` error. ``put()`` bounds the table: rows older than
``max_age_s`` go, then the oldest rows beyond ``max_rows``.

``remember()`` is the write-behind ``put()`` the router uses for every read-only cloud result:
it keeps the entry in memory, where ``get()`` already serves it, and writes what arrived within
``flush_delay_s`` in one transaction (one thread hop and one prune per group, the newest answer
of a key only). A process killed in that window loses those entries, as a power cut may lose
the newest ones already (a cache miss, never a wrong answer); ``flush()``/``close()`` write them.

Only successful results of read-only (``side_effect: false``) actions belong here; that choice
is the caller's. A row that does not decode (hand-edited, truncated) is logged, deleted and
treated as a miss.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from params_digest import params_hash
from sqlite_file import HYBRID_DB_FILENAME, SqliteFile, Synchronous

if TYPE_CHECKING:
    from config.hybrid_config import HybridConfig

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hybrid_cache (
    action        TEXT NOT NULL,
    params_hash   TEXT NOT NULL,
    response_json TEXT NOT NULL,
    cached_at     REAL NOT NULL,
    PRIMARY KEY (action, params_hash)
);
CREATE INDEX IF NOT EXISTS hybrid_cache_cached_at ON hybrid_cache (cached_at);
"""


@dataclass(frozen=True)
class CacheEntry:
    """One cached response and how old it is."""

    action: str
    params_hash: str
    response: Any
    cached_at: datetime
    age_s: float


class OfflineCache:
    """Last-good responses of read-only actions, bounded by age and row count."""

    def __init__(
        self,
        path: Path,
        *,
        ttl_s: float = 3600.0,
        max_rows: int = 10_000,
        max_age_s: float = 7 * 86400,
        clock: Callable[[], float] = time.time,
        flush_delay_s: float = 0.05,
    ) -> None:
        if ttl_s <= 0 or max_rows < 1 or max_age_s <= 0:
            raise ValueError("ttl_s and max_age_s must be > 0 and max_rows >= 1")
        self.path = Path(path)
        self.ttl_s = ttl_s
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self._clock = clock
        self.flush_delay_s = flush_delay_s
        # Entries remembered but not written yet, newest per key: (response_json, cached_at).
        self._unwritten: dict[tuple[str, str], tuple[str, float]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Future[None] | None = None
        # NORMAL: a power cut may lose the latest entries of a cache, never corrupt it.
        self._db = SqliteFile(self.path, synchronous=Synchronous.NORMAL, name="offline-cache")

    @classmethod
    def from_config(cls, config: HybridConfig) -> OfflineCache:
        """Cache in ``DATA_DIR/hybrid.sqlite3`` with ``CACHE_TTL_SEC``."""
        # Stale entries stay at least a week: the stale answer is what an offline error shows.
        return cls(
            config.data_dir / HYBRID_DB_FILENAME,
            ttl_s=config.cache_ttl_sec,
            max_age_s=max(7 * 86400, config.cache_ttl_sec),
        )

    async def open(self) -> None:
        await self._db.open(_SCHEMA)

    async def close(self) -> None:
        """Write the remembered entries, then close the file (idempotent)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            if self._writing is not None:
                await asyncio.wait([self._writing])
            if self._db.is_open:
                await self.flush()
        finally:
            await self._db.close()

    async def put(self, action: str, params: Mapping[str, Any], response: Any) -> None:
        """Store ``response`` as the last good answer of ``action(params)``; prune the table."""
        if self.remember(action, params, response):
            await self.flush()

    def remember(self, action: str, params: Mapping[str, Any], response: Any) -> bool:
        """Keep ``response`` as the last good answer, written within ``flush_delay_s``; no I/O.

        False (and logged) if it is not JSON, which is then not cached at all.
        """
        try:
            response_json = json.dumps(response, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            log.warning("not caching %s: the response is not JSON-serialisable (%s)", action, exc)
            return False
        self._unwritten[(action, params_hash(params))] = (response_json, self._clock())
        self._write_later()
        return True

    def _write_later(self) -> None:
        if self._timer is None and self._writing is None and self._db.is_open:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.flush_delay_s, self._start_writing)

    def _start_writing(self) -> None:
        self._timer = None
        self._writing = asyncio.ensure_future(self._write_logged())
        self._writing.add_done_callback(self._written)

    def _written(self, _: asyncio.Future[None]) -> None:
        self._writing = None
        if self._unwritten:  # remembered while the group was being written
            self._write_later()

    async def _write_logged(self) -> None:
        try:
            await self._write_unwritten()
        except Exception:  # a cache: the entries are lost, the calls they answered are not
            log.exception("offline cache: could not write the latest entries")

    async def flush(self) -> None:
        """Write every remembered entry now (errors raised to the caller)."""
        await self._write_unwritten()

    async def _write_unwritten(self) -> None:
        if not self._unwritten:
            return
        rows = [(a, k, text, at) for (a, k), (text, at) in self._unwritten.items()]
        self._unwritten = {}
        now = max(at for *_, at in rows)

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO hybrid_cache (action, params_hash, response_json, cached_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (action, params_hash) DO UPDATE SET "
                "response_json = excluded.response_json, cached_at = excluded.cached_at",
                rows,
            )
            conn.execute("DELETE FROM hybrid_cache WHERE cached_at < ?", (now - self.max_age_s,))
            (count,) = conn.execute("SELECT count(*) FROM hybrid_cache").fetchone()
            if count > self.max_rows:
                conn.execute(
                    "DELETE FROM hybrid_cache WHERE rowid IN (SELECT rowid FROM hybrid_cache "
                    "ORDER BY cached_at ASC LIMIT ?)",
                    (count - self.max_rows,),
                )

        await self._db.write(write)

    async def get(self, action: str, params: Mapping[str, Any]) -> CacheEntry | None:
        """Return the entry for ``action(params)`` if it is younger than the TTL."""
        entry = await self._read(action, params)
        if entry is None or entry.age_s >= self.ttl_s:
            return None
        return entry

    async def get_stale(self, action: str, params: Mapping[str, Any]) -> CacheEntry | None:
        """Return the entry for ``action(params)`` whatever its age, if one is stored."""
        return await self._read(action, params)

    async def _read(self, action: str, params: Mapping[str, Any]) -> CacheEntry | None:
        key = params_hash(params)
        row = self._unwritten.get((action, key)) or await self._db.run(
            lambda conn: conn.execute(
                "SELECT response_json, cached_at FROM hybrid_cache "
                "WHERE action = ? AND params_hash = ?",
                (action, key),
            ).fetchone()
        )
        if row is None:
            return None
        response_json, cached_at = row
        try:
            response = json.loads(response_json)
            cached_at_s = float(cached_at)
            when = datetime.fromtimestamp(cached_at_s, UTC)
        except (TypeError, ValueError, OverflowError, OSError) as exc:
            log.error(
                "offline cache: dropping the unreadable row for %s (params_hash %s): %s",
                action,
                key,
                exc,
            )
            await self._delete(action, key)
            return None
        age_s = max(0.0, self._clock() - cached_at_s)
        return CacheEntry(action, key, response, when, age_s)

    async def _delete(self, action: str, key: str) -> None:
        await self._db.run(
            lambda conn: conn.execute(
                "DELETE FROM hybrid_cache WHERE action = ? AND params_hash = ?", (action, key)
            )
        )

    async def size(self) -> int:
        """Number of stored entries, fresh or stale."""
        await self.flush()
        (rows,) = await self._db.run(
            lambda conn: conn.execute("SELECT count(*) FROM hybrid_cache").fetchone()
        )
        return int(rows)
