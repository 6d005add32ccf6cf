"""Guard cloud calls with a monthly cap: reserve first, then commit what it cost, or release."""

from __future__ import annotations

import asyncio
import tempfile
from decimal import Decimal

from config.hybrid_config import HybridConfig
from cost_guard import CostGuard
from cost_rates import CostRates
from errors import CostCapReached


async def main(data_dir: str) -> None:
    config = HybridConfig.from_mapping({"DATA_DIR": data_dir, "MONTHLY_COST_CAP": "0.025"})
    guard = CostGuard.from_config(config)  # SQLite ledger under DATA_DIR: no server needed
    rates = CostRates.load(None)
    await guard.open()
    try:
        for n in range(4):
            try:
                reservation = await guard.reserve(
                    "claude.complete", rates.rate("claude.complete"), f"call-{n}"
                )
            except CostCapReached as refused:
                print(f"call {n}: refused ({refused.code.value})")
                continue
            if n == 0:
                await guard.release(reservation)  # the call provably never ran: give it back
            else:
                await guard.commit(reservation, Decimal("0.0123"))  # the cost the cloud reported
            print(f"call {n}: {'released' if n == 0 else 'committed'}")
        print("spent this month:", (await guard.snapshot())["spent_usd"])
    finally:
        await guard.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as data_dir:
        asyncio.run(main(data_dir))
