"""Services module with an alert action: ``ops.notify`` keeps every call it gets in ``RECEIVED``.

Loaded in-process (``EVERREACH_SERVICES=tests.alert_services``) by the runtime's alert tests,
which read ``RECEIVED`` to see what ALERT_ACTION was called with.
"""

from __future__ import annotations

from typing import Any

from service_registry import register

RECEIVED: list[dict[str, Any]] = []


@register("ops.notify")
async def notify(params: dict[str, Any]) -> dict[str, Any]:
    RECEIVED.append(dict(params))
    return {"ok": True}
