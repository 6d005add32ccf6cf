"""StateSync: replay the outbox and push local state to the cloud, pull the cloud's state.

``push_pending_sync()`` replays outbox items in order with each item's original idempotency key,
then sends queued local state changes to the cloud's ``POST /api/sync/state``;
``pull_cloud_state()`` fetches ``GET /api/sync/state`` and applies it by the conflict rules.
``serve_state()`` / ``accept_state()`` are the serving side of both, in every instance. The
side that is pushed to, or pulled from, is the cloud.

This module also re-exports the outbox and the state store, so ``state_sync`` is the one import
for everything offline-write related.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from cloud_client import CloudClient
from errors import (
    ActionError,
    CircuitOpen,
    CloudUnavailable,
    CostCapReached,
    Indeterminate,
    InvalidParams,
    KeyBusy,
    Offline,
    RateLimited,
    Unauthorized,
)
from outbox import Outbox
from outbox_rows import OutboxItem, OutboxStatus
from sqlite_file import parse_timestamp
from state_store import WELL_KNOWN_KEYS, StateKind, StateOrigin, StateStore, resolve_conflict

if TYPE_CHECKING:
    from config.hybrid_config import HybridConfig
    from deferral import Deferral

__all__ = [
    "WELL_KNOWN_KEYS",
    "Outbox",
    "OutboxItem",
    "OutboxStatus",
    "SendFn",
    "StateKind",
    "StateOrigin",
    "StateStore",
    "StateSync",
    "resolve_conflict",
]

log = logging.getLogger(__name__)

SendFn = Callable[[str, dict[str, Any], str], Awaitable[Any]]

SYNC_STATE_PATH = "/api/sync/state"
STATE_PUSH_BATCH = 100
OUTBOX_PASS_BATCH = 100
DEFAULT_TIMEOUT_S = 10.0


class _Failure(StrEnum):
    PERMANENT = "permanent"  # the cloud refused the item (4xx): dead letter
    ATTEMPT = "attempt"  # the item may have run (timeout, 5xx): spend an attempt, stop the pass
    BLOCKED = "blocked"  # the request never reached the cloud: stop the pass, item untouched
    BUSY = "busy"  # the cloud still runs this key (409): try it next pass, go on with the rest
    MAY_HAVE_RUN = "may_have_run"  # its holder died mid-handler: park it for a person


def _classify(exc: Exception) -> _Failure:
    if isinstance(exc, KeyBusy):
        return _Failure.BUSY
    if isinstance(exc, Indeterminate):
        return _Failure.MAY_HAVE_RUN
    if isinstance(exc, Unauthorized | CostCapReached | CircuitOpen | Offline | RateLimited):
        return _Failure.BLOCKED  # about this instance (key, budget, circuit), not the item
    if isinstance(exc, CloudUnavailable) and exc.never_ran:
        return _Failure.BLOCKED
    if isinstance(exc, ActionError) and 400 <= exc.http_status < 500:
        return _Failure.PERMANENT
    return _Failure.ATTEMPT


@dataclass(frozen=True)
class _StateChange:
    key: str
    value: Any
    kind: str
    updated_at: datetime


def _parse_change(raw: Any, where: str) -> _StateChange:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object")
    key, kind = raw.get("key"), raw.get("kind", StateKind.GENERIC.value)
    if not isinstance(key, str) or not key or len(key) > 256:
        raise ValueError(f"{where}.key must be a non-empty string of at most 256 characters")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{where}.kind must be a non-empty string")
    if "value" not in raw:
        raise ValueError(f"{where}.value is missing")
    try:
        updated_at = parse_timestamp(raw["updated_at"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}.updated_at must be an ISO 8601 timestamp") from None
    return _StateChange(key, raw["value"], kind, updated_at)


class StateSync:
    """Push the outbox and local changes to the cloud, pull its state, serve ours."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        store: StateStore,
        send: SendFn,
        cloud: CloudClient | None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        deferral: Deferral | None = None,
    ) -> None:
        self.outbox = outbox
        self.store = store
        self._send = send
        self.cloud = cloud
        self.endpoint = cloud.endpoint if cloud is not None else None
        self.timeout_s = timeout_s
        self.deferral = deferral  # pacing: a due item claims its slot, or waits for another
        self._push_lock = asyncio.Lock()

    @classmethod
    def from_config(
        cls,
        config: HybridConfig,
        *,
        outbox: Outbox,
        store: StateStore,
        send: SendFn,
        cloud: CloudClient | None,
        deferral: Deferral | None = None,
    ) -> StateSync:
        """Sync through ``cloud`` (CLOUD_ENDPOINT's client), within CLOUD_TIMEOUT_SEC."""
        return cls(
            outbox=outbox,
            store=store,
            send=send,
            cloud=cloud,
            timeout_s=min(DEFAULT_TIMEOUT_S, config.cloud_timeout_sec),
            deferral=deferral,
        )

    async def push_pending_sync(self) -> dict[str, int]:
        """Replay the outbox in order, then push local state changes; return the counts.

        Each item is sent with its original idempotency key and leaves the outbox only when
        ``send`` returns. A 4xx makes it a dead letter and the pass goes on; a key the cloud
        still runs (409) is skipped until the next pass, and one whose holder died mid-handler
        is parked as an indeterminate dead letter — neither spends an attempt, and the pass goes
        on. Any other failure ends the pass so that later items never overtake it.
        """
        async with self._push_lock:
            counts = {"sent": 0, "dead": 0, "failed": 0, "remaining": 0, "state_pushed": 0}
            await self._replay_outbox(counts)
            counts["state_pushed"] = await self._push_state()
            counts["remaining"] = await self.outbox.depth()
            return counts

    async def replay_outbox(self) -> dict[str, int]:
        """Replay the due outbox items only (``DueLoop``: an item's time has come)."""
        async with self._push_lock:
            counts = {"sent": 0, "dead": 0, "failed": 0, "deferred": 0}
            await self._replay_outbox(counts)
            return counts

    async def _replay_outbox(self, counts: dict[str, int]) -> None:
        skipped: set[str] = set()  # busy keys: tried once this pass
        while True:
            batch = await self.outbox.pending(limit=OUTBOX_PASS_BATCH + len(skipped))
            batch = [item for item in batch if item.id not in skipped]
            if not batch:
                return
            for item in batch:
                if self.deferral is not None and not await self.deferral.admit(item):
                    counts["deferred"] = counts.get("deferred", 0) + 1  # waits for its slot
                    continue
                try:
                    result = await self._send(item.action, item.params, item.idempotency_key)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if isinstance(exc, RateLimited) and self.deferral is not None:
                        await self.deferral.reschedule(item, exc.not_before, None)
                        counts["deferred"] = counts.get("deferred", 0) + 1  # the cloud's limit
                        continue
                    if _classify(exc) is _Failure.BUSY:
                        skipped.add(item.id)
                    if await self._failed(item, exc, counts):
                        continue
                    return
                await self.outbox.ack(item.id, result)
                counts["sent"] += 1

    async def _failed(self, item: OutboxItem, exc: Exception, counts: dict[str, int]) -> bool:
        """Record a failed replay of ``item``; return whether the pass goes on."""
        error = _describe(exc)
        kind = _classify(exc)
        if kind is _Failure.BUSY:
            # Not a failure of the item: its first run is still going. Spend no attempt and
            # let nothing else wait behind it.
            counts["failed"] += 1
            return True
        if kind is _Failure.MAY_HAVE_RUN:
            await self.outbox.park(item.id, error)
            counts["dead"] += 1
            log.error(
                "outbox item %s (%s, key %s) may have run: parked for a person to retry or drop",
                item.id,
                item.action,
                item.idempotency_key,
            )
            return True
        status = await self.outbox.fail(
            item.id,
            error,
            permanent=kind is _Failure.PERMANENT,
            count_attempt=kind is not _Failure.BLOCKED,
        )
        if status is OutboxStatus.DEAD:
            counts["dead"] += 1
            log.error(
                "outbox item %s (%s, key %s) is a dead letter: %s",
                item.id,
                item.action,
                item.idempotency_key,
                error,
            )
        else:
            counts["failed"] += 1
        if kind is _Failure.PERMANENT:
            return True
        log.warning("outbox replay stopped at %s (%s): %s", item.id, item.action, error)
        return False

    async def _push_state(self) -> int:
        if self.cloud is None:
            return 0
        pushed = 0
        while changes := await self.store.pending_changes(limit=STATE_PUSH_BATCH):
            fields = ("key", "value", "kind", "updated_at")
            body = {"changes": [{name: change[name] for name in fields} for change in changes]}
            try:
                await self.cloud.request_json(
                    "POST", SYNC_STATE_PATH, body=body, timeout_s=self.timeout_s
                )
            except ActionError as exc:
                log.warning("pushing %d state change(s) failed: %s", len(changes), exc.detail)
                break
            await self.store.mark_pushed([c["id"] for c in changes])
            pushed += len(changes)
        return pushed

    async def pull_cloud_state(self) -> dict[str, Any]:
        """Fetch the cloud's state and apply each entry by the conflict rules.

        Returns ``{"applied": n, "rejected": m, "keys": [applied keys]}``; raises
        ``CloudUnavailable`` / ``CloudTimeout`` / ``Unauthorized`` when the cloud does not answer
        with a usable body.
        """
        if self.cloud is None:
            raise CloudUnavailable("no CLOUD_ENDPOINT is configured", never_ran=True)
        body = await self.cloud.request_json("GET", SYNC_STATE_PATH, timeout_s=self.timeout_s)
        state = body.get("state") if isinstance(body, dict) else None
        if not isinstance(state, dict):
            raise CloudUnavailable(f"GET {SYNC_STATE_PATH} answered without a 'state' object")
        applied: list[str] = []
        rejected = 0
        for key, entry in state.items():
            raw = {**entry, "key": key} if isinstance(entry, dict) else entry
            try:
                change = _parse_change(raw, f"state[{key!r}]")
            except ValueError as exc:
                log.warning("pulled state: skipping %r: %s", key, exc)
                rejected += 1
                continue
            won = await self.store.apply_remote(
                change.key, change.value, kind=change.kind, updated_at=change.updated_at
            )
            if won:
                applied.append(change.key)
            else:
                rejected += 1
        return {"applied": len(applied), "rejected": rejected, "keys": applied}

    async def serve_state(self) -> dict[str, Any]:
        """Body of ``GET /api/sync/state``: ``{"state": {key: {value, kind, updated_at}}}``."""
        snapshot = await self.store.snapshot()
        return {
            "state": {
                key: {"value": e["value"], "kind": e["kind"], "updated_at": e["updated_at"]}
                for key, e in snapshot["state"].items()
            }
        }

    async def accept_state(self, body: dict[str, Any]) -> dict[str, Any]:
        """Apply a ``POST /api/sync/state`` body as the cloud; ``{"applied": n, "rejected": m}``.

        This instance is the receiver of a push, so it is the cloud: its own copy of CRM and
        pipeline data is kept, the terminal's content pending publish is taken, and otherwise
        the newer entry wins. A malformed body is ``InvalidParams`` and nothing is applied.
        """
        raw = body.get("changes") if isinstance(body, dict) else None
        if not isinstance(raw, list):
            raise InvalidParams('the body must be {"changes": [{key, value, kind, updated_at}]}')
        try:
            changes = [_parse_change(c, f"changes[{i}]") for i, c in enumerate(raw)]
        except ValueError as exc:
            raise InvalidParams(str(exc)) from None
        applied = 0
        for change in changes:
            won = await self.store.apply_remote(
                change.key,
                change.value,
                kind=change.kind,
                updated_at=change.updated_at,
                local_is_cloud=True,
            )
            applied += won
        return {"applied": applied, "rejected": len(changes) - applied}


def _describe(exc: Exception) -> str:
    detail = exc.detail if isinstance(exc, ActionError) else str(exc)
    code = exc.code.value if isinstance(exc, ActionError) else type(exc).__name__
    return f"{code}: {detail}"
