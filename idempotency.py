"""IdempotencyStore: the serving side's memory of ``Idempotency-Key``s, durable in SQLite.

A key is *claimed* before the handler runs and *completed* with the answer afterwards, so:

- the same key again returns the stored answer without running the handler a second time;
- the same key with another action or other params is refused (422): it is a client bug;
- the same key while the first call still runs waits for it, then answers 409 if it is slow.

A handler that fails releases its claim, so the caller's retry may run it again (a failure
changed nothing the caller can rely on). A claim left ``running`` by a crashed process is taken
over after ``lease_s``. Completed keys are kept ``keep_s`` (7 days), longer than any outbox
replay waits.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlite_file import HYBRID_DB_FILENAME, SqliteFile, Synchronous, transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hybrid_idempotency (
    key TEXT PRIMARY KEY,
    action TEXT NOT NULL,
    params_hash TEXT NOT NULL,
    state TEXT NOT NULL,
    status_code INTEGER,
    response_json TEXT,
    claimed_at REAL NOT NULL,
    completed_at REAL
);
CREATE INDEX IF NOT EXISTS hybrid_idempotency_completed ON hybrid_idempotency (completed_at);
"""


class ClaimState(StrEnum):
    NEW = "new"  # the caller owns the key now: run the handler, then complete() or release()
    DONE = "done"  # a stored answer: return it
    RUNNING = "running"  # another call holds the key
    MISMATCH = "mismatch"  # the key was used for another action or other params


@dataclass(frozen=True, slots=True)
class Claim:
    state: ClaimState
    status_code: int | None = None
    body: Any = None


async def _claim_waiting(
    claim: Callable[[str, str, str], Awaitable[Claim]],
    key: str,
    action: str,
    params_hash: str,
    timeout_s: float,
) -> Claim:
    """Claim, polling with backoff while another call holds the key, up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    delay_s = 0.02
    while True:
        result = await claim(key, action, params_hash)
        if result.state is not ClaimState.RUNNING or time.monotonic() >= deadline:
            return result
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, 0.5)


class IdempotencyStore:
    """Claims, answers and releases of idempotency keys."""

    def __init__(
        self,
        path: Path,
        *,
        lease_s: float = 600.0,
        keep_s: float = 7 * 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = SqliteFile(path, synchronous=Synchronous.FULL, name="idempotency")
        self._lease_s = lease_s
        self._keep_s = keep_s
        self._clock = clock
        self._last_prune = 0.0

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> IdempotencyStore:
        return cls(data_dir / HYBRID_DB_FILENAME)

    async def open(self) -> None:
        await self._db.open(_SCHEMA)

    async def close(self) -> None:
        await self._db.close()

    async def claim(self, key: str, action: str, params_hash: str) -> Claim:
        """Claim ``key`` for this call, or say why not."""
        now = self._clock()

        def work(conn: sqlite3.Connection) -> Claim:
            row = conn.execute(
                "SELECT action, params_hash, state, status_code, response_json, claimed_at "
                "FROM hybrid_idempotency WHERE key = ?",
                (key,),
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO hybrid_idempotency (key, action, params_hash, state, claimed_at) "
                    "VALUES (?, ?, ?, 'running', ?)",
                    (key, action, params_hash, now),
                )
                return Claim(ClaimState.NEW)
            if row[0] != action or row[1] != params_hash:
                return Claim(ClaimState.MISMATCH)
            if row[2] == "done":
                return Claim(ClaimState.DONE, row[3], json.loads(row[4]))
            if now - row[5] >= self._lease_s:
                conn.execute(
                    "UPDATE hybrid_idempotency SET claimed_at = ? WHERE key = ?", (now, key)
                )
                return Claim(ClaimState.NEW)
            return Claim(ClaimState.RUNNING)

        claim = await self._db.run(lambda conn: transaction(conn, work))
        if now - self._last_prune > 3600:
            self._last_prune = now
            await self._prune(now)
        return claim

    async def wait(self, key: str, action: str, params_hash: str, *, timeout_s: float) -> Claim:
        """Claim, waiting up to ``timeout_s`` while another call holds the key."""
        return await _claim_waiting(self.claim, key, action, params_hash, timeout_s)

    async def complete(self, key: str, status_code: int, body: Any) -> None:
        """Store the answer of a successful call under ``key``."""
        text = json.dumps(body)
        await self._db.run(
            lambda conn: conn.execute(
                "UPDATE hybrid_idempotency SET state = 'done', status_code = ?, "
                "response_json = ?, completed_at = ? WHERE key = ?",
                (status_code, text, self._clock(), key),
            )
        )

    async def release(self, key: str) -> None:
        """Forget a claim whose call failed, so a retry may run it again."""
        await self._db.run(
            lambda conn: conn.execute(
                "DELETE FROM hybrid_idempotency WHERE key = ? AND state = 'running'", (key,)
            )
        )

    async def size(self) -> int:
        row = await self._db.run(
            lambda conn: conn.execute("SELECT COUNT(*) FROM hybrid_idempotency").fetchone()
        )
        return int(row[0])

    async def _prune(self, now: float) -> None:
        cutoff = now - self._keep_s
        await self._db.run(
            lambda conn: conn.execute(
                "DELETE FROM hybrid_idempotency WHERE state = 'done' AND completed_at < ?",
                (cutoff,),
            )
        )


_RELEASE_IF_RUNNING = """
local value = redis.call('GET', KEYS[1])
if value and cjson.decode(value)['state'] == 'running' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisIdempotencyStore:
    """The same claims in Redis, shared by every replica (DESIGN.md §10).

    A claim is ``SET key NX PX lease``: the expiry is the lease, so a crashed holder's claim
    lapses by itself. When Redis does not answer, calls fall back to this instance's SQLite
    store (``fallback``): one instance never runs a key twice; replicas may, during the outage.
    """

    def __init__(
        self,
        redis_url: str,
        fallback: IdempotencyStore,
        *,
        lease_s: float = 600.0,
        keep_s: float = 7 * 86400.0,
        prefix: str = "everreach:idem:",
        socket_timeout_s: float = 2.0,
    ) -> None:
        self._url = redis_url
        self._fallback = fallback
        self._lease_ms = int(lease_s * 1000)
        self._keep_s = int(keep_s)
        self._prefix = prefix
        self._timeout_s = socket_timeout_s
        self._redis: Any = None
        self._local_keys: set[str] = set()  # claims taken in the fallback while Redis was down

    async def open(self) -> None:
        import redis.asyncio as aioredis

        await self._fallback.open()
        self._redis = aioredis.Redis.from_url(
            self._url,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=self._timeout_s,
            decode_responses=True,
        )

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        await self._fallback.close()

    async def claim(self, key: str, action: str, params_hash: str) -> Claim:
        import redis

        record = json.dumps({"state": "running", "action": action, "params_hash": params_hash})
        try:
            if await self._redis.set(self._prefix + key, record, nx=True, px=self._lease_ms):
                return Claim(ClaimState.NEW)
            raw = await self._redis.get(self._prefix + key)
        except (redis.RedisError, OSError):
            self._local_keys.add(key)
            return await self._fallback.claim(key, action, params_hash)
        if raw is None:  # expired between SET and GET: try once more
            return await self.claim(key, action, params_hash)
        stored = json.loads(raw)
        if stored.get("action") != action or stored.get("params_hash") != params_hash:
            return Claim(ClaimState.MISMATCH)
        if stored.get("state") == "done":
            return Claim(ClaimState.DONE, stored.get("status_code"), stored.get("body"))
        return Claim(ClaimState.RUNNING)

    async def wait(self, key: str, action: str, params_hash: str, *, timeout_s: float) -> Claim:
        """Claim, waiting up to ``timeout_s`` while another call holds the key."""
        return await _claim_waiting(self.claim, key, action, params_hash, timeout_s)

    async def complete(self, key: str, status_code: int, body: Any) -> None:
        import redis

        if key in self._local_keys:
            self._local_keys.discard(key)
            await self._fallback.complete(key, status_code, body)
            return
        try:
            raw = await self._redis.get(self._prefix + key)
            stored = json.loads(raw) if raw else {}
            record = json.dumps(
                {
                    "state": "done",
                    "action": stored.get("action"),
                    "params_hash": stored.get("params_hash"),
                    "status_code": status_code,
                    "body": body,
                }
            )
            await self._redis.set(self._prefix + key, record, ex=self._keep_s)
        except (redis.RedisError, OSError):
            await self._fallback.complete(key, status_code, body)

    async def release(self, key: str) -> None:
        import redis

        if key in self._local_keys:
            self._local_keys.discard(key)
            await self._fallback.release(key)
            return
        try:
            await self._redis.eval(_RELEASE_IF_RUNNING, 1, self._prefix + key)
        except (redis.RedisError, OSError):
            await self._fallback.release(key)

    async def size(self) -> int:
        return await self._fallback.size()
