"""The one exception tree of the orchestrator, and the closed sets of names it speaks in.

    EverReachError                       base of everything we raise on purpose
    ├── ConfigError                      bad configuration: stops start-up, names the variable
    │   ├── RouteTableError              malformed route_table.json: file, entry, reason
    │   └── RegistryError                a services module failed to import, duplicate action
    └── ActionError                      one action failed; carries .code, .detail, .http_status
        ├── UnknownAction                404  unknown_action
        ├── InvalidParams                422  invalid_params
        │   ├── BadRequest               400  invalid_params (a Host header not allowed here)
        │   └── UnsupportedMediaType     415  invalid_params (a body that is not JSON)
        ├── HandlerError                 500  handler_error (the handler raised or returned junk)
        ├── Unauthorized                 401  unauthorized
        │   └── Forbidden                403  unauthorized (cross-site, or public without a token)
        ├── PayloadTooLarge              413  payload_too_large
        ├── CostCapReached               429  cost_cap_reached
        ├── RateLimited                  429  rate_limited (over a pacing limit; Retry-After)
        ├── CostLimitExceeded            402  cost_limit_exceeded (the call's price > Cost-Limit)
        ├── StorageUnavailable           503  storage_unavailable (disk full, a store not answering)
        ├── CircuitOpen                  503  circuit_open
        ├── Offline                      503  offline
        ├── NotFound                     404  not_found (no such outbox item)
        ├── Indeterminate                409  indeterminate (a dead process may have run the key)
        └── CloudUnavailable             502  cloud_unavailable (5xx, refused, bad answer)
            ├── CloudTimeout             504  timeout
            └── KeyBusy                  409  conflict (another call still runs this key)

Expected outcomes (served from cache, queued in the outbox, local fallback) are values in the
result envelope; these exceptions are faults, turned into envelopes and HTTP statuses at the edge.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, ClassVar


class Env(StrEnum):
    """Where an instance runs its actions (EVERREACH_ENV) or where one call goes."""

    LOCAL = "local"
    CLOUD = "cloud"
    HYBRID = "hybrid"


class Source(StrEnum):
    """Which path produced a result envelope."""

    LOCAL = "local"
    CLOUD = "cloud"
    LOCAL_FALLBACK = "local_fallback"
    CACHE = "cache"
    OUTBOX = "outbox"


class ErrorCode(StrEnum):
    """Machine-readable error codes of the result envelope."""

    UNKNOWN_ACTION = "unknown_action"
    INVALID_PARAMS = "invalid_params"
    HANDLER_ERROR = "handler_error"
    TIMEOUT = "timeout"
    CLOUD_UNAVAILABLE = "cloud_unavailable"
    OFFLINE = "offline"
    COST_CAP_REACHED = "cost_cap_reached"
    CIRCUIT_OPEN = "circuit_open"
    UNAUTHORIZED = "unauthorized"
    COST_LIMIT_EXCEEDED = "cost_limit_exceeded"
    CONFLICT = "conflict"
    INDETERMINATE = "indeterminate"
    NOT_FOUND = "not_found"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    RATE_LIMITED = "rate_limited"


class EverReachError(Exception):
    """Base of every exception the orchestrator raises on purpose."""


class ConfigError(EverReachError):
    """Configuration is wrong; the message names the variable and what is allowed."""


class RouteTableError(ConfigError):
    """The route table file is malformed."""


class RegistryError(ConfigError):
    """A services module could not be loaded, or an action was registered twice."""


class ActionError(EverReachError):
    """One action failed; the fields say how, for the envelope and the HTTP status."""

    code: ClassVar[ErrorCode] = ErrorCode.HANDLER_ERROR
    http_status: ClassVar[int] = 500
    # True where the error itself proves the action did not run (refused before running).
    NEVER_RAN: ClassVar[bool] = False

    def __init__(
        self, detail: str, *, attempts: int = 0, never_ran: bool | None = None, **extra: Any
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.attempts = attempts
        self.never_ran = type(self).NEVER_RAN if never_ran is None else never_ran
        self.extra = extra


class UnknownAction(ActionError):
    code = ErrorCode.UNKNOWN_ACTION
    http_status = 404
    NEVER_RAN = True


class InvalidParams(ActionError):
    code = ErrorCode.INVALID_PARAMS
    http_status = 422
    NEVER_RAN = True


class BadRequest(InvalidParams):
    """The request itself is refused before its body is read (e.g. a Host not served here)."""

    http_status = 400


class UnsupportedMediaType(InvalidParams):
    """The body's Content-Type is not one this server parses as JSON."""

    http_status = 415


class HandlerError(ActionError):
    code = ErrorCode.HANDLER_ERROR
    http_status = 500


class Unauthorized(ActionError):
    code = ErrorCode.UNAUTHORIZED
    http_status = 401
    NEVER_RAN = True


class Forbidden(Unauthorized):
    """A token would not help: the request is cross-site, or the server is public without one."""

    http_status = 403


class PayloadTooLarge(ActionError):
    code = ErrorCode.PAYLOAD_TOO_LARGE
    http_status = 413
    NEVER_RAN = True


class CostCapReached(ActionError):
    code = ErrorCode.COST_CAP_REACHED
    http_status = 429
    NEVER_RAN = True


class RateLimited(ActionError):
    """Over a pacing limit (``RATE_LIMITS_PATH``): nothing ran; ask again at ``not_before``.

    Never counted against a circuit: it says nothing about the health of whoever answers it.
    """

    code = ErrorCode.RATE_LIMITED
    http_status = 429
    NEVER_RAN = True

    def __init__(self, detail: str, *, not_before: datetime, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.not_before = not_before


class CostLimitExceeded(ActionError):
    """The serving instance prices the call above the caller's ``Cost-Limit``; it did not run.

    ``price_usd`` is that instance's price, so the caller can reserve it and ask again. 402, not
    429: a retry with the same limit would be refused the same way, and it must not be retried.
    """

    code = ErrorCode.COST_LIMIT_EXCEEDED
    http_status = 402
    NEVER_RAN = True

    def __init__(self, detail: str, *, price_usd: Decimal, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.price_usd = price_usd


class StorageUnavailable(ActionError):
    """A durable store refused a write or did not answer (disk full, read-only DATA_DIR, the
    idempotency database down); no handler ran."""

    code = ErrorCode.STORAGE_UNAVAILABLE
    http_status = 503
    NEVER_RAN = True


def storage_fault(exc: BaseException) -> StorageUnavailable | None:
    """Return the ``StorageUnavailable`` that ``exc`` stands for, or None if it is not one.

    SQLite says "database or disk is full" (SQLITE_FULL), "attempt to write a readonly
    database", "unable to open database file" or "disk I/O error"; the OS says ENOSPC, EDQUOT,
    EROFS or EACCES.
    """
    import errno
    import sqlite3

    if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError):
        text = str(exc).lower()
        if not any(
            marker in text
            for marker in ("disk is full", "readonly", "unable to open", "disk i/o", "no space")
        ):
            return None
    elif not (
        isinstance(exc, OSError)
        and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
    ):
        return None
    return StorageUnavailable(
        f"local storage is unavailable ({type(exc).__name__}: {exc}); free disk space under "
        f"DATA_DIR or make it writable, then retry"[:400]
    )


class CircuitOpen(ActionError):
    code = ErrorCode.CIRCUIT_OPEN
    http_status = 503
    NEVER_RAN = True


class Offline(ActionError):
    code = ErrorCode.OFFLINE
    http_status = 503
    NEVER_RAN = True


class NotFound(ActionError):
    """No such item (an outbox id that is not, or no longer, there)."""

    code = ErrorCode.NOT_FOUND
    http_status = 404
    NEVER_RAN = True


class Indeterminate(ActionError):
    """A process that held this idempotency key died mid-handler: the action may have run.

    Never re-run silently: a person retries it (with a fresh key) or drops it.
    """

    code = ErrorCode.INDETERMINATE
    http_status = 409


class CloudUnavailable(ActionError):
    """The cloud failed: 5xx after retries, connection refused, or an unusable answer.

    ``never_ran`` is True only when the failure proves the request did not execute
    (connection refused, connect timeout, circuit open) — the one case where a side-effect
    action may safely run somewhere else.
    """

    code = ErrorCode.CLOUD_UNAVAILABLE
    http_status = 502


class CloudTimeout(CloudUnavailable):
    code = ErrorCode.TIMEOUT
    http_status = 504


class KeyBusy(CloudUnavailable):
    """Another call still runs this idempotency key: ask again later (``Retry-After``)."""

    code = ErrorCode.CONFLICT
    http_status = 409


HTTP_STATUS_BY_CODE: dict[ErrorCode, int] = {
    cls.code: cls.http_status
    for cls in (
        UnknownAction,
        InvalidParams,
        HandlerError,
        Unauthorized,
        PayloadTooLarge,
        CostCapReached,
        RateLimited,
        CostLimitExceeded,
        StorageUnavailable,
        CircuitOpen,
        Offline,
        CloudUnavailable,
        CloudTimeout,
        KeyBusy,
        Indeterminate,
        NotFound,
    )
}
