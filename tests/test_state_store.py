"""StateStore on real SQLite files, and every conflict rule of resolve_conflict()."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from config.hybrid_config import HybridConfig
from errors import InvalidParams
from state_store import StateKind, StateStore, resolve_conflict

pytestmark = pytest.mark.prd200

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
OLD = {"value": "old", "updated_at": (T0 - timedelta(hours=1)).isoformat()}
NEW = {"value": "new", "updated_at": T0.isoformat()}
SAME = {"value": "same-time", "updated_at": T0.isoformat()}
UNDATED = {"value": "no time"}

CRM, PIPELINE = StateKind.CRM.value, StateKind.PIPELINE.value
CONTENT = StateKind.CONTENT_PENDING_PUBLISH.value
FEEDBACK, GENERIC = StateKind.FEEDBACK.value, StateKind.GENERIC.value


@pytest.mark.parametrize(
    ("rule", "kind", "local", "remote", "local_is_cloud", "winner"),
    [
        # nothing held locally: the incoming entry is taken, whatever its kind
        ("no local entry", CRM, None, OLD, False, "remote"),
        ("no local entry", CONTENT, None, OLD, True, "remote"),
        ("no local entry", GENERIC, None, OLD, False, "remote"),
        # CRM and pipeline data: the cloud's copy wins, even when older
        ("cloud wins crm (terminal pulls)", CRM, NEW, OLD, False, "remote"),
        ("cloud wins crm (cloud receives push)", CRM, OLD, NEW, True, "local"),
        ("cloud wins pipeline (terminal pulls)", PIPELINE, NEW, OLD, False, "remote"),
        ("cloud wins pipeline (cloud receives push)", PIPELINE, OLD, NEW, True, "local"),
        # batch-generated content pending publish: the terminal's copy wins, even when older
        ("terminal wins content (terminal pulls)", CONTENT, OLD, NEW, False, "local"),
        ("terminal wins content (cloud receives push)", CONTENT, NEW, OLD, True, "remote"),
        # everything else: the newer updated_at wins, on either side
        ("newer wins: remote newer", FEEDBACK, OLD, NEW, False, "remote"),
        ("newer wins: local newer", FEEDBACK, NEW, OLD, False, "local"),
        ("newer wins on the cloud: remote newer", GENERIC, OLD, NEW, True, "remote"),
        ("newer wins on the cloud: local newer", GENERIC, NEW, OLD, True, "local"),
        ("unknown kinds use newer-wins", "mystery", OLD, NEW, False, "remote"),
        ("unknown kinds use newer-wins", "mystery", NEW, OLD, False, "local"),
        ("an undated entry is older than any", GENERIC, UNDATED, OLD, False, "remote"),
        ("an undated entry is older than any", GENERIC, OLD, UNDATED, False, "local"),
        # a tie goes to the cloud's copy
        ("tie: the cloud's copy (terminal pulls)", GENERIC, SAME, NEW, False, "remote"),
        ("tie: the cloud's copy (cloud receives push)", GENERIC, SAME, NEW, True, "local"),
    ],
)
def test_resolve_conflict(
    rule: str,
    kind: str,
    local: dict[str, Any] | None,
    remote: dict[str, Any],
    local_is_cloud: bool,
    winner: str,
) -> None:
    assert resolve_conflict(kind, local, remote, local_is_cloud=local_is_cloud) == winner, rule


def test_resolve_conflict_compares_times_not_text() -> None:
    local = {"updated_at": "2025-03-01T13:00:00+01:00"}  # = 12:00 UTC
    remote = {"updated_at": "2025-03-01T12:30:00+00:00"}
    assert resolve_conflict(GENERIC, local, remote) == "remote"


@pytest.fixture
def now() -> list[float]:
    return [T0.timestamp()]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "hybrid.sqlite3"


@pytest.fixture
async def open_store(
    db_path: Path, now: list[float]
) -> AsyncIterator[Callable[[], Awaitable[StateStore]]]:
    """Open stores on ``db_path`` with the fake clock; close them all afterwards."""
    opened: list[StateStore] = []

    async def factory() -> StateStore:
        store = StateStore(db_path, clock=lambda: now[0])
        await store.open()
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()


def _sql(path: Path, statement: str, *args: Any) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(statement, args)


async def test_set_local_stores_the_entry_and_queues_the_change(open_store: Any) -> None:
    store = await open_store()
    await store.set_local(
        "content.pending.7", {"text": "hi"}, kind=StateKind.CONTENT_PENDING_PUBLISH
    )
    assert await store.get("content.pending.7") == {
        "value": {"text": "hi"},
        "kind": "content_pending_publish",
        "updated_at": T0.isoformat(),
        "origin": "local",
    }
    assert await store.pending_changes() == [
        {
            "id": 1,
            "key": "content.pending.7",
            "value": {"text": "hi"},
            "kind": "content_pending_publish",
            "updated_at": T0.isoformat(),
        }
    ]


async def test_get_of_an_unknown_key_is_none(open_store: Any) -> None:
    store = await open_store()
    assert await store.get("nope") is None


async def test_pending_changes_keep_order_and_mark_pushed_removes_them(
    open_store: Any, now: list[float]
) -> None:
    store = await open_store()
    for n in range(3):
        now[0] += 1
        await store.set_local("feedback.strategy", {"v": n}, kind="feedback")
    changes = await store.pending_changes()
    assert [c["value"] for c in changes] == [{"v": 0}, {"v": 1}, {"v": 2}]
    assert [c["value"] for c in await store.pending_changes(limit=2)] == [{"v": 0}, {"v": 1}]
    await store.mark_pushed([changes[0]["id"], changes[1]["id"]])
    assert [c["value"] for c in await store.pending_changes()] == [{"v": 2}]
    await store.mark_pushed([])


async def test_apply_remote_crm_overwrites_a_newer_local_value(open_store: Any) -> None:
    store = await open_store()
    await store.set_local("crm.stats", {"leads": 1}, kind="crm")
    won = await store.apply_remote(
        "crm.stats", {"leads": 9}, kind="crm", updated_at=T0 - timedelta(days=1)
    )
    assert won is True
    entry = await store.get("crm.stats")
    assert entry is not None
    assert (entry["value"], entry["origin"]) == ({"leads": 9}, "remote")
    assert entry["updated_at"] == (T0 - timedelta(days=1)).isoformat()


async def test_apply_remote_keeps_local_content_pending_publish(open_store: Any) -> None:
    store = await open_store()
    await store.set_local("content.pending.1", "draft", kind="content_pending_publish")
    won = await store.apply_remote(
        "content.pending.1",
        "cloud copy",
        kind="content_pending_publish",
        updated_at=T0 + timedelta(days=1),
    )
    assert won is False
    entry = await store.get("content.pending.1")
    assert entry is not None and entry["value"] == "draft"


async def test_apply_remote_as_the_cloud_keeps_its_crm(open_store: Any) -> None:
    store = await open_store()
    await store.apply_remote("crm.stats", "cloud", kind="crm", updated_at=T0)
    won = await store.apply_remote(
        "crm.stats",
        "terminal",
        kind="crm",
        updated_at=T0 + timedelta(hours=1),
        local_is_cloud=True,
    )
    assert won is False
    entry = await store.get("crm.stats")
    assert entry is not None and entry["value"] == "cloud"


async def test_apply_remote_newer_wins_for_other_kinds(open_store: Any) -> None:
    store = await open_store()
    await store.set_local("feedback.strategy", "local", kind="feedback")
    assert not await store.apply_remote(
        "feedback.strategy", "older", kind="feedback", updated_at=T0 - timedelta(seconds=1)
    )
    assert await store.apply_remote(
        "feedback.strategy", "newer", kind="feedback", updated_at=T0 + timedelta(seconds=1)
    )
    entry = await store.get("feedback.strategy")
    assert entry is not None and entry["value"] == "newer"


async def test_snapshot_has_every_entry_and_the_pending_count(open_store: Any) -> None:
    store = await open_store()
    await store.set_local("b.key", 2, kind="generic")
    await store.apply_remote("a.key", 1, kind="crm", updated_at=T0)
    snap = await store.snapshot()
    assert list(snap["state"]) == ["a.key", "b.key"]
    assert snap["state"]["a.key"]["origin"] == "remote"
    assert snap["pending_changes"] == 1


async def test_a_value_that_is_not_json_is_invalid(open_store: Any) -> None:
    store = await open_store()
    with pytest.raises(InvalidParams):
        await store.set_local("x.y", object(), kind="generic")
    assert await store.pending_changes() == []


async def test_a_corrupt_entry_is_logged_dropped_and_missing(
    open_store: Any, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = await open_store()
    await store.set_local("a.key", 1, kind="generic")
    await store.set_local("b.key", 2, kind="generic")
    _sql(db_path, "UPDATE hybrid_state SET value_json = '{oops' WHERE key = 'a.key'")
    snap = await store.snapshot()
    assert list(snap["state"]) == ["b.key"]
    assert "unreadable entry" in caplog.text
    assert await store.get("a.key") is None


async def test_a_corrupt_local_entry_loses_to_any_remote_value(
    open_store: Any, db_path: Path
) -> None:
    store = await open_store()
    await store.set_local("content.pending.1", "draft", kind="content_pending_publish")
    _sql(db_path, "UPDATE hybrid_state SET value_json = '{oops'")
    won = await store.apply_remote(
        "content.pending.1", "cloud", kind="content_pending_publish", updated_at=T0
    )
    assert won is True


async def test_a_corrupt_change_is_logged_and_dropped(
    open_store: Any, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = await open_store()
    await store.set_local("a.key", 1, kind="generic")
    await store.set_local("b.key", 2, kind="generic")
    _sql(db_path, "UPDATE hybrid_state_changes SET updated_at = 'soon' WHERE key = 'a.key'")
    assert [c["key"] for c in await store.pending_changes()] == ["b.key"]
    assert "unreadable change" in caplog.text
    assert (await store.snapshot())["pending_changes"] == 1


async def test_state_and_queued_changes_survive_a_reopen(open_store: Any) -> None:
    first = await open_store()
    await first.set_local("a.key", [1], kind="generic")
    await first.close()
    second = await open_store()
    entry = await second.get("a.key")
    assert entry is not None and entry["value"] == [1]
    assert len(await second.pending_changes()) == 1


def test_from_config_uses_the_shared_file_under_data_dir(tmp_path: Path) -> None:
    config = HybridConfig.from_mapping({"DATA_DIR": str(tmp_path)})
    assert StateStore.from_config(config).path == tmp_path / "hybrid.sqlite3"
