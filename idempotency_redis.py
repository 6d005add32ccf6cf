"""RedisIdempotencyStore: share idempotency claims between replicas through Redis.

The durable record is this instance's SQLite ``IdempotencyStore``; Redis only adds the other
replicas' claims while it keeps its data (see ``idempotency`` for what a claim is).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from idempotency import (
    KEEP_S,
    LEASE_S,
    Claim,
    ClaimState,
    ClaimStore,
    Heartbeat,
    IdempotencyStore,
    KeyState,
    RowState,
    StoredKey,
    Verdict,
)
from redis_client import RedisRef, redis_failed

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger("idempotency")

# Replace the record at KEYS[1] if it is absent or held by ARGV[1]; ARGV[2] is the new record
# ('' deletes), ARGV[3] its time to live in seconds.
_SWAP_IF_HOLDER = """
local raw = redis.call('GET', KEYS[1])
if raw then
  local ok, rec = pcall(cjson.decode, raw)
  if ok and rec['holder'] ~= ARGV[1] then return 0 end
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
return 1
"""


class RedisIdempotencyStore(ClaimStore):
    """This instance's SQLite record first; Redis shares claims with the other replicas.

    Every claim consults the durable SQLite record, so a Redis that restarts empty (or a key
    claimed while Redis was down) never makes this instance run a key twice. Redis adds the
    other replicas' claims while it keeps its data: when it loses them, replicas no longer see
    each other's keys — several replicas that must never run a key twice need PostgreSQL.
    """

    def __init__(
        self,
        redis_url: str | None,
        durable: IdempotencyStore,
        *,
        redis: aioredis.Redis | None = None,
        lease_s: float = LEASE_S,
        keep_s: float = KEEP_S,
        prefix: str = "everreach:idem:",
        socket_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # ``redis``: the process's shared client (borrowed); else one of ``redis_url``, owned.
        self._redis_ref = RedisRef(redis_url, redis, socket_timeout_s=socket_timeout_s, block_s=0)
        self._durable = durable
        self.holder = durable.holder
        self._lease_s = lease_s
        self._keep_s = int(keep_s)
        self._prefix = prefix
        self._clock = clock
        self._redis: Any = None
        self._held: dict[str, dict[str, Any]] = {}  # running records this process wrote
        self._heartbeat = Heartbeat(self.renew, lease_s)

    async def open(self) -> None:
        await self._durable.open()
        self._redis = self._redis_ref.open()
        self._heartbeat.start()

    async def close(self) -> None:
        await self._heartbeat.stop()
        await self._redis_ref.close()
        self._redis = None
        await self._durable.close()

    async def claim(
        self, key: str, action: str, params_hash: str, rerun_if_dead: bool = False
    ) -> Claim:
        claim = await self._durable.claim(key, action, params_hash, rerun_if_dead)
        if claim.state is not ClaimState.NEW:
            return claim
        try:
            shared = await self._shared_claim(key, action, params_hash, rerun_if_dead)
        except redis_failed():
            return claim  # Redis down: this instance's durable record is the guarantee
        if shared.state is not ClaimState.NEW:
            await self._durable.release(key, ran=False)  # another replica has the key
        return shared

    async def _shared_claim(
        self, key: str, action: str, params_hash: str, rerun_if_dead: bool
    ) -> Claim:
        record = self._record("running", action, params_hash, self.holder.token)
        for _ in range(3):
            if await self._redis.set(
                self._prefix + key, json.dumps(record), nx=True, ex=self._keep_s
            ):
                self._hold(key, record)
                return Claim(ClaimState.NEW)
            raw = await self._redis.get(self._prefix + key)
            if raw is None:
                continue
            stored = _redis_record(raw, self._clock())
            verdict = self.judge(stored, action, params_hash, rerun_if_dead)
            if isinstance(verdict, Claim):
                return verdict
            if verdict is Verdict.TAKE:
                if await self._swap(key, stored.holder or "", record):
                    self._hold(key, record)
                    return Claim(ClaimState.NEW)
                continue
            parked = self._record("indeterminate", action, params_hash, stored.holder or "")
            await self._swap(key, stored.holder or "", parked)
            return Claim(ClaimState.INDETERMINATE)
        return Claim(ClaimState.RUNNING)

    def _record(self, state: str, action: str | None, params_hash: str | None, holder: str):
        return {
            "state": state,
            "action": action,
            "params_hash": params_hash,
            "holder": holder,
            "beat": self._clock(),
        }

    def _hold(self, key: str, record: dict[str, Any]) -> None:
        self._held[key] = record
        self._heartbeat.held = len(self._held)

    async def _swap(self, key: str, holder: str, record: dict[str, Any] | None) -> bool:
        new = json.dumps(record) if record is not None else ""
        done = await self._redis.eval(
            _SWAP_IF_HOLDER, 1, self._prefix + key, holder, new, self._keep_s
        )
        return bool(done)

    async def _finish(self, key: str, record: dict[str, Any] | None) -> None:
        held = self._held.pop(key, None)
        self._heartbeat.held = len(self._held)
        if held is None:
            return
        if record is not None:
            record.update(action=held["action"], params_hash=held["params_hash"])
        try:
            await self._swap(key, self.holder.token, record)
        except redis_failed():
            log.warning("idempotency key %s: Redis did not take its outcome", key)

    async def complete(self, key: str, status_code: int, body: Any) -> None:
        await self._durable.complete(key, status_code, body)
        done = self._record("done", None, None, "")
        done.update(status_code=status_code, body=body)
        await self._finish(key, done)

    async def release(self, key: str, *, ran: bool = True) -> None:
        await self._durable.release(key, ran=ran)
        await self._finish(key, self._record("failed", None, None, "") if ran else None)

    async def lookup(self, key: str) -> KeyState:
        state = await self._durable.lookup(key)
        if state is not KeyState.UNKNOWN:
            return state
        try:
            raw = await self._redis.get(self._prefix + key)
        except redis_failed():
            return state
        if raw is None:
            return state
        return _redis_record(raw, self._clock()).key_state(self.holder, self._lease_s)

    async def renew(self) -> None:
        for key, record in list(self._held.items()):
            record["beat"] = self._clock()
            await self._swap(key, self.holder.token, record)

    async def size(self) -> int:
        return await self._durable.size()


def _redis_record(raw: str, now: float) -> StoredKey:
    stored = json.loads(raw)
    body = stored.get("body")
    return StoredKey(
        action=stored.get("action") or "",
        params_hash=stored.get("params_hash") or "",
        state=stored.get("state") or RowState.RUNNING,
        status_code=stored.get("status_code"),
        response_json=None if body is None else json.dumps(body),
        holder=stored.get("holder"),
        heartbeat_age_s=now - float(stored.get("beat") or 0.0),
    )
