"""cost_report: the month's spend by action (committed and still reserved) and the forecast,
read from a real SQLite ledger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from cost_ledger import LedgerUnavailable, ReserveRequest, SqliteLedgerStore
from cost_report import read_report

MONTH = "2026-03"
NOW = datetime(2026, 3, 10, 12, tzinfo=UTC)
CAP = Decimal("100")


async def _reserve(ledger: SqliteLedgerStore, rid: str, action: str, usd: str, at: datetime):
    request = ReserveRequest(rid, MONTH, action, Decimal(usd), f"key-{rid}", CAP, at, 3600.0)
    assert (await ledger.reserve(request)).accepted


async def test_by_action_splits_committed_from_reserved_and_the_forecast_counts_both(
    tmp_path: Path,
) -> None:
    ledger = SqliteLedgerStore(tmp_path / "ledger.sqlite3")
    await ledger.open()
    try:
        await _reserve(ledger, "a", "claude.complete", "2.50", NOW - timedelta(days=2))
        await ledger.settle("a", Decimal("2.00"), NOW - timedelta(days=2))  # cost less
        await _reserve(ledger, "b", "claude.complete", "1.00", NOW)
        await _reserve(ledger, "c", "research.keyword", "0.25", NOW)  # still reserved
        await ledger.settle("b", Decimal("1.00"), NOW)
        report = await read_report(
            ledger, MONTH, NOW, UTC, soft_cap_usd=Decimal("5"), hard_cap_usd=CAP
        )
    finally:
        await ledger.close()
    assert report.by_action == {"claude.complete": "3.00"}
    assert report.reserved_by_action == {"research.keyword": "0.25"}
    forecast = report.forecast
    assert forecast["as_of"] == "2026-03-10"
    daily = [Decimal(d) for d in forecast["daily_usd"]]
    assert len(daily) == 10 and daily[7] == Decimal("2.00") and daily[9] == Decimal("1.25")
    assert Decimal(forecast["spent_usd"]) == Decimal("3.25")


async def test_a_closed_ledger_is_unavailable(tmp_path: Path) -> None:
    ledger = SqliteLedgerStore(tmp_path / "ledger.sqlite3")
    with pytest.raises(LedgerUnavailable, match="not open"):
        await read_report(ledger, MONTH, NOW, UTC, soft_cap_usd=CAP, hard_cap_usd=CAP)
