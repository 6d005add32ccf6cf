"""CloudExecutor: run an action on the cloud instance over HTTP, with retries and a breaker.

``POST {CLOUD_ENDPOINT}/api/services/{service}/{topic}`` with ``{"params": …}``, the bearer key
and an ``Idempotency-Key`` that stays the same across retries (and later outbox replays), so
the cloud runs the action at most once whatever happens on the wire.

What is retried (up to ``retries`` times, backoff ``backoff_s`` * 3^n with ±10 % jitter,
``Retry-After`` honoured): timeouts, 5xx, 429 and 409 ``conflict`` (the same key still
running; not with ``retry_busy=False``, and never counted against the cloud's breaker: a busy key
says nothing about the cloud's health). A refused connection gets one quick retry
(``refused_retry_s``, ~0.2 s) and no more: it proves the request never ran, so the caller may fall
back at once (local handler, outbox) instead of waiting 1+3+9 s for a cloud that is down; the
connectivity checker and the breaker take it from there. Never retried: other 4xx, 409
``indeterminate`` (the key's holder died mid-handler: ``Indeterminate``), and a 5xx whose body
says the handler itself raised — definite answers, not transient faults.

Every failure says whether it *proves* the request never ran (``never_ran``): connection
refused, connect or pool timeout, circuit open, 429, a params that cannot be sent at all (NaN,
a lone surrogate: ``InvalidParams``), and the cloud refusing a price over the ``Cost-Limit``
header (402 ``CostLimitExceeded``). Read timeouts and 5xx are ambiguous — the orchestrator never
runs a side-effect action elsewhere after one of those.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx

from circuit_breaker import BreakerState, CircuitBreaker
from cloud_batch import CloudBatcher, SharedFailure, shared_failure
from cloud_client import CloudAnswer, CloudClient, CloudTimeouts, status_error, was_refused
from cloud_routes import CloudRoutes
from cost_rates import MAX_RATE_USD
from envelope import Envelope, check_header_safe, new_request_id
from errors import (
    ActionError,
    CircuitOpen,
    CloudUnavailable,
    CostLimitExceeded,
    ErrorCode,
    HandlerError,
    Indeterminate,
    InvalidParams,
    KeyBusy,
    RateLimited,
    Source,
    UnknownAction,
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a cloud call is retried."""

    retries: int = 3
    backoff_s: float = 1.0
    multiplier: float = 3.0
    jitter_ratio: float = 0.1
    max_retry_after_s: float = 60.0
    refused_retry_s: float = 0.2

    def delay_s(self, retry_index: int, rng: Callable[[], float] = random.random) -> float:
        """Backoff before retry ``retry_index`` (0-based): 1 s, 3 s, 9 s … with jitter."""
        base = self.backoff_s * self.multiplier**retry_index
        return max(0.0, base * (1 + self.jitter_ratio * (2 * rng() - 1)))


@dataclass(frozen=True, slots=True)
class CloudResult:
    """A successful cloud call."""

    result: Any
    attempts: int
    duration_ms: float
    cost_usd: Decimal | None
    status_code: int


class _Retry(Exception):
    """One attempt failed transiently; carries the error to raise if it was the last."""

    def __init__(
        self,
        error: ActionError,
        retry_after_s: float | None = None,
        *,
        refused: bool = False,
        cloud_failed: bool = True,
    ) -> None:
        super().__init__(error.detail)
        self.error = error
        self.retry_after_s = retry_after_s
        self.refused = refused
        self.cloud_failed = cloud_failed  # False: the cloud answered (a busy key), it is up
        self.shared: SharedFailure | None = None  # a failure of a request of several calls


class _Unsendable(Exception):
    """This process could not build or write the request; carries the ``InvalidParams``."""

    def __init__(self, error: InvalidParams) -> None:
        super().__init__(error.detail)
        self.error = error


class CloudExecutor:
    """Calls the cloud through its ``CloudClient`` (one shared ``httpx.AsyncClient``)."""

    def __init__(
        self,
        *,
        endpoint: str,
        api_key: str | None,
        client: httpx.AsyncClient,
        timeout_s: float = 30.0,
        policy: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        on_retry: Callable[[str], None] | None = None,
        on_outcome: Callable[[bool], None] | None = None,
        cloud_client: CloudClient | None = None,
        batcher: CloudBatcher | None = None,
    ) -> None:
        """``cloud_client`` is the instance's shared one; without it, one is made of
        ``endpoint``, ``api_key``, ``client`` and ``timeout_s``. ``batcher`` sends the calls
        made with ``batched=True`` (those of a ``/batch``) together; without it, one by one."""
        self.cloud_client = cloud_client or CloudClient(
            endpoint=endpoint,
            api_key=api_key,
            http=client,
            timeouts=CloudTimeouts(total_s=timeout_s),
        )
        self.routes = CloudRoutes(self.cloud_client.endpoint)
        self.endpoint = self.routes.endpoint
        self.timeout_s = self.cloud_client.timeouts.total_s
        self.policy = policy or RetryPolicy()
        self.breaker = breaker or CircuitBreaker(failure_threshold=5, reset_after_s=30.0)
        self._sleep = sleep
        self._rng = rng
        self._on_retry = on_retry
        self._on_outcome = on_outcome
        self.batcher = batcher

    @property
    def auth_headers(self) -> dict[str, str]:
        return self.cloud_client.auth_headers

    async def execute(
        self, action: str, params: dict[str, Any], *, request_id: str | None = None
    ) -> Envelope:
        """Run ``action`` in the cloud and return its envelope (``source='cloud'``)."""
        request_id = request_id or new_request_id()
        started = time.perf_counter()
        try:
            done = await self.call(action, params, request_id=request_id)
        except ActionError as exc:
            return Envelope.failure(
                action,
                exc,
                source=Source.CLOUD,
                request_id=request_id,
                duration_ms=(time.perf_counter() - started) * 1000,
            )
        return Envelope.success(
            action,
            done.result,
            source=Source.CLOUD,
            request_id=request_id,
            attempts=done.attempts,
            duration_ms=done.duration_ms,
            cost_usd=done.cost_usd or Decimal(0),
        )

    async def call(
        self,
        action: str,
        params: dict[str, Any],
        *,
        request_id: str,
        cost_limit_usd: Decimal | None = None,
        retry_busy: bool = True,
        batched: bool = False,
    ) -> CloudResult:
        """POST the action (retrying transient failures); raise an ``ActionError`` on failure.

        ``cost_limit_usd`` (the caller's reservation) goes out as ``Cost-Limit``; a cloud that
        prices the call higher refuses it with ``CostLimitExceeded`` before running anything.
        ``retry_busy=False``: a key the cloud still runs raises ``KeyBusy`` at once (the outbox
        replay moves on to other items instead of waiting). ``batched``: sent together with the
        other calls of this loop turn (``CloudBatcher``), each attempt; read as a call alone.
        """
        batcher = self.batcher if batched else None
        url = self.routes.url(action)
        headers = {"Idempotency-Key": check_header_safe(request_id)}
        if cost_limit_usd is not None:
            headers["Cost-Limit"] = decimal_text(cost_limit_usd)
        content = _encode_request(action, params, headers)
        headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        ambiguous = False
        attempt = 0
        refusals = 0
        while True:
            if not self.breaker.allow():
                raise CircuitOpen(
                    f"the cloud failed {self.breaker.failures} times in a row; calls to it are "
                    f"skipped for {self.breaker.retry_in_s():.0f} s more",
                    attempts=attempt,
                    never_ran=not ambiguous,
                )
            attempt += 1
            response = None
            try:
                try:
                    if batcher is not None:
                        response = await batcher.send(action, url, content, headers)
                    else:
                        response = await self.cloud_client.send(
                            "POST", url, content=content, headers=headers
                        )
                except InvalidParams as exc:  # it never left this process: not an answer
                    raise _Unsendable(exc) from None
                # Any other failure to get an answer is transient; a refused connection proves
                # the request never ran. A body that does not decode means the cloud answered,
                # so it may have run (the client maps that as "mid-request").
                except ActionError as exc:
                    retry = _Retry(exc, refused=was_refused(exc))
                    retry.shared = shared_failure(exc)
                    raise retry from exc
                result = self._parse(action, response)
            except _Unsendable as unsendable:
                # Not an answer of the cloud: neither its breaker nor connectivity hears of it.
                error = self._final(unsendable.error, attempt, ambiguous)
                raise error from None
            except _Retry as retry:
                ambiguous = ambiguous or not retry.error.never_ran
                refusals += retry.refused
                shared = retry.shared or shared_failure(response)
                if shared is None or shared.first():  # a shared request's failure counts once
                    self._record(not retry.cloud_failed)
                busy_final = isinstance(retry.error, KeyBusy) and not retry_busy
                if (
                    busy_final
                    or attempt > self.policy.retries
                    or refusals > 1
                    or self.breaker.state is BreakerState.OPEN
                ):
                    raise self._final(retry.error, attempt, ambiguous) from None
                if retry.refused:
                    jitter = 1 + self.policy.jitter_ratio * (2 * self._rng() - 1)
                    delay = self.policy.refused_retry_s * jitter
                else:
                    delay = self.policy.delay_s(attempt - 1, self._rng)
                if retry.retry_after_s is not None:
                    delay = max(delay, min(retry.retry_after_s, self.policy.max_retry_after_s))
                if self._on_retry is not None:
                    self._on_retry(action)
                await self._sleep(delay)
                continue
            except ActionError as exc:
                self._record(True)  # the cloud answered: it is up
                exc.attempts = attempt
                if ambiguous:
                    exc.never_ran = False
                raise
            self._record(True)
            return CloudResult(
                result=result[0],
                attempts=attempt,
                duration_ms=(time.perf_counter() - started) * 1000,
                cost_usd=result[1],
                status_code=response.status_code,
            )

    def _record(self, ok: bool) -> None:
        if ok:
            self.breaker.record_success()
        else:
            self.breaker.record_failure()
        if self._on_outcome is not None:
            self._on_outcome(ok)

    @staticmethod
    def _final(error: ActionError, attempts: int, ambiguous: bool) -> ActionError:
        error.attempts = attempts
        if ambiguous:
            error.never_ran = False
        return error

    def _parse(self, action: str, response: CloudAnswer) -> tuple[Any, Decimal | None]:
        """Turn one HTTP answer into (result, cost) or raise ``_Retry`` / an ``ActionError``."""
        status = response.status_code
        body = _json_or_none(response)
        detail = _detail(body, response)
        if 200 <= status < 300:
            if not isinstance(body, dict) or body.get("ok") is not True or "result" not in body:
                raise CloudUnavailable(
                    f"the cloud answered {status} without a result envelope: {detail}",
                    never_ran=False,
                )
            return body["result"], _cost(body.get("cost_usd"))
        if status == 429 and isinstance(body, dict) and body.get("error") == "rate_limited":
            # Over the cloud's pacing limit: a definite answer, not a fault (no retry, and the
            # breaker hears the cloud is up); the caller defers a side effect until then.
            raise RateLimited(f"the cloud: {detail}", not_before=_not_before(body, response))
        if status == 429:
            raise _Retry(
                CloudUnavailable(f"the cloud is rate limiting (429): {detail}", never_ran=True),
                _retry_after_s(response),
            )
        if status == 409:
            if isinstance(body, dict) and body.get("error") == ErrorCode.INDETERMINATE.value:
                raise Indeterminate(f"the cloud says this request may have run (409): {detail}")
            raise _Retry(
                KeyBusy(
                    f"the cloud is still running this request (409): {detail}", never_ran=False
                ),
                _retry_after_s(response),
                cloud_failed=False,
            )
        if status >= 500:
            code = body.get("error") if isinstance(body, dict) else None
            if code == ErrorCode.HANDLER_ERROR.value:
                raise HandlerError(f"cloud handler failed: {detail}")
            never_ran = code in (ErrorCode.CIRCUIT_OPEN.value, ErrorCode.OFFLINE.value)
            raise _Retry(
                CloudUnavailable(f"the cloud answered {status}: {detail}", never_ran=never_ran),
                _retry_after_s(response),
            )
        if status == 402 and isinstance(body, dict):
            price = _cost(body.get("price_usd"))
            if body.get("error") == ErrorCode.COST_LIMIT_EXCEEDED.value and price is not None:
                raise CostLimitExceeded(f"the cloud refused the call: {detail}", price_usd=price)
        if status == 404:
            raise UnknownAction(f"the cloud has no handler for {action!r}: {detail}")
        raise status_error(response, f"{action}: {detail}")

    async def request_state(self, request_id: str, *, timeout_s: float = 5.0) -> str | None:
        """What the cloud knows of idempotency key ``request_id`` (see ``CloudClient``)."""
        return await self.cloud_client.request_state(request_id, timeout_s=timeout_s)


def decimal_text(amount: Decimal) -> str:
    """An exact decimal without exponent or trailing zeros: 0.010000 -> '0.01', 10 -> '10'."""
    return format(amount.normalize(), "f")


def _encode_request(action: str, params: dict[str, Any], headers: dict[str, str]) -> bytes:
    """The JSON body of a cloud call; ``InvalidParams`` (never ran) if it cannot be built.

    Strict JSON (RFC 8259): NaN and Infinity are refused rather than sent as tokens the cloud
    would reject; a lone surrogate cannot be encoded as UTF-8; a header value must be ASCII.
    """
    try:
        for name, value in headers.items():
            value.encode("ascii")
            if any(ch in value for ch in "\r\n\0"):
                raise ValueError(f"the {name} header may not contain control characters")
        return json.dumps(
            {"params": params}, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeError is a ValueError
        raise _unsendable(action, exc) from None


def _unsendable(action: str, exc: Exception) -> InvalidParams:
    """The request for ``action`` could not be built or written: it never left (422)."""
    return InvalidParams(
        f"the params of {action} cannot be sent to the cloud: {type(exc).__name__}: "
        f"{str(exc)[:200]}",
        never_ran=True,
    )


def _json_or_none(response: CloudAnswer) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _detail(body: Any, response: CloudAnswer) -> str:
    if isinstance(body, dict):
        text = body.get("detail") or body.get("error") or ""
        return str(text)[:300]
    return response.text[:300]


def _cost(value: Any) -> Decimal | None:
    """A cost or price from the cloud's answer; None for junk (negative, non-finite, absurd)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        cost = Decimal(str(value))
    except InvalidOperation:
        return None
    return cost if cost.is_finite() and 0 <= cost <= MAX_RATE_USD else None


def _not_before(body: dict[str, Any], response: CloudAnswer) -> datetime:
    """When the cloud says a rate-limited call may run: ``deferred_until``, else Retry-After."""
    try:
        when = datetime.fromisoformat(str(body.get("deferred_until")))
        if when.tzinfo is not None:
            return when
    except ValueError:
        pass
    return datetime.now(UTC) + timedelta(seconds=_retry_after_s(response) or 1.0)


def _retry_after_s(response: CloudAnswer) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date, RFC 9110 §10.2.3)."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
