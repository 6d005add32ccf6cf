"""What ``/status`` says of the month's spend beyond the totals, read from the ledger.

``CostGuard.snapshot()`` keeps the totals and the caps; this module reads the rest when
``/status`` is asked (never on a dispatch): the spend of each action, committed and still
reserved, and the forecast (``spend_forecast.report``) from the spend of each local day.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, tzinfo
from decimal import Decimal
from typing import Any

from cost_ledger import LedgerStore
from cost_reservation import usd
from spend_forecast import day_starts, report


@dataclass(frozen=True)
class LedgerReport:
    """Money as exact decimal strings, per action; ``forecast`` as ``cost.forecast``."""

    by_action: dict[str, str]
    reserved_by_action: dict[str, str]
    forecast: dict[str, Any]


async def read_report(
    store: LedgerStore,
    month: str,
    now: datetime,
    tz: tzinfo,
    *,
    soft_cap_usd: Decimal,
    hard_cap_usd: Decimal,
) -> LedgerReport:
    """Read ``month``'s report from ``store`` (``LedgerUnavailable`` if it does not answer)."""
    per_day = await store.daily(month, day_starts(month, tz))
    forecast = report(
        per_day,
        today=now.astimezone(tz).date(),
        soft_cap_usd=soft_cap_usd,
        hard_cap_usd=hard_cap_usd,
    )
    by_action: dict[str, str] = {}
    reserved_by_action: dict[str, str] = {}
    for action, spend in sorted((await store.by_action(month)).items()):
        if spend.committed_usd:
            by_action[action] = usd(spend.committed_usd)
        if spend.reserved_usd:
            reserved_by_action[action] = usd(spend.reserved_usd)
    return LedgerReport(by_action, reserved_by_action, forecast)
