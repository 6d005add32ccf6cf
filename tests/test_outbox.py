"""Outbox on real SQLite files: order, durability (also across SIGKILL), dead letters."""

from __future__ import annotations

import os
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from config.hybrid_config import HybridConfig
from errors import Indeterminate, InvalidParams
from outbox import Outbox
from outbox_rows import OutboxStatus, rerun_key

pytestmark = pytest.mark.prd200

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "hybrid.sqlite3"


@pytest.fixture
async def open_outbox(db_path: Path) -> AsyncIterator[Callable[..., Awaitable[Outbox]]]:
    """Open outboxes on ``db_path``; close them all afterwards."""
    opened: list[Outbox] = []

    async def factory(**options: Any) -> Outbox:
        outbox = Outbox(db_path, **options)
        await outbox.open()
        opened.append(outbox)
        return outbox

    yield factory
    for outbox in opened:
        await outbox.close()


def _sql(path: Path, statement: str, *args: Any) -> list[Any]:
    with sqlite3.connect(path) as conn:
        return conn.execute(statement, args).fetchall()


async def _fill(outbox: Outbox, n: int) -> list[str]:
    ids = []
    for i in range(n):
        item = await outbox.enqueue("dm.send", {"to": f"user{i}", "n": i}, f"key-{i}")
        ids.append(item.id)
    return ids


async def test_enqueue_returns_a_pending_item(open_outbox: Any) -> None:
    outbox = await open_outbox()
    item = await outbox.enqueue("dm.send", {"to": "ann"}, "key-1")
    assert item.action == "dm.send"
    assert item.params == {"to": "ann"}
    assert item.idempotency_key == "key-1"
    assert item.status is OutboxStatus.PENDING
    assert item.attempts == 0
    assert item.last_error is None
    assert item.created_at.tzinfo is not None
    assert await outbox.depth() == 1


async def test_pending_is_in_enqueue_order(open_outbox: Any) -> None:
    outbox = await open_outbox()
    ids = await _fill(outbox, 7)
    pending = await outbox.pending()
    assert [item.id for item in pending] == ids
    assert [item.seq for item in pending] == sorted(item.seq for item in pending)
    assert [item.id for item in await outbox.pending(limit=3)] == ids[:3]


async def test_waiting_lists_the_items_whose_time_has_not_come_soonest_first(
    open_outbox: Any,
) -> None:
    now = [1_000_000.0]
    outbox = await open_outbox(clock=lambda: now[0])
    at = lambda s: datetime.fromtimestamp(now[0] + s, UTC)  # noqa: E731
    late = await outbox.enqueue("dm.send", {"n": 1}, "key-late", not_before=at(600))
    due = await outbox.enqueue("dm.send", {"n": 2}, "key-due", not_before=at(-1))
    soon = await outbox.enqueue("dm.send", {"n": 3}, "key-soon", not_before=at(60))
    await outbox.enqueue("dm.send", {"n": 4}, "key-now")
    dead = await outbox.enqueue("dm.send", {"n": 5}, "key-dead", not_before=at(30))
    await outbox.fail(dead.id, "HTTP 400", permanent=True)
    assert [i.id for i in await outbox.waiting()] == [soon.id, late.id]
    assert [i.id for i in await outbox.waiting(limit=1)] == [soon.id]
    assert due.id in [i.id for i in await outbox.pending()]
    now[0] += 120  # soon's time has come: it is due, no longer waiting
    assert [i.id for i in await outbox.waiting()] == [late.id]


async def test_items_survive_closing_and_reopening_the_file(open_outbox: Any) -> None:
    first = await open_outbox()
    ids = await _fill(first, 3)
    await first.close()
    second = await open_outbox()
    assert [item.id for item in await second.pending()] == ids


@pytest.mark.process
def test_an_enqueued_item_survives_sigkill_right_after_enqueue_returns(db_path: Path) -> None:
    child = textwrap.dedent(
        """
        import asyncio, sys, time
        from pathlib import Path
        from outbox import Outbox

        async def main() -> None:
            outbox = Outbox(Path(sys.argv[1]))
            await outbox.open()
            for i in range(3):
                item = await outbox.enqueue("dm.send", {"n": i}, f"kill-{i}")
                print(item.id, flush=True)
            print("done", flush=True)
            time.sleep(120)  # never closes the outbox: killed here

        asyncio.run(main())
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child, str(db_path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    out = b""
    try:
        while b"done\n" not in out:
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, "the child did not enqueue in time"
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, f"the child exited: {proc.stderr.read().decode() if proc.stderr else ''}"
            out += chunk
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=15)
    assert proc.returncode == -signal.SIGKILL
    ids = out.decode().split()[:-1]
    rows = _sql(db_path, "SELECT id, idempotency_key, status FROM hybrid_outbox ORDER BY seq")
    assert rows == [(ids[i], f"kill-{i}", "pending") for i in range(3)]


async def test_enqueueing_a_queued_key_again_returns_the_queued_item(open_outbox: Any) -> None:
    outbox = await open_outbox()
    first = await outbox.enqueue("dm.send", {"to": "ann", "n": 1}, "key-1")
    again = await outbox.enqueue("dm.send", {"n": 1, "to": "ann"}, "key-1")
    assert again.id == first.id
    assert await outbox.depth() == 1


async def test_a_queued_key_with_other_params_is_invalid(open_outbox: Any) -> None:
    outbox = await open_outbox()
    await outbox.enqueue("dm.send", {"to": "ann"}, "key-1")
    with pytest.raises(InvalidParams, match="already queued"):
        await outbox.enqueue("dm.send", {"to": "bob"}, "key-1")
    with pytest.raises(InvalidParams):
        await outbox.enqueue("publish.auto", {"to": "ann"}, "key-1")
    assert await outbox.depth() == 1


async def test_params_that_are_not_json_are_invalid(open_outbox: Any) -> None:
    outbox = await open_outbox()
    with pytest.raises(InvalidParams):
        await outbox.enqueue("dm.send", {"at": object()}, "key-1")
    assert await outbox.depth() == 0


async def test_ack_removes_the_item_and_is_idempotent(open_outbox: Any) -> None:
    outbox = await open_outbox()
    ids = await _fill(outbox, 2)
    await outbox.ack(ids[0], {"sent": True})
    await outbox.ack(ids[0])
    assert [item.id for item in await outbox.pending()] == ids[1:]
    assert await outbox.depth() == 1


async def test_a_transient_failure_keeps_the_item_pending_with_one_more_attempt(
    open_outbox: Any,
) -> None:
    outbox = await open_outbox()
    (item_id,) = await _fill(outbox, 1)
    status = await outbox.fail(item_id, "timeout: no answer", permanent=False)
    assert status is OutboxStatus.PENDING
    (item,) = await outbox.pending()
    assert item.attempts == 1
    assert item.last_error == "timeout: no answer"


async def test_a_failure_that_never_reached_the_cloud_spends_no_attempt(
    open_outbox: Any,
) -> None:
    outbox = await open_outbox()
    (item_id,) = await _fill(outbox, 1)
    await outbox.fail(item_id, "circuit_open", permanent=False, count_attempt=False)
    (item,) = await outbox.pending()
    assert item.attempts == 0
    assert item.last_error == "circuit_open"


async def test_max_attempts_transient_failures_make_a_dead_letter(open_outbox: Any) -> None:
    outbox = await open_outbox(max_attempts=3)
    (item_id,) = await _fill(outbox, 1)
    statuses = [await outbox.fail(item_id, f"5xx #{n}", permanent=False) for n in range(3)]
    assert statuses == [OutboxStatus.PENDING, OutboxStatus.PENDING, OutboxStatus.DEAD]
    assert await outbox.depth() == 0
    (dead,) = await outbox.dead_letters()
    assert (dead.id, dead.attempts, dead.last_error) == (item_id, 3, "5xx #2")


async def test_a_permanent_failure_is_a_dead_letter_at_once(open_outbox: Any) -> None:
    outbox = await open_outbox()
    ids = await _fill(outbox, 3)
    assert await outbox.fail(ids[1], "invalid_params: bad", permanent=True) is OutboxStatus.DEAD
    assert [item.id for item in await outbox.pending()] == [ids[0], ids[2]]
    assert [item.id for item in await outbox.dead_letters()] == [ids[1]]
    assert (await outbox.snapshot())["dead_letters"] == 1


async def test_failing_an_unknown_item_changes_nothing(open_outbox: Any) -> None:
    outbox = await open_outbox()
    await _fill(outbox, 1)
    assert await outbox.fail("nope", "x", permanent=True) is None
    assert await outbox.depth() == 1


async def test_retry_dead_requeues_at_the_original_place(open_outbox: Any) -> None:
    outbox = await open_outbox()
    ids = await _fill(outbox, 3)
    await outbox.fail(ids[0], "5xx", permanent=False)
    await outbox.fail(ids[0], "invalid_params", permanent=True)
    await outbox.retry_dead(ids[0])
    pending = await outbox.pending()
    assert [item.id for item in pending] == ids
    assert pending[0].attempts == 0
    assert await outbox.dead_letters() == []
    with pytest.raises(KeyError):
        await outbox.retry_dead(ids[1])  # pending, not dead


@pytest.mark.parametrize("bad_params", ["{not json", "[1, 2]", "null"])
async def test_a_corrupt_row_is_moved_to_the_dead_letters_and_skipped(
    open_outbox: Any, db_path: Path, caplog: pytest.LogCaptureFixture, bad_params: str
) -> None:
    outbox = await open_outbox()
    ids = await _fill(outbox, 4)
    _sql(db_path, "UPDATE hybrid_outbox SET params_json = ? WHERE id = ?", bad_params, ids[1])
    assert [item.id for item in await outbox.pending(limit=3)] == [ids[0], ids[2], ids[3]]
    assert "unreadable" in caplog.text
    (dead,) = await outbox.dead_letters()
    assert dead.id == ids[1]
    assert dead.params == {}
    assert dead.last_error is not None and dead.last_error.startswith("corrupt row:")
    assert await outbox.depth() == 3


async def test_the_file_is_wal_and_every_commit_is_fsynced(open_outbox: Any, db_path: Path) -> None:
    outbox = await open_outbox()
    assert await outbox._db.run(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2
    assert _sql(db_path, "PRAGMA journal_mode") == [("wal",)]


async def test_snapshot_counts_pending_and_dead(open_outbox: Any) -> None:
    outbox = await open_outbox(clock=lambda: 0.0)
    ids = await _fill(outbox, 3)
    await outbox.fail(ids[2], "unknown_action", permanent=True)
    assert await outbox.snapshot() == {
        "depth": 2,
        "deferred": 0,
        "dead_letters": 1,
        "oldest_pending_at": "1970-01-01T00:00:00+00:00",
    }


def test_from_config_uses_the_shared_file_under_data_dir(tmp_path: Path) -> None:
    config = HybridConfig.from_mapping({"DATA_DIR": str(tmp_path)})
    assert Outbox.from_config(config).path == tmp_path / "hybrid.sqlite3"


# -- indeterminate dead letters: a person retries (re-runs) or drops them ----------------------


async def test_a_parked_item_is_an_indeterminate_dead_letter(open_outbox: Any) -> None:
    outbox = await open_outbox()
    ids = await _fill(outbox, 2)
    await outbox.park(ids[0], "indeterminate: may have run")
    (dead,) = await outbox.dead_letters()
    assert (dead.id, dead.status) == (ids[0], OutboxStatus.INDETERMINATE)
    assert [item.id for item in await outbox.pending()] == [ids[1]]
    assert (await outbox.snapshot())["dead_letters"] == 1


async def test_retrying_an_indeterminate_item_needs_a_confirmed_rerun_and_a_fresh_key(
    open_outbox: Any,
) -> None:
    outbox = await open_outbox()
    (item_id,) = await _fill(outbox, 1)
    (queued,) = await outbox.pending()
    await outbox.park(item_id, "indeterminate: may have run")
    with pytest.raises(Indeterminate):
        await outbox.retry_dead(item_id)
    retried = await outbox.retry_dead(item_id, rerun=True)
    assert retried.status is OutboxStatus.PENDING
    assert retried.idempotency_key == rerun_key(queued.idempotency_key)
    assert retried.idempotency_key != queued.idempotency_key


async def test_retrying_a_plain_dead_letter_keeps_its_key(open_outbox: Any) -> None:
    outbox = await open_outbox()
    (item_id,) = await _fill(outbox, 1)
    (queued,) = await outbox.pending()
    await outbox.fail(item_id, "invalid_params", permanent=True)
    retried = await outbox.retry_dead(item_id)
    assert retried.idempotency_key == queued.idempotency_key


@pytest.mark.parametrize(
    ("key", "fresh"),
    [
        ("abc12345", "abc12345~r1"),
        ("abc12345~r1", "abc12345~r2"),
        ("abc12345~r9", "abc12345~r10"),
        ("a~rb12345", "a~rb12345~r1"),
    ],
)
def test_rerun_key(key: str, fresh: str) -> None:
    assert rerun_key(key) == fresh


def test_rerun_key_stays_within_200_characters() -> None:
    fresh = rerun_key("k" * 200)
    assert len(fresh) <= 200 and fresh.endswith("~r1")
    assert rerun_key(fresh).endswith("~r2")


async def test_drop_deletes_a_dead_letter_or_cancels_a_queued_item(open_outbox: Any) -> None:
    outbox = await open_outbox()
    ids = await _fill(outbox, 3)
    await outbox.fail(ids[0], "invalid_params", permanent=True)
    await outbox.drop(ids[0])
    await outbox.drop(ids[1])  # still queued: cancelled before it is sent
    assert [item.id for item in await outbox.pending()] == [ids[2]]
    assert await outbox.dead_letters() == []
    with pytest.raises(KeyError):
        await outbox.drop(ids[0])
