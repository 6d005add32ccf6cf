"""The month's spend per day and where it is heading: what /status shows as cost.forecast."""

from __future__ import annotations

import asyncio
import tempfile
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from cost_guard import CostGuard
from cost_ledger import SqliteLedgerStore
from spend_forecast import sparkline


async def main(data_dir: str) -> None:
    now = datetime(2026, 3, 2, 12, tzinfo=UTC)  # the guard reads this clock
    store = SqliteLedgerStore(Path(data_dir) / "cost_ledger.sqlite3")
    guard = CostGuard(
        store, monthly_cap_usd=Decimal("60"), soft_cap_usd=Decimal("50"), tz=UTC, clock=lambda: now
    )
    await guard.open()
    try:
        for day, usd in ((2, "10"), (3, "20"), (9, "6")):  # three cloud calls in March
            now = now.replace(day=day)
            async with guard.spend("claude.complete", Decimal(usd), f"call-{day}"):
                pass  # the call ran and reported no cost: what was reserved is committed
        forecast = (await guard.snapshot())["forecast"]
    finally:
        await guard.close()
    print("daily spend     ", sparkline([Decimal(usd) for usd in forecast["daily_usd"]]))
    for key in ("spent_usd", "pace_usd_per_day", "projected_usd", "soft_cap_date", "hard_cap_date"):
        print(f"{key:16}", forecast[key])


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as data_dir:
        asyncio.run(main(data_dir))
