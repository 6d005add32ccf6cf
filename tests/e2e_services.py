"""Services module the end-to-end tests load with EVERREACH_SERVICES=tests.e2e_services.

Every handler reports the pid of the process that ran it, so a test can tell the cloud instance
from the terminal. Side-effect handlers append one line per execution to the file named in
``params["log"]``, so a test can count executions across processes and restarts.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from service_registry import register


def _record(params: dict[str, Any], action: str) -> None:
    log = params.get("log")
    if log:
        line = json.dumps(
            {"action": action, "id": params.get("id"), "pid": os.getpid(), "at": time.time()}
        )
        with Path(log).open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())


async def _hold(params: dict[str, Any]) -> None:
    """Sleep ``sleep_s``; with ``sleep_while``, only while that file exists (at most ``sleep_s``).

    A test holds a handler mid-call as long as it needs (a kill lands mid-handler, a second
    call finds the key running) and lets it go by removing the file, instead of guessing a time.
    """
    sleep_s = float(params.get("sleep_s", 0))
    gate = params.get("sleep_while")
    if gate is None:
        await asyncio.sleep(sleep_s)
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + sleep_s
    while Path(gate).exists() and loop.time() < deadline:  # noqa: ASYNC110 (a file: another process)
        await asyncio.sleep(0.01)


@register("content.analyze_video")
async def analyze_video(params: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(float(params.get("sleep_s", 0)))
    return {"analyzed": params.get("url"), "pid": os.getpid()}


@register("content.generate")
async def generate(params: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(float(params.get("sleep_s", 0)))
    return {"piece": params.get("n"), "text": f"piece {params.get('n')}", "pid": os.getpid()}


@register("research.keyword")
async def research_keyword(params: dict[str, Any]) -> dict[str, Any]:
    _record(params, "research.keyword")
    return {"keyword": params.get("keyword"), "results": ["a", "b"], "pid": os.getpid()}


@register("research.platform")
async def research_platform(params: dict[str, Any]) -> dict[str, Any]:
    return {"platform": params.get("platform"), "pid": os.getpid()}


@register("dm.send")
async def dm_send(params: dict[str, Any]) -> dict[str, Any]:
    await _hold(params)
    _record(params, "dm.send")
    return {"sent_to": params.get("to"), "id": params.get("id"), "pid": os.getpid()}


@register("test.fail")
async def always_fail(params: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("boom")


@register("test.sync_add")
def sync_add(params: dict[str, Any]) -> dict[str, Any]:
    return {"sum": params.get("a", 0) + params.get("b", 0), "pid": os.getpid()}


@register("claude.complete")
async def claude_complete(params: dict[str, Any]) -> dict[str, Any]:
    _record(params, "claude.complete")
    return {"text": "done", "pid": os.getpid()}


@register("test.tick")
async def tick(params: dict[str, Any]) -> dict[str, Any]:
    """Record the wall-clock second of each run: two runs in one second are a double fire."""
    import time

    log = params.get("log")
    if log:
        with Path(log).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"second": int(time.time()), "pid": os.getpid()}) + "\n")
    return {"pid": os.getpid()}


@register("test.whoami")
async def whoami(params: dict[str, Any]) -> dict[str, Any]:
    """Answer the idempotency key the handler was given."""
    from service_registry import current_idempotency_key

    return {"key": current_idempotency_key(), "pid": os.getpid()}
