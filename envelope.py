"""The result envelope every path returns, built in this one place.

An ``Envelope`` is frozen: the named constructors (``success``, ``failure``, ``queued_in_outbox``,
``deferred``, ``conflict``, ``too_large``) take every field the outcome has, so nothing changes
it afterwards.
``outcome`` is the one short word a dispatch ended with (``ok``, ``queued`` or the error code),
shared by the log line, the metrics and the ``/status`` counts.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from errors import (
    HTTP_STATUS_BY_CODE,
    ActionError,
    CostLimitExceeded,
    Env,
    ErrorCode,
    InvalidParams,
    KeyBusy,
    PayloadTooLarge,
    RateLimited,
    Source,
)
from frozen_init import fast_init

_MISSING: Any = object()

# Visible ASCII only, 8 to 200 characters (as the IETF Idempotency-Key draft and Stripe allow):
# a key travels in an HTTP header, where CR, LF or NUL would split or break the request.
IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{8,200}")
IDEMPOTENCY_KEY_RULE = "8 to 200 visible ASCII characters (0x21-0x7E: no spaces, CR, LF or NUL)"
_HEADER_SAFE_RE = re.compile(r"[\x21-\x7e]+")


def new_request_id() -> str:
    """Return a fresh request id (also used as the Idempotency-Key of cloud calls)."""
    # 128 random bits as 32 hex digits, like uuid4().hex (122 bits) at a fraction of the CPU:
    # the bits of 64 ids are read from os.urandom at once (one system call, not one per id:
    # 0.8 -> 0.3 µs per id, timeit). Taking the next id of a list iterator is atomic under the
    # GIL, so threads never share one; a forked child drops what its parent had read.
    found = next(_ids, None)
    return found if found is not None else _refill()


def _refill() -> str:
    global _ids, _hooked
    if not _hooked:  # at the first id, not at import
        os.register_at_fork(after_in_child=_forget_ids)
        _hooked = True
    text = os.urandom(16 * _IDS_PER_READ).hex()
    ids = iter([text[i : i + 32] for i in range(0, len(text), 32)])
    first = next(ids)
    _ids = ids
    return first


def _forget_ids() -> None:
    global _ids
    _ids = iter(())


_IDS_PER_READ = 64
_ids: Iterator[str] = iter(())
_hooked = False


def check_idempotency_key(key: object, *, what: str = "idempotency_key") -> str:
    """Return ``key`` if it may travel in an ``Idempotency-Key`` header, else raise."""
    if not isinstance(key, str) or not IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise InvalidParams(f"{what} must be {IDEMPOTENCY_KEY_RULE}")
    return key


def check_header_safe(key: str) -> str:
    """Return ``key`` if it can be sent as a header value as it is (visible ASCII), else raise.

    The last guard before a request id leaves in ``Idempotency-Key``: keys are checked in full
    where they enter (``check_idempotency_key``); this one holds for ids made in code too.
    """
    if not _HEADER_SAFE_RE.fullmatch(key):
        raise InvalidParams(f"an idempotency key must be {IDEMPOTENCY_KEY_RULE}")
    return key


@fast_init
@dataclass(frozen=True, slots=True)
class Envelope:
    """Outcome of one action; ``to_dict()`` is the JSON body clients see. Immutable."""

    ok: bool
    action: str
    source: Source | None
    result: Any = None
    error: ErrorCode | None = None
    detail: str | None = None
    duration_ms: float = 0.0
    request_id: str = field(default_factory=new_request_id)
    attempts: int = 0
    cost_usd: Decimal = Decimal(0)
    cost_guard_triggered: bool = False
    cached_at: str | None = None
    cached: Any = _MISSING
    queued: bool = False
    outbox_id: str | None = None
    # The serving instance's price when it refused a call over the caller's Cost-Limit.
    price_usd: Decimal | None = None
    # When a deferred (or scheduled) action is sent, or when a rate-limited one may be asked again.
    deferred_until: datetime | None = None
    # Where the router sent the call; for logs and metrics, not part of the JSON body.
    env: Env | None = None
    # ``result`` as JSON text, when the registry encoded it already (``ServiceRegistry.call``).
    result_json: bytes | None = field(default=None, repr=False, compare=False)

    def __getitem__(self, key: str) -> Any:
        """Read a field as in the JSON body (``envelope["source"]``), as the PRD's dicts did."""
        return self.to_dict()[key]

    @classmethod
    def success(
        cls,
        action: str,
        result: Any,
        *,
        source: Source,
        request_id: str,
        attempts: int = 1,
        duration_ms: float = 0.0,
        cost_usd: Decimal = Decimal(0),
        cached_at: str | None = None,
        detail: str | None = None,
        cost_guard_triggered: bool = False,
        env: Env | None = None,
        result_json: bytes | None = None,
    ) -> Envelope:
        """Build the envelope of an action that ran (or was served) successfully.

        ``result_json`` is ``result`` already encoded (by the registry): the body embeds it.
        """
        return cls(
            ok=True,
            action=action,
            source=source,
            result=result,
            detail=detail,
            request_id=request_id,
            attempts=attempts,
            duration_ms=duration_ms,
            cost_usd=cost_usd,
            cost_guard_triggered=cost_guard_triggered,
            cached_at=cached_at,
            env=env,
            result_json=result_json,
        )

    @classmethod
    def failure(
        cls,
        action: str,
        exc: ActionError,
        *,
        source: Source | None,
        request_id: str,
        duration_ms: float = 0.0,
        cost_guard_triggered: bool = False,
        cached: Any = _MISSING,
        cached_at: str | None = None,
        env: Env | None = None,
    ) -> Envelope:
        """Build the envelope of a failed action from its exception (stale data in ``cached``)."""
        return cls(
            ok=False,
            action=action,
            source=source,
            error=exc.code,
            detail=exc.detail,
            duration_ms=duration_ms,
            request_id=request_id,
            attempts=exc.attempts,
            cost_guard_triggered=cost_guard_triggered,
            cached=cached,
            cached_at=cached_at,
            price_usd=exc.price_usd if isinstance(exc, CostLimitExceeded) else None,
            deferred_until=exc.not_before if isinstance(exc, RateLimited) else None,
            env=env,
        )

    @classmethod
    def queued_in_outbox(
        cls,
        action: str,
        *,
        outbox_id: str,
        request_id: str,
        detail: str,
        attempts: int = 0,
        duration_ms: float = 0.0,
        cost_guard_triggered: bool = False,
        env: Env | None = None,
    ) -> Envelope:
        """Build the 202 envelope of an action kept in the outbox to be sent later."""
        return cls(
            ok=False,
            action=action,
            source=Source.OUTBOX,
            detail=detail,
            duration_ms=duration_ms,
            request_id=request_id,
            attempts=attempts,
            cost_guard_triggered=cost_guard_triggered,
            queued=True,
            outbox_id=outbox_id,
            env=env,
        )

    @classmethod
    def deferred(
        cls,
        action: str,
        *,
        outbox_id: str,
        request_id: str,
        deferred_until: datetime,
        detail: str,
        duration_ms: float = 0.0,
        env: Env | None = None,
    ) -> Envelope:
        """Build the 202 envelope of an action kept in the outbox until ``deferred_until``
        (over a pacing limit, or scheduled)."""
        queued = cls.queued_in_outbox(
            action,
            outbox_id=outbox_id,
            request_id=request_id,
            detail=detail,
            duration_ms=duration_ms,
            env=env,
        )
        return replace(queued, deferred_until=deferred_until)

    @classmethod
    def conflict(cls, action: str, *, request_id: str, detail: str) -> Envelope:
        """Build the 409 envelope of a repeat whose idempotency key another call still runs."""
        return cls.failure(action, KeyBusy(detail), source=None, request_id=request_id)

    @classmethod
    def too_large(cls, detail: str, *, action: str = "") -> Envelope:
        """Build the 413 envelope of a request whose body is over the size limit."""
        return cls.failure(
            action, PayloadTooLarge(detail), source=None, request_id=new_request_id()
        )

    @property
    def outcome(self) -> str:
        """``ok``, ``queued``, or the error code: how the call ended, in one word."""
        if self.ok:
            return "ok"
        if self.queued:
            return "queued"
        return self.error._value_ if self.error else "error"

    @property
    def http_status(self) -> int:
        """HTTP status of this outcome for ``/dispatch``."""
        if self.queued:  # first: a queued envelope is 202 whether or not it is marked ok
            return 202
        if self.ok:
            return 200
        return HTTP_STATUS_BY_CODE.get(self.error, 500) if self.error else 500

    def to_dict(self) -> dict[str, Any]:
        # An enum member's ``_value_`` is its value as a plain attribute; ``.value`` is a
        # property, a Python call each (~0.2 µs).
        body: dict[str, Any] = {
            "ok": self.ok,
            "action": self.action,
            "source": self.source._value_ if self.source else None,
            "result": self.result,
            "error": self.error._value_ if self.error else None,
            "detail": self.detail,
            "duration_ms": round(self.duration_ms, 3),
            "request_id": self.request_id,
            "attempts": self.attempts,
            "cost_usd": float(self.cost_usd),
            "cost_guard_triggered": self.cost_guard_triggered,
        }
        if self.cached_at is not None:
            body["cached_at"] = self.cached_at
        if self.cached is not _MISSING:
            body["cached"] = self.cached
        if self.price_usd is not None:
            body["price_usd"] = format(self.price_usd.normalize(), "f")  # exact decimal text
        if self.queued:
            body["queued"] = True
            body["outbox_id"] = self.outbox_id
        if self.deferred_until is not None:
            body["deferred_until"] = rfc3339(self.deferred_until)
        return body

    def retry_after(self) -> str | None:
        """The ``Retry-After`` header value of a rate-limited answer (whole seconds)."""
        if self.error is not ErrorCode.RATE_LIMITED or self.deferred_until is None:
            return None
        wait = (self.deferred_until - datetime.now(UTC)).total_seconds()
        return str(max(1, math.ceil(wait)))

    def to_json(self) -> bytes:
        """The JSON body of ``to_dict()``, encoded once; no input can make it fail or hold NaN.

        Every field but ``result`` and ``cached`` has a type that cannot hold NaN, so when the
        result was encoded by the registry (or is None) and nothing is cached, orjson writes the
        body around the registry's text (0.3 µs instead of 4 µs); other bodies, and a detail
        with a lone surrogate (which orjson refuses), take ``envelope_bytes``.
        """
        body = self.to_dict()
        if self.cached is _MISSING and (self.result_json is not None or self.result is None):
            if self.result_json is not None:
                body["result"] = orjson.Fragment(self.result_json)
            try:
                return orjson.dumps(body)
            except orjson.JSONEncodeError:
                body["result"] = self.result
        return envelope_bytes(body)


def rfc3339(when: datetime) -> str:
    """``when`` in UTC as RFC 3339 with milliseconds: ``2026-01-02T03:04:05.678Z``."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def envelope_bytes(body: dict[str, Any]) -> bytes:
    """Encode an envelope dict as ASCII JSON, which no lone surrogate or NaN can break."""
    try:
        return json.dumps(body, ensure_ascii=True, allow_nan=False).encode("ascii")
    except ValueError:
        # NaN or Infinity in a result: answer with the envelope's fields but no result.
        safe = {**body, "result": None, "detail": "the answer held a value that is not JSON"}
        return json.dumps(safe, ensure_ascii=True, default=str).encode("ascii")
