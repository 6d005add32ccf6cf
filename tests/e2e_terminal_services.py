"""Services of a terminal that has no handlers for the cloud's side-effect actions.

With it, ``dm.send`` can only run in the cloud, so a terminal that cannot reach the cloud must
queue it in the outbox: the path the fault tests exercise.
"""

from __future__ import annotations

import os
from typing import Any

from service_registry import register


@register("content.generate")
async def generate(params: dict[str, Any]) -> dict[str, Any]:
    return {"piece": params.get("n"), "text": f"piece {params.get('n')}", "pid": os.getpid()}


@register("research.platform")
async def research_platform(params: dict[str, Any]) -> dict[str, Any]:
    return {"platform": params.get("platform"), "pid": os.getpid(), "local": True}
