"""SqliteFile and the row-format helpers shared by the cache, the outbox and the state store."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from errors import ConfigError
from sqlite_file import (
    GroupCommit,
    SqliteFile,
    Synchronous,
    check_data_dir,
    parse_timestamp,
    transaction,
    utc_iso,
)

pytestmark = pytest.mark.prd200


async def test_open_creates_the_folder_and_runs_the_schema(tmp_path: Path) -> None:
    db = SqliteFile(tmp_path / "a" / "b" / "x.sqlite3")
    await db.open("CREATE TABLE t (n INTEGER);")
    await db.open("this is not SQL and is not run again")
    try:
        assert await db.run(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
        assert await db.run(lambda c: c.execute("SELECT count(*) FROM t").fetchone()[0]) == 0
    finally:
        await db.close()


@pytest.mark.parametrize(("level", "value"), [(Synchronous.FULL, 2), (Synchronous.NORMAL, 1)])
async def test_the_connection_keeps_its_own_synchronous_level_after_the_schema(
    tmp_path: Path, level: Synchronous, value: int
) -> None:
    db = SqliteFile(tmp_path / "x.sqlite3", synchronous=level)
    await db.open("CREATE TABLE t (n INTEGER); CREATE INDEX t_n ON t (n);")
    try:
        assert await db.run(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == value
        assert await db.run(lambda c: c.execute("SELECT count(*) FROM t").fetchone()[0]) == 0
    finally:
        await db.close()


async def test_calls_run_in_order_on_one_thread_off_the_loop(tmp_path: Path) -> None:
    db = SqliteFile(tmp_path / "x.sqlite3", synchronous=Synchronous.NORMAL)
    await db.open()
    try:
        threads = [await db.run(lambda c: threading.get_ident()) for _ in range(3)]
        assert len(set(threads)) == 1
        assert threads[0] != threading.get_ident()
    finally:
        await db.close()


async def test_a_failing_transaction_is_rolled_back(tmp_path: Path) -> None:
    db = SqliteFile(tmp_path / "x.sqlite3")
    await db.open("CREATE TABLE t (n INTEGER);")

    def insert_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (1)")
        raise ValueError("boom")

    try:
        with pytest.raises(ValueError, match="boom"):
            await db.run(lambda c: transaction(c, insert_then_fail))
        assert await db.run(lambda c: c.execute("SELECT count(*) FROM t").fetchone()[0]) == 0
    finally:
        await db.close()


@dataclass
class Grouped:
    """A file with one table, a ``GroupCommit`` on it, and the statements SQLite ran."""

    db: SqliteFile
    writes: GroupCommit
    statements: list[str]


@pytest.fixture
async def grouped(tmp_path: Path) -> AsyncIterator[Grouped]:
    db = SqliteFile(tmp_path / "x.sqlite3")
    await db.open("CREATE TABLE t (n INTEGER);")
    statements: list[str] = []
    await db.run(lambda c: c.set_trace_callback(statements.append))
    yield Grouped(db, GroupCommit(db), statements)


def _append_count(conn: sqlite3.Connection) -> int:
    """Insert how many rows there are: each call sees the writes of the calls before it."""
    seen = int(conn.execute("SELECT count(*) FROM t").fetchone()[0])
    conn.execute("INSERT INTO t VALUES (?)", (seen,))
    return seen


async def test_writes_made_together_share_one_commit_in_order(grouped: Grouped) -> None:
    db, writes, statements = grouped.db, grouped.writes, grouped.statements
    seen = await asyncio.gather(*(writes.run(_append_count) for _ in range(20)))
    assert seen == list(range(20))
    assert statements.count("COMMIT") == 1
    assert await writes.run(_append_count) == 20  # a later call: a group of its own
    assert statements.count("COMMIT") == 2
    rows = await db.run(lambda c: c.execute("SELECT n FROM t ORDER BY n").fetchall())
    assert [n for (n,) in rows] == list(range(21))


def _level_and_append(conn: sqlite3.Connection) -> int:
    """The connection's ``synchronous`` level inside the transaction (1 NORMAL, 2 FULL)."""
    _append_count(conn)
    return int(conn.execute("PRAGMA synchronous").fetchone()[0])


async def test_a_group_of_writes_that_need_no_fsync_commits_without_one(grouped: Grouped) -> None:
    writes, statements = grouped.writes, grouped.statements
    levels = await asyncio.gather(*(writes.run(_level_and_append, durable=False) for _ in range(3)))
    assert levels == [1, 1, 1]  # NORMAL: in WAL mode, no fsync at COMMIT
    assert statements.index("PRAGMA synchronous=NORMAL") < statements.index("BEGIN IMMEDIATE")
    assert statements[-1] == "PRAGMA synchronous=FULL"  # the file's own level, after COMMIT
    assert await writes.run(_level_and_append) == 2  # a durable write alone: FULL


async def test_one_durable_write_makes_its_whole_group_durable(grouped: Grouped) -> None:
    writes, statements = grouped.writes, grouped.statements
    levels = await asyncio.gather(
        writes.run(_level_and_append, durable=False),
        writes.run(_level_and_append),
        writes.run(_level_and_append, durable=False),
    )
    assert levels == [2, 2, 2]
    assert "PRAGMA synchronous=NORMAL" not in statements


_KILLED_WRITER = """
import asyncio, sys
from pathlib import Path
from sqlite_file import GroupCommit, SqliteFile

async def main():
    db = SqliteFile(Path(sys.argv[1]))
    await db.open("CREATE TABLE t (n INTEGER);")
    await GroupCommit(db).run(lambda c: c.execute("INSERT INTO t VALUES (7)"), durable=False)
    print("written", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.mark.process
def test_a_write_without_fsync_survives_its_process_being_killed(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite3"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT n FROM t").fetchall() == [(7,)]


async def test_a_failing_write_in_a_group_is_rolled_back_alone(grouped: Grouped) -> None:
    db, writes, statements = grouped.db, grouped.writes, grouped.statements

    def insert_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (99)")
        raise ValueError("boom")

    first, failed, last = await asyncio.gather(
        writes.run(_append_count),
        writes.run(insert_then_fail),
        writes.run(_append_count),
        return_exceptions=True,
    )
    assert (first, last) == (0, 1)  # the failed one's row was never seen
    assert isinstance(failed, ValueError) and str(failed) == "boom"
    assert statements.count("COMMIT") == 1
    rows = await db.run(lambda c: c.execute("SELECT n FROM t ORDER BY n").fetchall())
    assert rows == [(0,), (1,)]


async def test_a_lingering_write_shares_the_next_writes_commit_and_keeps_its_place(
    grouped: Grouped,
) -> None:
    writes, statements = grouped.writes, grouped.statements
    lingering = writes.submit(_append_count, linger_s=60.0)
    await asyncio.sleep(0.01)
    assert statements.count("COMMIT") == 0 and not lingering.done()
    assert await writes.run(_append_count) == 1  # after the lingering one, in its group
    assert await lingering == 0
    assert statements.count("COMMIT") == 1


async def test_a_lingering_write_alone_is_written_after_its_delay(grouped: Grouped) -> None:
    writes, statements = grouped.writes, grouped.statements
    assert await writes.submit(_append_count, linger_s=0.01) == 0
    assert statements.count("COMMIT") == 1


async def test_written_starts_a_lingering_write_and_waits_for_it(grouped: Grouped) -> None:
    writes, statements = grouped.writes, grouped.statements
    lingering = writes.submit(_append_count, linger_s=60.0)
    await writes.written()
    assert lingering.done() and statements.count("COMMIT") == 1
    await writes.written()  # nothing queued: returns at once


async def test_a_group_on_a_closed_file_fails_every_call(grouped: Grouped) -> None:
    await grouped.db.close()
    writes = grouped.writes
    outcomes = await asyncio.gather(
        *(writes.run(_append_count) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, RuntimeError) and "not open" in str(o) for o in outcomes)


async def test_run_after_close_is_an_error_and_close_is_idempotent(tmp_path: Path) -> None:
    db = SqliteFile(tmp_path / "x.sqlite3")
    await db.open()
    await db.close()
    await db.close()
    assert db.is_open is False
    with pytest.raises(RuntimeError, match="not open"):
        await db.run(lambda c: None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-03-01T12:00:00+00:00", datetime(2025, 3, 1, 12, tzinfo=UTC)),
        ("2025-03-01T13:00:00+01:00", datetime(2025, 3, 1, 12, tzinfo=UTC)),
        ("2025-03-01T12:00:00", datetime(2025, 3, 1, 12, tzinfo=UTC)),
        (
            datetime(2025, 3, 1, 14, tzinfo=timezone(timedelta(hours=2))),
            datetime(2025, 3, 1, 12, tzinfo=UTC),
        ),
    ],
)
def test_parse_timestamp_returns_aware_utc(text: str | datetime, expected: datetime) -> None:
    parsed = parse_timestamp(text)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


def test_utc_iso_round_trips() -> None:
    assert utc_iso(0.0) == "1970-01-01T00:00:00+00:00"
    assert parse_timestamp(utc_iso(1_700_000_000.5)).timestamp() == 1_700_000_000.5


def test_a_data_dir_under_a_regular_file_names_data_dir_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError) as info:
        check_data_dir(tmp_path / "file" / "data")
    message = str(info.value)
    assert "DATA_DIR" in message and str(tmp_path / "file" / "data") in message
    assert "Point DATA_DIR at a writable directory" in message


def test_a_read_only_data_dir_names_data_dir_and_the_fix(tmpfs: Callable[..., Path]) -> None:
    read_only = tmpfs(read_only=True)
    with pytest.raises(ConfigError, match=r"DATA_DIR .* is not writable \(Read-only file system\)"):
        check_data_dir(read_only)
