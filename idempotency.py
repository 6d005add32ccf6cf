"""IdempotencyStore: the serving side's memory of ``Idempotency-Key``s, durable in SQLite.

A key is *claimed* before the handler runs and *completed* with the answer afterwards, so:

- the same key again returns the stored answer without running the handler a second time;
- the same key with another action or other params is refused (422): it is a client bug;
- the same key while the first call still runs waits for it briefly, then answers 409.

A claim belongs to its holder: this process, named by where its process id is meaningful (the
kernel's boot id and pid namespace), its pid and its start time. A claim whose holder is gone
— a restarted process sees at once that its previous life is dead; another machine sees the
holder's heartbeat stop for ``lease_s`` — is *indeterminate*: the handler may or may not have
acted. It is never re-run silently: ``claim(..., rerun_if_dead=True)`` takes it over (for
actions the route table marks idempotent); otherwise the claim answers ``INDETERMINATE``.

A handler that fails releases its claim, so the caller's retry may run it again (a failure
changed nothing the caller can rely on). Completed keys are kept ``keep_s`` (7 days), longer
than any outbox replay waits.

Stores: ``IdempotencyStore`` (SQLite, one instance), ``RedisIdempotencyStore`` in
``idempotency_redis`` (the SQLite record first, Redis only to share claims with other replicas
while it keeps its data) and ``PostgresIdempotencyStore`` in ``idempotency_pg`` (shared by every
replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any

from sqlite_file import HYBRID_DB_FILENAME, GroupCommit, SqliteFile, Synchronous

log = logging.getLogger(__name__)

# A holder renews its claims every LEASE_S / 3; a claim not renewed for LEASE_S is dead.
LEASE_S = 15.0
KEEP_S = 7 * 86400.0

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
# Columns added after the first release: added to an existing file by open().
_ADDED_COLUMNS = {"holder": "TEXT", "heartbeat_at": "REAL"}


class ClaimState(StrEnum):
    NEW = "new"  # the caller owns the key now: run the handler, then complete() or release()
    DONE = "done"  # a stored answer: return it
    RUNNING = "running"  # a live holder runs the key
    MISMATCH = "mismatch"  # the key was used for another action or other params
    INDETERMINATE = "indeterminate"  # a dead holder may have run it: a person decides


class KeyState(StrEnum):
    """What ``lookup()`` knows of a key (the answer of ``GET /api/idempotency/{key}``)."""

    UNKNOWN = "unknown"  # no handler ever ran this key here
    RUNNING = "running"  # a live holder runs it now
    DONE = "done"  # a handler ran it to its end (answer stored, or it failed and was released)
    INDETERMINATE = "indeterminate"  # its holder died mid-handler: it may have run


class RowState(StrEnum):
    """The ``state`` column."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # the handler failed: free for a retry, but it did run
    INDETERMINATE = "indeterminate"


@dataclass(frozen=True, slots=True)
class Claim:
    state: ClaimState
    status_code: int | None = None
    body: Any = None


# -- who holds a claim ---------------------------------------------------------------------------


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), or None if it is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces) start at field 3; starttime is 22.
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


@dataclass(frozen=True, slots=True)
class Holder:
    """The process that holds a claim: where its pid means something, its pid, its start."""

    node: str
    pid: int
    start: str

    @property
    def token(self) -> str:
        return f"{self.node}/{self.pid}/{self.start}"

    @classmethod
    def parse(cls, token: str | None) -> Holder | None:
        node, _, rest = (token or "").partition("/")
        pid, _, start = rest.partition("/")
        return cls(node, int(pid), start) if node and pid.isdigit() and start else None

    def outlived_by(self, me: Holder) -> bool:
        """Is this holder known dead? Only provable for a process whose pid ``me`` can see."""
        if self.node != me.node or self == me:
            return False
        return _proc_start(self.pid) != self.start


@cache
def current_holder() -> Holder:
    """This process as a claim holder."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        node = f"{boot}:{os.readlink('/proc/self/ns/pid')}"
        start = _proc_start(os.getpid())
    except OSError:
        node, start = "", None
    if not node or start is None:
        # No /proc: a node nobody else has, so only the heartbeat tells this holder's death.
        return Holder(f"n{uuid.uuid4().hex}", os.getpid(), str(time.time_ns()))
    return Holder(node, os.getpid(), start)


@dataclass(frozen=True, slots=True)
class StoredKey:
    """One stored key, as every store reads it."""

    action: str
    params_hash: str
    state: str
    status_code: int | None
    response_json: str | None
    holder: str | None
    heartbeat_age_s: float

    def alive(self, me: Holder, lease_s: float) -> bool:
        if self.holder == me.token:
            return True
        holder = Holder.parse(self.holder)
        dead = holder is None or holder.outlived_by(me) or self.heartbeat_age_s >= lease_s
        return not dead

    def key_state(self, me: Holder, lease_s: float) -> KeyState:
        if self.state in (RowState.DONE, RowState.FAILED):
            return KeyState.DONE
        if self.state == RowState.RUNNING and self.alive(me, lease_s):
            return KeyState.RUNNING
        return KeyState.INDETERMINATE


class Verdict(StrEnum):
    TAKE = "take"  # take the key over (conditionally on its holder): NEW
    PARK = "park"  # mark it indeterminate (conditionally on its holder): INDETERMINATE


def judge(
    record: StoredKey,
    action: str,
    params_hash: str,
    *,
    me: Holder,
    lease_s: float,
    rerun_if_dead: bool,
) -> Claim | Verdict:
    """What a claim of an existing key gets: an answer, or a conditional write to make."""
    if record.state == RowState.FAILED:
        return Verdict.TAKE
    if record.action != action or record.params_hash != params_hash:
        return Claim(ClaimState.MISMATCH)
    if record.state == RowState.DONE:
        body = json.loads(record.response_json) if record.response_json else None
        return Claim(ClaimState.DONE, record.status_code, body)
    if record.state == RowState.RUNNING and record.alive(me, lease_s):
        return Claim(ClaimState.RUNNING)
    if rerun_if_dead:
        return Verdict.TAKE
    if record.state == RowState.RUNNING:
        return Verdict.PARK
    return Claim(ClaimState.INDETERMINATE)


class ClaimStore:
    """What every store shares: ``wait()`` on top of its own ``claim()``, and the verdict."""

    holder: Holder
    _lease_s: float

    def judge(
        self, record: StoredKey, action: str, params_hash: str, rerun_if_dead: bool
    ) -> Claim | Verdict:
        return judge(
            record,
            action,
            params_hash,
            me=self.holder,
            lease_s=self._lease_s,
            rerun_if_dead=rerun_if_dead,
        )

    async def claim(
        self, key: str, action: str, params_hash: str, rerun_if_dead: bool = False
    ) -> Claim:
        raise NotImplementedError

    async def wait(
        self,
        key: str,
        action: str,
        params_hash: str,
        *,
        timeout_s: float,
        rerun_if_dead: bool = False,
    ) -> Claim:
        """Claim, polling with backoff while a live holder runs the key, up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        delay_s = 0.02
        while True:
            result = await self.claim(key, action, params_hash, rerun_if_dead)
            if result.state is not ClaimState.RUNNING or time.monotonic() >= deadline:
                return result
            await asyncio.sleep(min(delay_s, max(0.0, deadline - time.monotonic())))
            delay_s = min(delay_s * 2, 0.5)


class Heartbeat:
    """Renew this holder's running claims every ``lease_s / 3`` while any is held."""

    def __init__(self, beat: Callable[[], Awaitable[None]], lease_s: float) -> None:
        self._beat = beat
        self._interval_s = lease_s / 3
        self.held = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            if self.held <= 0:
                continue
            try:
                await self._beat()
            except Exception:
                log.exception("renewing idempotency claims failed")


# -- SQLite: one instance's durable record -------------------------------------------------------


class IdempotencyStore(ClaimStore):
    """Claims, answers and releases of idempotency keys in this instance's SQLite file."""

    def __init__(
        self,
        path: Path,
        *,
        lease_s: float = LEASE_S,
        keep_s: float = KEEP_S,
        clock: Callable[[], float] = time.time,
        holder: Holder | None = None,
    ) -> None:
        self._db = SqliteFile(path, synchronous=Synchronous.FULL, name="idempotency")
        # Claims, answers and releases made at the same time share one fsync'd transaction:
        # under load (a cloud serving a batch) one commit serves many calls instead of two each.
        self._writes = GroupCommit(self._db)
        self._lease_s = lease_s
        self._keep_s = keep_s
        self._clock = clock
        self.holder = holder or current_holder()
        self._heartbeat = Heartbeat(self.renew, lease_s)
        self._last_prune = 0.0
        # Keys held for an idempotent action (claimed with ``rerun_if_dead``): their claim,
        # answer and release are written without an fsync of their own. Losing one to a power
        # cut only lets the action run again, which its key allows anyway once its holder died.
        self._rerunnable: set[str] = set()

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> IdempotencyStore:
        return cls(data_dir / HYBRID_DB_FILENAME)

    async def open(self) -> None:
        await self._db.open(_SCHEMA)

        def add_columns(conn: sqlite3.Connection) -> None:
            have = {row[1] for row in conn.execute("PRAGMA table_info(hybrid_idempotency)")}
            for name, kind in _ADDED_COLUMNS.items():
                if name not in have:
                    conn.execute(f"ALTER TABLE hybrid_idempotency ADD COLUMN {name} {kind}")

        await self._db.write(add_columns)
        self._heartbeat.start()

    async def close(self) -> None:
        await self._heartbeat.stop()
        await self._db.close()

    async def claim(
        self, key: str, action: str, params_hash: str, rerun_if_dead: bool = False
    ) -> Claim:
        """Claim ``key`` for this call, or say why not."""
        now = self._clock()
        me = self.holder.token

        def work(conn: sqlite3.Connection) -> Claim:
            row = conn.execute(
                "SELECT action, params_hash, state, status_code, response_json, holder, "
                "heartbeat_at, claimed_at FROM hybrid_idempotency WHERE key = ?",
                (key,),
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO hybrid_idempotency (key, action, params_hash, state, holder, "
                    "claimed_at, heartbeat_at) VALUES (?, ?, ?, 'running', ?, ?, ?)",
                    (key, action, params_hash, me, now, now),
                )
                return Claim(ClaimState.NEW)
            beat = row[6] if row[6] is not None else row[7]
            record = StoredKey(row[0], row[1], row[2], row[3], row[4], row[5], now - beat)
            verdict = self.judge(record, action, params_hash, rerun_if_dead)
            if verdict is Verdict.TAKE:
                conn.execute(
                    "UPDATE hybrid_idempotency SET action = ?, params_hash = ?, "
                    "state = 'running', holder = ?, claimed_at = ?, heartbeat_at = ?, "
                    "status_code = NULL, response_json = NULL, completed_at = NULL WHERE key = ?",
                    (action, params_hash, me, now, now, key),
                )
                return Claim(ClaimState.NEW)
            if verdict is Verdict.PARK:
                conn.execute(
                    "UPDATE hybrid_idempotency SET state = 'indeterminate', completed_at = ? "
                    "WHERE key = ?",
                    (now, key),
                )
                return Claim(ClaimState.INDETERMINATE)
            return verdict

        claim = await self._writes.run(work, durable=not rerun_if_dead)
        if claim.state is ClaimState.NEW:
            self._heartbeat.held += 1
            if rerun_if_dead:
                self._rerunnable.add(key)
        if now - self._last_prune > 3600:
            self._last_prune = now
            await self._prune(now)
        return claim

    async def complete(self, key: str, status_code: int, body: Any) -> None:
        """Store the answer of a successful call under ``key``."""
        text = json.dumps(body)
        self._heartbeat.held -= 1
        await self._writes.run(
            lambda conn: conn.execute(
                "UPDATE hybrid_idempotency SET state = 'done', status_code = ?, "
                "response_json = ?, completed_at = ? "
                "WHERE key = ? AND state = 'running' AND holder = ?",
                (status_code, text, self._clock(), key, self.holder.token),
            ),
            durable=self._held_durably(key),
        )

    async def release(self, key: str, *, ran: bool = True) -> None:
        """Free a claim whose call failed, so a retry may run it again.

        ``ran=False`` (the handler was never reached) forgets the key; otherwise the key stays
        known as having run (``lookup()`` says ``done``) but free to claim.
        """
        self._heartbeat.held -= 1
        if ran:
            sql = (
                "UPDATE hybrid_idempotency SET state = 'failed', holder = NULL, "
                "completed_at = ? WHERE key = ? AND state = 'running' AND holder = ?"
            )
            args: tuple[Any, ...] = (self._clock(), key, self.holder.token)
        else:
            sql = (
                "DELETE FROM hybrid_idempotency WHERE key = ? AND state = 'running' AND holder = ?"
            )
            args = (key, self.holder.token)
        await self._writes.run(
            lambda conn: conn.execute(sql, args), durable=self._held_durably(key)
        )

    def _held_durably(self, key: str) -> bool:
        """Whether the outcome of ``key`` (held here) must be fsync'd; forgets it either way."""
        if key in self._rerunnable:
            self._rerunnable.discard(key)
            return False
        return True

    async def lookup(self, key: str) -> KeyState:
        """Whether a handler here ever ran ``key``, runs it now, or may have run it."""
        now = self._clock()
        row = await self._db.run(
            lambda conn: conn.execute(
                "SELECT action, params_hash, state, status_code, NULL, holder, "
                "coalesce(heartbeat_at, claimed_at) FROM hybrid_idempotency WHERE key = ?",
                (key,),
            ).fetchone()
        )
        if row is None:
            return KeyState.UNKNOWN
        record = StoredKey(row[0], row[1], row[2], row[3], row[4], row[5], now - row[6])
        return record.key_state(self.holder, self._lease_s)

    async def renew(self) -> None:
        await self._db.run(
            lambda conn: conn.execute(
                "UPDATE hybrid_idempotency SET heartbeat_at = ? "
                "WHERE holder = ? AND state = 'running'",
                (self._clock(), self.holder.token),
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
                "DELETE FROM hybrid_idempotency WHERE state != 'running' AND completed_at < ?",
                (cutoff,),
            )
        )
