"""PostgresIdempotencyStore: idempotency records shared by every replica, in PostgreSQL.

Used when ``DATABASE_URL`` / ``SUPABASE_DB_URL`` is set. Each claim is one atomic statement: a
new key is ``INSERT … ON CONFLICT DO NOTHING RETURNING``; taking over a dead holder's key or
parking it as indeterminate is an ``UPDATE … WHERE holder = <the holder seen>``, so of two
replicas racing for one key exactly one wins. Heartbeats and their ages use the database's
clock, so replicas' clocks need not agree. psycopg is imported lazily.
"""

from __future__ import annotations

import json
from typing import Any

from errors import StorageUnavailable
from idempotency import (
    KEEP_S,
    LEASE_S,
    Claim,
    ClaimState,
    ClaimStore,
    Heartbeat,
    Holder,
    KeyState,
    StoredKey,
    Verdict,
    current_holder,
)

TABLE = "everreach_idempotency"
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    key           text PRIMARY KEY,
    action        text NOT NULL,
    params_hash   text NOT NULL,
    state         text NOT NULL,
    status_code   integer,
    response_json text,
    holder        text,
    claimed_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz
);
CREATE INDEX IF NOT EXISTS {TABLE}_holder ON {TABLE} (holder) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS {TABLE}_completed ON {TABLE} (completed_at);
"""
_COLUMNS = (
    "action, params_hash, state, status_code, response_json, holder, "
    "extract(epoch FROM now() - heartbeat_at)::float8"
)


class PostgresIdempotencyStore(ClaimStore):
    """Claims of idempotency keys in one PostgreSQL table shared by every replica."""

    def __init__(
        self,
        dsn: str,
        *,
        lease_s: float = LEASE_S,
        keep_s: float = KEEP_S,
        holder: Holder | None = None,
        pool_max_size: int = 10,
        connect_timeout_s: float = 5.0,
        statement_timeout_s: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self._lease_s = lease_s
        self._keep_s = keep_s
        self.holder = holder or current_holder()
        self._pool_max_size = pool_max_size
        self._connect_timeout_s = connect_timeout_s
        self._statement_timeout_s = statement_timeout_s
        self._pool: Any = None
        self._heartbeat = Heartbeat(self.renew, lease_s)
        self._claims = 0
        self._schema_ready = False

    async def _configure(self, conn: Any) -> None:
        await conn.execute(f"SET statement_timeout = {int(self._statement_timeout_s * 1000)}")

    async def open(self) -> None:
        """Start the pool; a database that is down makes claims answer 503, not start-up fail."""
        if self._pool is not None:
            return
        from psycopg_pool import AsyncConnectionPool

        self._pool = AsyncConnectionPool(
            self._dsn,
            min_size=1,
            max_size=self._pool_max_size,
            open=False,
            timeout=self._connect_timeout_s + self._statement_timeout_s,
            name="idempotency",
            configure=self._configure,
            # No server-side prepared statements: they break behind PgBouncer in transaction mode.
            kwargs={"autocommit": True, "prepare_threshold": None},
        )
        await self._pool.open(wait=False)
        self._heartbeat.start()

    async def _ensure_schema(self, conn: Any) -> None:
        async with conn.transaction():
            # Several replicas starting at once: one runs the DDL, the others wait for it.
            await conn.execute(f"SELECT pg_advisory_xact_lock(hashtext('{TABLE} schema'))")
            await conn.execute(_SCHEMA.encode())
        self._schema_ready = True

    async def close(self) -> None:
        await self._heartbeat.stop()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _fetch(self, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        import psycopg
        from psycopg_pool import PoolTimeout

        if self._pool is None:
            raise StorageUnavailable("the idempotency records (PostgreSQL) are not open")
        try:
            async with self._pool.connection() as conn:
                if not self._schema_ready:
                    await self._ensure_schema(conn)
                cursor = await conn.execute(sql, args)
                row = await cursor.fetchone() if cursor.description else None
        except (PoolTimeout, psycopg.Error) as exc:
            raise StorageUnavailable(f"idempotency records in PostgreSQL: {exc}") from exc
        return tuple(row) if row is not None else None

    async def claim(
        self, key: str, action: str, params_hash: str, rerun_if_dead: bool = False
    ) -> Claim:
        """Claim ``key`` for this call, or say why not (one atomic statement per step)."""
        me = self.holder.token
        while True:
            inserted = await self._fetch(
                f"INSERT INTO {TABLE} (key, action, params_hash, state, holder) "
                "VALUES (%s, %s, %s, 'running', %s) ON CONFLICT (key) DO NOTHING RETURNING key",
                (key, action, params_hash, me),
            )
            if inserted is not None:
                return self._took()
            row = await self._fetch(f"SELECT {_COLUMNS} FROM {TABLE} WHERE key = %s", (key,))
            if row is None:
                continue  # released between the two statements: try again
            record = StoredKey(*row)
            verdict = self.judge(record, action, params_hash, rerun_if_dead)
            if isinstance(verdict, Claim):
                await self._maybe_prune()
                return verdict
            if verdict is Verdict.TAKE:
                taken = await self._fetch(
                    f"UPDATE {TABLE} SET action = %s, params_hash = %s, state = 'running', "
                    "holder = %s, claimed_at = now(), heartbeat_at = now(), status_code = NULL, "
                    "response_json = NULL, completed_at = NULL "
                    "WHERE key = %s AND state = %s AND holder IS NOT DISTINCT FROM %s "
                    "RETURNING key",
                    (action, params_hash, me, key, record.state, record.holder),
                )
                if taken is not None:
                    return self._took()
                continue  # another replica changed it first: look again
            parked = await self._fetch(
                f"UPDATE {TABLE} SET state = 'indeterminate', completed_at = now() "
                "WHERE key = %s AND state = 'running' AND holder IS NOT DISTINCT FROM %s "
                "RETURNING key",
                (key, record.holder),
            )
            if parked is not None:
                return Claim(ClaimState.INDETERMINATE)

    def _took(self) -> Claim:
        self._heartbeat.held += 1
        return Claim(ClaimState.NEW)

    async def complete(self, key: str, status_code: int, body: Any) -> None:
        self._heartbeat.held -= 1
        await self._fetch(
            f"UPDATE {TABLE} SET state = 'done', status_code = %s, response_json = %s, "
            "completed_at = now() WHERE key = %s AND state = 'running' AND holder = %s",
            (status_code, json.dumps(body), key, self.holder.token),
        )

    async def release(self, key: str, *, ran: bool = True) -> None:
        self._heartbeat.held -= 1
        if ran:
            sql = (
                f"UPDATE {TABLE} SET state = 'failed', holder = NULL, completed_at = now() "
                "WHERE key = %s AND state = 'running' AND holder = %s"
            )
        else:
            sql = f"DELETE FROM {TABLE} WHERE key = %s AND state = 'running' AND holder = %s"
        await self._fetch(sql, (key, self.holder.token))

    async def lookup(self, key: str) -> KeyState:
        row = await self._fetch(f"SELECT {_COLUMNS} FROM {TABLE} WHERE key = %s", (key,))
        if row is None:
            return KeyState.UNKNOWN
        return StoredKey(*row).key_state(self.holder, self._lease_s)

    async def renew(self) -> None:
        await self._fetch(
            f"UPDATE {TABLE} SET heartbeat_at = now() WHERE holder = %s AND state = 'running'",
            (self.holder.token,),
        )

    async def size(self) -> int:
        row = await self._fetch(f"SELECT count(*) FROM {TABLE}", ())
        return int(row[0]) if row else 0

    async def _maybe_prune(self, every: int = 1000) -> None:
        self._claims += 1
        if self._claims % every == 0:
            await self._fetch(
                f"DELETE FROM {TABLE} WHERE state != 'running' "
                "AND completed_at < now() - make_interval(secs => %s)",
                (self._keep_s,),
            )
