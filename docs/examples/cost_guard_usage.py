"""Guard cloud calls with a monthly cap: one spend bracket per call settles its reservation."""

from __future__ import annotations

import asyncio
import tempfile
from decimal import Decimal

from config.hybrid_config import HybridConfig
from cost_guard import CostGuard
from cost_rates import CostRates
from errors import CloudUnavailable, CostCapReached


async def main(data_dir: str) -> None:
    config = HybridConfig.from_mapping({"DATA_DIR": data_dir, "MONTHLY_COST_CAP": "0.025"})
    guard = CostGuard.from_config(config)  # SQLite ledger under DATA_DIR: no server needed
    rate = CostRates.load(None).rate("claude.complete")  # $0.01 a call
    await guard.open()
    try:
        for n in range(4):
            try:
                async with guard.spend("claude.complete", rate, f"call-{n}") as spend:
                    print(f"call {n}: reserved ${spend.limit_usd:.2f}, sent as Cost-Limit")
                    if n == 0:  # refused before it reached the cloud: the reservation is freed
                        raise CloudUnavailable("connection refused", never_ran=True)
                    if n == 1:
                        spend.ran(Decimal("0.0073"))  # the cost the cloud reported
                    # n == 2: the cloud reported no cost, so the amount reserved is committed
                print(f"call {n}: ran, committed")
            except CloudUnavailable:
                print(f"call {n}: never ran, released")
            except CostCapReached as refused:
                print(f"call {n}: refused ({refused.code.value}), nothing sent")
        print("spent this month:", (await guard.snapshot())["spent_usd"])
    finally:
        await guard.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as data_dir:
        asyncio.run(main(data_dir))
