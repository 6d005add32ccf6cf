"""batch_execute: run many actions concurrently (at most ``max_concurrent`` at once), in order.

Each item goes through the router like a single call, so routing, fallback and the cost guard
apply; one failing item never fails the others, and results come back in input order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from envelope import Envelope, new_request_id
from errors import ActionError, HandlerError, InvalidParams

log = logging.getLogger("everreach.batch")

RouteFn = Callable[[str, dict[str, Any] | None, str | None], Awaitable[Envelope]]
ProgressFn = Callable[[int, int], None]
MAX_BATCH_ITEMS = 1_000
# The default bound of ``max_concurrent`` (BATCH_MAX_CONCURRENT): 1,000 cloud calls of 20 ms
# take 11x the ideal at 32 in flight, and near it at 256.
MAX_CONCURRENT_LIMIT = 256
# No configured bound goes past this: more in flight than items in a batch means nothing.
MAX_CONCURRENT_CEILING = MAX_BATCH_ITEMS


@dataclass(frozen=True, slots=True)
class BatchItem:
    action: str
    params: dict[str, Any]
    force_env: str | None = None


def parse_items(raw: Sequence[Any]) -> list[BatchItem]:
    """Validate ``[{action, params?, force_env?}, …]``; raise ``InvalidParams`` naming the item."""
    if len(raw) > MAX_BATCH_ITEMS:
        raise InvalidParams(f"a batch holds at most {MAX_BATCH_ITEMS} items; got {len(raw)}")
    items = []
    for index, entry in enumerate(raw):
        if isinstance(entry, BatchItem):
            items.append(entry)
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("action"), str):
            raise InvalidParams(f"items[{index}] must be an object with an 'action' string")
        params = entry.get("params") or {}
        if not isinstance(params, dict):
            raise InvalidParams(f"items[{index}].params must be a JSON object")
        items.append(BatchItem(entry["action"], params, entry.get("force_env")))
    return items


async def batch_execute(
    items: Sequence[BatchItem | dict[str, Any]],
    max_concurrent: int = 3,
    *,
    route: RouteFn,
    on_progress: ProgressFn | None = None,
    max_concurrent_limit: int = MAX_CONCURRENT_LIMIT,
) -> dict[str, Any]:
    """Run ``items`` through ``route`` with bounded concurrency; results in input order.

    ``max_concurrent`` above ``max_concurrent_limit`` (the instance's BATCH_MAX_CONCURRENT)
    is refused with ``InvalidParams``.
    """
    if not 1 <= max_concurrent <= max_concurrent_limit:
        raise InvalidParams(
            f"max_concurrent must be between 1 and {max_concurrent_limit} (this server's "
            f"BATCH_MAX_CONCURRENT); got {max_concurrent}: ask for fewer, or raise the setting"
        )
    parsed = parse_items(items)
    started = time.perf_counter()
    semaphore = asyncio.Semaphore(max_concurrent)
    results: list[dict[str, Any] | None] = [None] * len(parsed)
    done = 0

    async def run(index: int, item: BatchItem) -> None:
        nonlocal done
        async with semaphore:
            try:
                envelope = await route(item.action, item.params, item.force_env)
            except ActionError as exc:  # route() returns envelopes; this is belt and braces
                envelope = Envelope.failure(
                    item.action, exc, source=None, request_id=new_request_id()
                )
            except Exception as exc:  # e.g. a store that cannot write: fail this item only
                log.exception("batch item %d (%s) failed", index, item.action)
                envelope = Envelope.failure(
                    item.action,
                    HandlerError(f"{type(exc).__name__}: {exc}"),
                    source=None,
                    request_id=new_request_id(),
                )
            results[index] = envelope.to_dict()
        done += 1
        if on_progress is not None:
            on_progress(done, len(parsed))

    await asyncio.gather(*(run(i, item) for i, item in enumerate(parsed)))
    final = [r for r in results if r is not None]
    by_source: dict[str, int] = {}
    for result in final:
        key = result["source"] or "none"
        by_source[key] = by_source.get(key, 0) + 1
    return {
        "results": final,
        "summary": {
            "total": len(final),
            "ok": sum(1 for r in final if r["ok"]),
            "failed": sum(1 for r in final if not r["ok"] and not r.get("queued")),
            "queued": sum(1 for r in final if r.get("queued")),
            "by_source": by_source,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        },
    }
