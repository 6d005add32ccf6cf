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
        ├── CircuitOpen                  503  circuit_open
        ├── Offline                      503  offline
        ├── CloudUnavailable             502  cloud_unavailable (5xx, refused, bad answer)
        └── CloudTimeout                 504  timeout

Expected outcomes (served from cache, queued in the outbox, local fallback) are values in the
result envelope; these exceptions are faults, turned into envelopes and HTTP statuses at the edge.
"""

from __future__ import annotations

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
    PAYLOAD_TOO_LARGE = "payload_too_large"


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


class CircuitOpen(ActionError):
    code = ErrorCode.CIRCUIT_OPEN
    http_status = 503
    NEVER_RAN = True


class Offline(ActionError):
    code = ErrorCode.OFFLINE
    http_status = 503
    NEVER_RAN = True


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


HTTP_STATUS_BY_CODE: dict[ErrorCode, int] = {
    cls.code: cls.http_status
    for cls in (
        UnknownAction,
        InvalidParams,
        HandlerError,
        Unauthorized,
        PayloadTooLarge,
        CostCapReached,
        CircuitOpen,
        Offline,
        CloudUnavailable,
        CloudTimeout,
    )
}
