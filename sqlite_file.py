"""SqliteFile: one SQLite connection in WAL mode, driven from asyncio through one worker thread.

The offline cache, the outbox and the local state store each own one of these (they may share one
database file: WAL lets one writer and many readers work side by side, and ``busy_timeout`` makes
a second writer wait instead of failing). Every statement of a connection runs on its own worker
thread, so calls are serialised in submission order, the connection never crosses threads, and
the event loop never blocks on disk.

The worker is a thread reading a ``queue.SimpleQueue`` that answers the asyncio future itself
(``call_soon_threadsafe``), not a ``ThreadPoolExecutor``: each hand-off then builds no
``concurrent.futures.Future`` (a ``threading.Condition`` and its lock) nor the chain between the
two futures, about 10 µs of the loop's CPU per statement and a tenth of a cloud instance's main
thread samples while it serves calls (py-spy under ``bench_batch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5_000

# The one file under DATA_DIR that holds the offline cache, the outbox and the state store.
HYBRID_DB_FILENAME = "hybrid.sqlite3"


class Synchronous(StrEnum):
    """SQLite's ``PRAGMA synchronous`` levels we use.

    FULL fsyncs the WAL on every commit: a committed row survives a process kill and a power
    cut. NORMAL fsyncs only at checkpoints: a power cut may lose the last commits (never a
    process kill), which is fine for a cache.
    """

    FULL = "FULL"
    NORMAL = "NORMAL"


class _Worker:
    """One thread running the jobs handed to it, in order, answering each job's asyncio future."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # A daemon: a store never closed must not keep the interpreter from exiting (SQLite's
        # transactions are atomic, so one cut short is rolled back on the next open).
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future

    def stop(self) -> None:
        """Let the thread end once the jobs already handed to it are done."""
        self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn, args = job
            if future.cancelled():  # its caller gave up before it started: skip it
                continue
            try:
                result = fn(*args)
            except BaseException as exc:
                _answer(loop, future.set_exception, future, exc)
            else:
                _answer(loop, future.set_result, future, result)


_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _answer(
    loop: asyncio.AbstractEventLoop,
    setter: Callable[[Any], None],
    future: asyncio.Future[Any],
    value: Any,
) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(_settle, setter, future, value)


def _settle(setter: Callable[[Any], None], future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():  # done: its caller was cancelled meanwhile
        setter(value)


class SqliteFile:
    """An SQLite connection opened lazily on its own worker thread."""

    def __init__(
        self, path: Path, *, synchronous: Synchronous = Synchronous.FULL, name: str = "sqlite"
    ) -> None:
        self.path = Path(path)
        self.synchronous = synchronous
        self.name = name
        self._worker: _Worker | None = None
        self._conn: sqlite3.Connection | None = None
        self.wal = False  # whether the file is in WAL mode (known once open)

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    async def open(self, schema: str = "") -> None:
        """Create the parent folder, connect, switch to WAL and run ``schema`` (idempotent)."""
        if self._conn is not None:
            return
        worker = _Worker(f"{self.name}-sqlite")
        try:
            self._conn = await worker.submit(self._connect, schema)
        except BaseException:
            worker.stop()
            raise
        self._worker = worker

    def _connect(self, schema: str) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a transaction takes the
        # write lock up front instead of failing half-way with SQLITE_BUSY on upgrade.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self.wal = str(mode).lower() == "wal"
            if not self.wal:
                log.warning(
                    "%s: %s does not support WAL (journal_mode=%s)", self.name, self.path, mode
                )
            if schema and self.wal:
                # The schema's commits need no fsync each: in WAL mode NORMAL never corrupts,
                # and the next FULL commit syncs the log, their frames with it. Starting on a
                # new DATA_DIR makes 29 fsyncs instead of 46 (strace); under a busy disk each
                # costs milliseconds before the first request is served.
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(schema)
                schema = ""
            conn.execute(f"PRAGMA synchronous={self.synchronous.value}")
            if schema:
                conn.executescript(schema)
        except BaseException:
            conn.close()
            raise
        return conn

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the worker thread and return its result."""
        if self._conn is None or self._worker is None:
            raise RuntimeError(f"{self.name}: {self.path} is not open; call open() first")
        return await self._worker.submit(fn, self._conn)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the worker thread inside one ``transaction``.

        The transaction is begun and ended here, so the caller's ``fn`` is the only code of
        its module on the worker's stack (not called back from ``transaction``).
        """
        return await self.run(functools.partial(transaction, fn=fn))

    async def close(self) -> None:
        """Close the connection and stop the worker thread (idempotent)."""
        conn, worker = self._conn, self._worker
        self._conn, self._worker = None, None
        if conn is None or worker is None:
            return
        try:
            await worker.submit(conn.close)
        finally:
            worker.stop()


def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``fn`` inside ``BEGIN IMMEDIATE`` … ``COMMIT`` (rolled back if it raises)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


class GroupCommit:
    """Write transactions of one ``SqliteFile``, those that arrive together sharing one commit.

    Calls made while a group is being written wait and form the next group: one
    ``BEGIN IMMEDIATE`` … ``COMMIT`` (one fsync) for all of them. Each ``fn`` runs in
    submission order inside its own savepoint, so it sees the writes of those before it, as if
    they had run one after another, and one that raises is rolled back alone. No caller hears
    its result before the group's COMMIT, and a failed BEGIN or COMMIT fails the whole group.
    The write lock is held for the group as it was for one call: other processes on the same
    file still wait their turn. A call that finds nothing running starts a group at once, unless
    it may linger (``submit(linger_s=…)``): then it waits that long for company.

    A write submitted with ``durable=False`` may go without the file's fsync: a group made only
    of such writes commits with ``synchronous=NORMAL`` (WAL mode only), so it survives a killed
    process but a power cut may lose it; a group with any durable write is committed as the file
    always is, with every write in it.
    """

    def __init__(self, file: SqliteFile) -> None:
        self._file = file
        self._pending: list[_Write] = []
        self._writer: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def run(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run ``fn`` in a write transaction (shared with the calls made at the same time)."""
        return await self.submit(fn, durable=durable)

    def submit(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        linger_s: float = 0.0,
        durable: bool = True,
    ) -> asyncio.Future[T]:
        """Queue ``fn`` now (its place in the order is taken here); its future has the result.

        ``linger_s`` > 0: with nothing running, wait up to that long for another write to share
        the transaction with (any write submitted without it starts the group at once).
        ``durable=False``: this write may be committed without an fsync (see the class).
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((fn, future, durable))
        if self._writer is None:
            if linger_s <= 0:
                self._start()
            elif self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(linger_s, self._start)
        return future

    async def written(self) -> None:
        """Return once the writes queued so far are written (a lingering group starts now).

        A statement run on the file after this sees them: those already handed to the file's
        worker are ahead of it in the worker's queue.
        """
        if self._pending:
            last = self._pending[-1][1]
            self._start()
            await asyncio.wait([last])

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writer is None and self._pending:
            self._writer = asyncio.create_task(self._write_groups())

    async def _write_groups(self) -> None:
        try:
            while self._pending:
                group, self._pending = self._pending, []
                fns = [fn for fn, _, _ in group]
                level = self._file.synchronous
                relaxed = (
                    self._file.wal
                    and level is not Synchronous.NORMAL
                    and not any(durable for _, _, durable in group)
                )
                relax = level if relaxed else None  # the level to go back to
                try:
                    outcomes = await self._file.run(
                        functools.partial(_in_one_transaction, fns=fns, relax=relax)
                    )
                except BaseException as exc:  # BEGIN or COMMIT failed, or the file is closed
                    _fail(group, exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future, _), (ok, value) in zip(group, outcomes, strict=True):
                    if not future.done():  # done: its caller was cancelled meanwhile
                        future.set_result(value) if ok else future.set_exception(value)
        except BaseException as exc:
            _fail(self._pending, exc)
            self._pending = []
            raise
        finally:
            self._writer = None


def _fail(group: list[_Write], exc: BaseException) -> None:
    for _, future, _ in group:
        if not future.done():
            future.set_exception(exc)


# A write of a GroupCommit: the function, its caller's future, and whether it must be fsync'd.
_Write = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]", bool]


def _in_one_transaction(
    conn: sqlite3.Connection,
    fns: list[Callable[[sqlite3.Connection], Any]],
    relax: Synchronous | None = None,
) -> list[tuple[bool, Any]]:
    """The group's transaction; with ``relax`` (the file's own level), committed with
    ``synchronous=NORMAL`` and the connection set back to ``relax`` after."""
    if relax is None:
        return _group_transaction(conn, fns)
    conn.execute("PRAGMA synchronous=NORMAL")
    try:
        return _group_transaction(conn, fns)
    finally:
        conn.execute(f"PRAGMA synchronous={relax.value}")


def _group_transaction(
    conn: sqlite3.Connection, fns: list[Callable[[sqlite3.Connection], Any]]
) -> list[tuple[bool, Any]]:
    if len(fns) == 1:  # alone: no savepoint needed, and its failure is the group's
        return [(True, transaction(conn, fns[0]))]
    outcomes: list[tuple[bool, Any]] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for fn in fns:
            conn.execute("SAVEPOINT one_call")
            try:
                outcomes.append((True, fn(conn)))
            except Exception as exc:
                conn.execute("ROLLBACK TO one_call")
                outcomes.append((False, exc))
            conn.execute("RELEASE one_call")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes


def utc_iso(unix_s: float) -> str:
    """Unix time as the ISO 8601 UTC text our tables store (``2025-01-31T12:00:00+00:00``)."""
    return datetime.fromtimestamp(unix_s, UTC).isoformat()


def parse_timestamp(value: Any) -> datetime:
    """Return ``value`` (ISO 8601 text or datetime) as an aware UTC datetime; naive means UTC."""
    when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def check_data_dir(path: Path) -> None:
    """Create DATA_DIR if needed and prove it takes a durable write, else ``ConfigError``.

    A read-only mount, a missing permission or a path under a regular file would otherwise
    surface later as a bare ``sqlite3.OperationalError`` that names neither DATA_DIR nor a fix.
    """
    probe = path / f".write-check-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with probe.open("wb") as handle:
            handle.write(b"ok")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as exc:
        raise data_dir_error(path, exc) from None


def data_dir_error(path: Path, exc: BaseException) -> ConfigError:
    """The start-up error for a DATA_DIR (or a file in it) this process cannot write."""
    reason = getattr(exc, "strerror", None) or str(exc)
    return ConfigError(
        f"DATA_DIR {path} is not writable ({reason}): the outbox, the idempotency keys and the "
        f"cost ledger must be stored there. Point DATA_DIR at a writable directory, or make "
        f"this one writable by user id {os.getuid()} (chown/chmod, or remount it read-write), "
        f"and free disk space if it is full"
    )
