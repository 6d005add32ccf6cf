"""Where the Pacer keeps its buckets: SQLite (one instance), PostgreSQL or Redis (shared).

Each runs ``pacing.decide`` atomically: SQLite inside ``BEGIN IMMEDIATE``, PostgreSQL under an
advisory lock per bucket, Redis as one Lua script that mirrors it line for line over a sorted
set. Each raises ``PacingUnavailable`` when it cannot answer; the Pacer then defers (fails
closed).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacing import Op, Outcome, PacingUnavailable, Rule, Slot, SlotStatus, decide
from redis_client import RedisRef
from sqlite_file import SqliteFile, Synchronous, transaction

if TYPE_CHECKING:
    import redis.asyncio as aioredis

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS pace_slots (
    bucket TEXT NOT NULL, slot_id TEXT NOT NULL, at_s REAL NOT NULL, hold INTEGER NOT NULL,
    PRIMARY KEY (bucket, slot_id, hold)
);
CREATE INDEX IF NOT EXISTS pace_slots_by_time ON pace_slots (bucket, at_s);
"""
_POSTGRES_SCHEMA = _SQLITE_SCHEMA.replace("REAL", "DOUBLE PRECISION")

# The statements both SQL stores run, with SQLite's ``?`` (PostgreSQL: ``%s``).
_TRIM = "DELETE FROM pace_slots WHERE bucket = ? AND at_s < ?"
# Older slots cannot change the decision; only the claimed hold may be older. Two indexed
# lookups: one OR across both would scan the whole bucket.
_LOAD = (
    "SELECT at_s, slot_id, hold FROM pace_slots WHERE bucket = ? AND at_s >= ?"
    " UNION SELECT at_s, slot_id, hold FROM pace_slots"
    " WHERE bucket = ? AND slot_id = ? AND hold = 1 ORDER BY 1, 2"
)
_REMOVE_HOLD = "DELETE FROM pace_slots WHERE bucket = ? AND slot_id = ? AND hold = 1"
_ADD = (
    "INSERT INTO pace_slots (bucket, slot_id, at_s, hold) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (bucket, slot_id, hold) DO UPDATE SET at_s = excluded.at_s"
)
_SLOTS = (
    "SELECT at_s, slot_id, hold FROM pace_slots WHERE bucket = ? AND at_s >= ?"
    " ORDER BY at_s, slot_id"
)

Statement = tuple[str, tuple[Any, ...]]


def _before(bucket: str, rule: Rule, now_s: float, slot_id: str) -> tuple[Statement, Statement]:
    """The trim and the load that precede a decision."""
    return (
        (_TRIM, (bucket, now_s - rule.trim_s)),
        (_LOAD, (bucket, now_s - rule.keep_s, bucket, slot_id)),
    )


def _after(bucket: str, outcome: Outcome) -> list[Statement]:
    """The writes that record a decision."""
    writes: list[Statement] = []
    if outcome.remove is not None:
        writes.append((_REMOVE_HOLD, (bucket, outcome.remove)))
    if outcome.add is not None:
        add = outcome.add
        writes.append((_ADD, (bucket, add.slot_id, add.at_s, int(add.hold))))
    return writes


def _slots(rows: list[Any]) -> list[Slot]:
    return [Slot(float(t), str(sid), bool(hold)) for t, sid, hold in rows]


class SqlitePaceStore:
    """Buckets in an SQLite file: one instance, or several processes on one machine.

    ``BEGIN IMMEDIATE`` takes the write lock before reading the bucket, so two connections
    (or processes) deciding at once are serialised.
    """

    name = "sqlite"

    def __init__(self, path: Path) -> None:
        # NORMAL: a killed process loses no commit in WAL mode; only a power cut may forget the
        # last slots, which at worst lets one window run a little over after the reboot.
        self._file = SqliteFile(path, synchronous=Synchronous.NORMAL, name="pacing")

    async def open(self) -> None:
        try:
            await self._file.open(_SQLITE_SCHEMA)
        except sqlite3.Error as exc:
            raise PacingUnavailable(f"pacing store {self._file.path}: {exc}") from exc

    async def aclose(self) -> None:
        await self._file.close()

    async def _run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            return await self._file.run(lambda conn: transaction(conn, fn))
        except (sqlite3.Error, RuntimeError) as exc:
            raise PacingUnavailable(f"pacing store {self._file.path}: {exc}") from exc

    async def decide(self, bucket: str, op: Op, rule: Rule, now_s: float, slot_id: str) -> Outcome:
        def work(conn: sqlite3.Connection) -> Outcome:
            trim, load = _before(bucket, rule, now_s, slot_id)
            conn.execute(*trim)
            outcome = decide(_slots(conn.execute(*load).fetchall()), op, rule, now_s, slot_id)
            for statement in _after(bucket, outcome):
                conn.execute(*statement)
            return outcome

        result: Outcome = await self._run(work)
        return result

    async def release(self, bucket: str, slot_id: str) -> None:
        await self._run(lambda conn: conn.execute(_REMOVE_HOLD, (bucket, slot_id)))

    async def slots(self, bucket: str, since_s: float) -> list[Slot]:
        rows = await self._run(lambda conn: conn.execute(_SLOTS, (bucket, since_s)).fetchall())
        return _slots(rows)


class PostgresPaceStore:
    """Buckets in PostgreSQL, shared by every instance on the database.

    A transaction-scoped advisory lock per bucket serialises deciders; the table is created if
    it does not exist. psycopg is imported when the store opens, never at import time.
    """

    name = "postgres"

    def __init__(
        self, dsn: str, *, pool_max_size: int = 5, timeout_s: float = 2.0, retry_s: float = 10.0
    ) -> None:
        self._dsn = dsn
        self._pool_max_size = pool_max_size
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._last_attempt = float("-inf")
        self._pool: Any = None

    async def open(self) -> None:
        if self._pool is not None:
            return
        from psycopg_pool import AsyncConnectionPool

        self._last_attempt = time.monotonic()
        pool = AsyncConnectionPool(
            self._dsn,
            min_size=1,
            max_size=self._pool_max_size,
            open=False,
            timeout=self._timeout_s,
            name="pacing",
            # Unprepared: server-side statements break behind PgBouncer in transaction mode.
            kwargs={"autocommit": True, "prepare_threshold": None, "connect_timeout": 3},
        )
        try:
            try:
                await pool.open(wait=True, timeout=self._timeout_s)
            except Exception as exc:  # PoolTimeout: the database is down or refuses us
                raise PacingUnavailable(f"pacing store (PostgreSQL): {exc}") from exc
            self._pool = pool
            # Instances starting together: one creates the table, the others wait for it.
            schema = _POSTGRES_SCHEMA.encode()
            await self._transaction(lambda cur: cur.execute(schema), lock="schema")
        except BaseException:
            self._pool = None
            await pool.close()
            raise

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _reopen(self) -> None:
        """Try again to open a store that was down at start-up, at most every ``retry_s``."""
        now = time.monotonic()
        if now - self._last_attempt < self._retry_s:
            raise PacingUnavailable("pacing store (PostgreSQL) is not reachable yet")
        self._last_attempt = now
        await self.open()

    async def _transaction(self, work: Callable[[Any], Any], *, lock: str | None = None) -> Any:
        import psycopg
        from psycopg_pool import PoolTimeout

        if self._pool is None:
            await self._reopen()
        try:
            async with self._pool.connection() as conn, conn.transaction():
                cur = conn.cursor()
                if lock is not None:
                    await cur.execute(
                        "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                        ("everreach pace_slots " + lock,),
                    )
                return await work(cur)
        except (PoolTimeout, psycopg.Error) as exc:
            raise PacingUnavailable(f"pacing store (PostgreSQL): {exc}") from exc

    async def decide(self, bucket: str, op: Op, rule: Rule, now_s: float, slot_id: str) -> Outcome:
        async def work(cur: Any) -> Outcome:
            trim, load = _before(bucket, rule, now_s, slot_id)
            await cur.execute(*_pg(trim))
            await cur.execute(*_pg(load))
            outcome = decide(_slots(await cur.fetchall()), op, rule, now_s, slot_id)
            for statement in _after(bucket, outcome):
                await cur.execute(*_pg(statement))
            return outcome

        result: Outcome = await self._transaction(work, lock=f"bucket {bucket}")
        return result

    async def release(self, bucket: str, slot_id: str) -> None:
        await self._transaction(lambda cur: cur.execute(*_pg((_REMOVE_HOLD, (bucket, slot_id)))))

    async def slots(self, bucket: str, since_s: float) -> list[Slot]:
        async def work(cur: Any) -> list[Slot]:
            await cur.execute(*_pg((_SLOTS, (bucket, since_s))))
            return _slots(await cur.fetchall())

        result: list[Slot] = await self._transaction(work)
        return result


def _pg(statement: Statement) -> Statement:
    sql, params = statement
    return sql.replace("?", "%s"), params


# ``decide`` in Lua, over a sorted set (score = slot time, member = "r:" + id for a run, "h:" +
# id for a hold). Numbers cross into Redis as %.17g strings: Redis would otherwise print them
# with 14 digits and lose milliseconds.
_DECIDE_LUA = """
local key, op, slot = KEYS[1], ARGV[1], ARGV[9]
local hold_m, run_m = 'h:' .. slot, 'r:' .. slot
local now, max, per = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local gap, jitter = tonumber(ARGV[5]), tonumber(ARGV[6])
local keep, horizon, trim = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[10])
local late = tonumber(ARGV[11])

local function fmt(t) return string.format('%.17g', t) end

local function leave_quiet(t)
  for i = 12, #ARGV, 2 do
    local s, e = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
    if t >= s and t < e then t = e end
  end
  if t >= horizon then return nil end
  return t
end

local function next_slot()
  local t = now
  local n = redis.call('ZCARD', key)
  if n > 0 then
    local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    t = math.max(t, tonumber(last[2]) + gap + jitter)
    if n >= max then
      local kth = redis.call('ZRANGE', key, -max, -max, 'WITHSCORES')
      t = math.max(t, tonumber(kth[2]) + per)
    end
  end
  return leave_quiet(t)
end

local function fits(x)
  if leave_quiet(x) ~= x then return false end
  -- What counts: runs, and holds still ahead of now (overdue holds have not run yet).
  local raw = redis.call('ZRANGEBYSCORE', key, fmt(x - per - gap), fmt(x + per + gap), 'WITHSCORES')
  local times = {}
  for i = 1, #raw, 2 do
    local t = tonumber(raw[i + 1])
    if not (string.sub(raw[i], 1, 2) == 'h:' and t <= now) then times[#times + 1] = t end
  end
  local starts = {x}
  for _, t in ipairs(times) do
    if math.abs(t - x) < gap then return false end
    if t > x - per and t <= x then starts[#starts + 1] = t end
  end
  -- The fullest window [s, s + per) holding x starts at x or at a slot in (x - per, x].
  for _, s in ipairs(starts) do
    local inside = 1
    for _, t in ipairs(times) do
      if t >= s and t < s + per then inside = inside + 1 end
    end
    if inside > max then return false end
  end
  return true
end

local function book(member, t)
  redis.call('ZADD', key, fmt(t), member)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  local ttl_ms = math.ceil((tonumber(last[2]) - now + trim) * 1000)
  redis.call('PEXPIRE', key, math.max(ttl_ms, 1000))
end

redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. fmt(now - trim))
if op == 'claim' then
  local held = redis.call('ZSCORE', key, hold_m)
  if held then
    held = tonumber(held)
    if held > now then return {'early', fmt(held)} end
    redis.call('ZREM', key, hold_m)
    if now - held <= late then book(run_m, held); return {'ok', fmt(held)} end
    if fits(now) then book(run_m, now); return {'ok', fmt(now)} end
    local t = next_slot()
    if not t then return {'far', ''} end
    book(hold_m, t)
    return {'booked', fmt(t)}
  end
  op = 'reserve'
end
local t = next_slot()
if not t then return {'far', ''} end
if t <= now then book(run_m, now); return {'ok', fmt(now)} end
if op == 'acquire' then return {'busy', fmt(t)} end
book(hold_m, t)
return {'booked', fmt(t)}
"""


class RedisPaceStore:
    """Buckets as Redis sorted sets, shared by every replica; one Lua script per decision."""

    name = "redis"

    def __init__(
        self,
        redis_url: str | None,
        *,
        prefix: str = "everreach:pace:",
        socket_timeout_s: float = 1.0,
        redis: aioredis.Redis | None = None,
    ) -> None:
        """``redis`` is the process's shared client (borrowed, never closed here); without
        it, ``open()`` opens one of ``redis_url``."""
        self._ref = RedisRef(redis_url, redis, socket_timeout_s=socket_timeout_s, block_s=0.0)
        self._prefix = prefix
        self._redis: Any = None
        self._script: Any = None

    async def open(self) -> None:
        if self._redis is None:
            self._redis = self._ref.open()
            self._script = self._redis.register_script(_DECIDE_LUA)

    async def aclose(self) -> None:
        self._redis = None
        await self._ref.close()

    async def _call(self, make: Callable[[Any], Any]) -> Any:
        import redis

        if self._redis is None:
            raise PacingUnavailable("pacing store (Redis) is not open")
        try:
            return await make(self._redis)
        except (redis.RedisError, OSError) as exc:
            raise PacingUnavailable(f"pacing store (Redis): {type(exc).__name__}: {exc}") from exc

    async def decide(self, bucket: str, op: Op, rule: Rule, now_s: float, slot_id: str) -> Outcome:
        args: list[str] = [
            op.value,
            *(repr(float(v)) for v in (now_s, rule.max, rule.per_s, rule.min_interval_s)),
            *(repr(float(v)) for v in (rule.jitter_s, rule.keep_s, rule.horizon_s)),
            slot_id,
            repr(float(rule.trim_s)),
            repr(float(rule.late_s)),
            *(repr(float(v)) for span in rule.quiet for v in span),
        ]
        status, at = await self._call(
            lambda _: self._script(keys=[self._prefix + bucket], args=args)
        )
        result = SlotStatus(status)
        if result is SlotStatus.FAR:
            return Outcome(result, None)
        at_s = float(at)
        if result in (SlotStatus.OK, SlotStatus.BOOKED):
            return Outcome(result, at_s, add=Slot(at_s, slot_id, result is SlotStatus.BOOKED))
        return Outcome(result, at_s)

    async def release(self, bucket: str, slot_id: str) -> None:
        await self._call(lambda client: client.zrem(self._prefix + bucket, "h:" + slot_id))

    async def slots(self, bucket: str, since_s: float) -> list[Slot]:
        rows = await self._call(
            lambda client: client.zrangebyscore(
                self._prefix + bucket, repr(float(since_s)), "+inf", withscores=True
            )
        )
        return [Slot(float(score), member[2:], member.startswith("h:")) for member, score in rows]
