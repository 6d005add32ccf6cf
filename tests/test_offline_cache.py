"""OfflineCache on real SQLite files: canonical keys, TTL, stale reads, bounds, corrupt rows."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from config.hybrid_config import HybridConfig
from offline_cache import OfflineCache, params_hash

pytestmark = pytest.mark.prd200

T0 = 1_700_000_000.0


@pytest.fixture
def now() -> list[float]:
    """The fake wall clock: ``now[0]`` is the current Unix time."""
    return [T0]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "hybrid.sqlite3"


@pytest.fixture
async def open_cache(
    db_path: Path, now: list[float]
) -> AsyncIterator[Callable[..., Awaitable[OfflineCache]]]:
    """Open caches on ``db_path`` with the fake clock; close them all afterwards."""
    opened: list[OfflineCache] = []

    async def factory(**options: Any) -> OfflineCache:
        cache = OfflineCache(db_path, clock=lambda: now[0], **options)
        await cache.open()
        opened.append(cache)
        return cache

    yield factory
    for cache in opened:
        await cache.close()


def _sql(path: Path, statement: str, *args: Any) -> list[Any]:
    with sqlite3.connect(path) as conn:
        return conn.execute(statement, args).fetchall()


@pytest.mark.parametrize(
    ("left", "right", "equal"),
    [
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}, True),
        ({"q": {"x": 1, "y": [1, 2]}}, {"q": {"y": [1, 2], "x": 1}}, True),
        ({}, {}, True),
        ({"a": 1}, {"a": 2}, False),
        ({"a": [1, 2]}, {"a": [2, 1]}, False),
        ({"a": "1"}, {"a": 1}, False),
    ],
)
def test_params_hash_ignores_key_order_only(
    left: dict[str, Any], right: dict[str, Any], equal: bool
) -> None:
    assert (params_hash(left) == params_hash(right)) is equal


def test_params_hash_is_sha256_of_canonical_json() -> None:
    import hashlib

    expected = hashlib.sha256(b'{"a":1,"b":"\xc3\xa9"}').hexdigest()
    assert params_hash({"b": "é", "a": 1}) == expected


async def test_get_hits_whatever_the_key_order(open_cache: Any) -> None:
    cache = await open_cache()
    await cache.put("research.keyword", {"a": 1, "b": 2}, {"rows": [1, 2]})
    entry = await cache.get("research.keyword", {"b": 2, "a": 1})
    assert entry is not None
    assert entry.response == {"rows": [1, 2]}
    assert entry.action == "research.keyword"
    assert entry.cached_at == datetime.fromtimestamp(T0, UTC)
    assert entry.age_s == 0.0


async def test_get_misses_other_actions_and_params(open_cache: Any) -> None:
    cache = await open_cache()
    await cache.put("research.keyword", {"q": "a"}, 1)
    assert await cache.get("research.platform", {"q": "a"}) is None
    assert await cache.get("research.keyword", {"q": "b"}) is None


async def test_get_serves_only_entries_younger_than_the_ttl(
    open_cache: Any, now: list[float]
) -> None:
    cache = await open_cache(ttl_s=3600)
    await cache.put("research.keyword", {"q": "a"}, {"n": 1})
    now[0] += 3599
    fresh = await cache.get("research.keyword", {"q": "a"})
    assert fresh is not None and fresh.age_s == 3599
    now[0] += 1
    assert await cache.get("research.keyword", {"q": "a"}) is None


async def test_get_stale_returns_an_expired_entry_with_its_age(
    open_cache: Any, now: list[float]
) -> None:
    cache = await open_cache(ttl_s=60)
    await cache.put("research.keyword", {"q": "a"}, {"n": 1})
    now[0] += 86_400
    stale = await cache.get_stale("research.keyword", {"q": "a"})
    assert stale is not None
    assert stale.response == {"n": 1}
    assert stale.age_s == 86_400
    assert await cache.get_stale("research.keyword", {"q": "zzz"}) is None


async def test_put_replaces_the_entry_and_refreshes_its_time(
    open_cache: Any, now: list[float]
) -> None:
    cache = await open_cache(ttl_s=60)
    await cache.put("research.keyword", {"q": "a"}, "old")
    now[0] += 100
    await cache.put("research.keyword", {"q": "a"}, "new")
    entry = await cache.get("research.keyword", {"q": "a"})
    assert entry is not None and entry.response == "new"
    assert await cache.size() == 1


async def test_the_table_is_bounded_by_row_count_dropping_the_oldest(
    open_cache: Any, now: list[float]
) -> None:
    cache = await open_cache(max_rows=3)
    for n in range(5):
        now[0] += 1
        await cache.put("research.keyword", {"n": n}, n)
    assert await cache.size() == 3
    assert await cache.get_stale("research.keyword", {"n": 0}) is None
    assert await cache.get_stale("research.keyword", {"n": 1}) is None
    kept = [await cache.get("research.keyword", {"n": n}) for n in (2, 3, 4)]
    assert [entry.response for entry in kept if entry] == [2, 3, 4]


async def test_the_table_is_bounded_by_age(open_cache: Any, now: list[float]) -> None:
    cache = await open_cache(ttl_s=10, max_age_s=100)
    await cache.put("research.keyword", {"n": 1}, 1)
    now[0] += 101
    await cache.put("research.keyword", {"n": 2}, 2)
    assert await cache.get_stale("research.keyword", {"n": 1}) is None
    assert await cache.size() == 1


@pytest.mark.parametrize(
    ("column", "bad_value"),
    [("response_json", "{not json"), ("cached_at", "yesterday")],
)
async def test_a_corrupt_row_is_logged_deleted_and_a_miss(
    open_cache: Any,
    db_path: Path,
    caplog: pytest.LogCaptureFixture,
    column: str,
    bad_value: str,
) -> None:
    cache = await open_cache()
    await cache.put("research.keyword", {"q": "a"}, {"n": 1})
    await cache.put("research.keyword", {"q": "b"}, {"n": 2})
    _sql(
        db_path,
        f"UPDATE hybrid_cache SET {column} = ? WHERE params_hash = ?",
        bad_value,
        params_hash({"q": "a"}),
    )
    assert await cache.get_stale("research.keyword", {"q": "a"}) is None
    assert "unreadable row" in caplog.text
    assert await cache.size() == 1
    assert await cache.get("research.keyword", {"q": "a"}) is None
    entry = await cache.get("research.keyword", {"q": "b"})
    assert entry is not None and entry.response == {"n": 2}


async def test_a_response_that_is_not_json_is_not_cached(open_cache: Any) -> None:
    cache = await open_cache()
    await cache.put("research.keyword", {"q": "a"}, {"when": object()})
    assert await cache.size() == 0


async def test_entries_survive_a_reopen(open_cache: Any) -> None:
    first = await open_cache()
    await first.put("research.keyword", {"q": "a"}, [1, 2, 3])
    await first.close()
    second = await open_cache()
    entry = await second.get("research.keyword", {"q": "a"})
    assert entry is not None and entry.response == [1, 2, 3]


async def test_the_file_is_in_wal_mode_with_the_designed_columns(
    open_cache: Any, db_path: Path
) -> None:
    cache = await open_cache()
    # NORMAL (1): a power cut may lose the newest cache rows, which only costs a cache miss.
    assert await cache._db.run(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 1
    assert _sql(db_path, "PRAGMA journal_mode") == [("wal",)]
    columns = [row[1] for row in _sql(db_path, "PRAGMA table_info(hybrid_cache)")]
    assert columns == ["action", "params_hash", "response_json", "cached_at"]


async def test_using_a_closed_cache_is_an_error(open_cache: Any) -> None:
    cache = await open_cache()
    await cache.close()
    await cache.close()
    with pytest.raises(RuntimeError, match="not open"):
        await cache.get("research.keyword", {})


def test_from_config_uses_data_dir_and_cache_ttl(tmp_path: Path) -> None:
    config = HybridConfig.from_mapping({"DATA_DIR": str(tmp_path / "d"), "CACHE_TTL_SEC": "90"})
    cache = OfflineCache.from_config(config)
    assert cache.path == tmp_path / "d" / "hybrid.sqlite3"
    assert cache.ttl_s == 90.0
    assert cache.max_age_s >= cache.ttl_s


# -- remember(): the write-behind fill of the router ---------------------------------------------


async def test_a_remembered_entry_is_served_before_it_is_written(
    open_cache: Any, db_path: Path
) -> None:
    cache = await open_cache(flush_delay_s=60.0)
    assert cache.remember("research.keyword", {"q": "a"}, {"rows": [1]})
    assert _sql(db_path, "SELECT count(*) FROM hybrid_cache") == [(0,)]
    entry = await cache.get("research.keyword", {"q": "a"})
    stale = await cache.get_stale("research.keyword", {"q": "a"})
    assert entry is not None and entry.response == {"rows": [1]}
    assert stale is not None and stale.cached_at == entry.cached_at


async def test_remembered_entries_are_written_together_after_the_delay(
    open_cache: Any, db_path: Path
) -> None:
    cache = await open_cache(flush_delay_s=0.01)
    cache.remember("research.keyword", {"q": "a"}, "old")
    cache.remember("research.keyword", {"q": "a"}, "new")  # the newest answer of a key wins
    cache.remember("research.keyword", {"q": "b"}, "b")
    for _ in range(500):
        if _sql(db_path, "SELECT count(*) FROM hybrid_cache") == [(2,)]:
            break
        await asyncio.sleep(0.01)
    rows = _sql(db_path, "SELECT response_json FROM hybrid_cache ORDER BY response_json")
    assert rows == [('"b"',), ('"new"',)]


async def test_close_writes_the_remembered_entries(open_cache: Any) -> None:
    first = await open_cache(flush_delay_s=60.0)
    first.remember("research.keyword", {"q": "a"}, [1, 2, 3])
    await first.close()
    second = await open_cache()
    entry = await second.get("research.keyword", {"q": "a"})
    assert entry is not None and entry.response == [1, 2, 3]


async def test_a_response_that_is_not_json_is_not_remembered(open_cache: Any) -> None:
    cache = await open_cache(flush_delay_s=60.0)
    assert not cache.remember("research.keyword", {"q": "a"}, {"when": object()})
    assert await cache.get("research.keyword", {"q": "a"}) is None
