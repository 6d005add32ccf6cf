"""CloudExecutor: run an action on the cloud instance over HTTP, with retries and a breaker.

``POST {CLOUD_ENDPOINT}/api/services/{service}/{topic}`` with ``{"params": …}``, the bearer key
and an ``Idempotency-Key`` that stays the same across retries (and later outbox replays), so
the cloud runs the action at most once whatever happens on the wire.

What is retried (up to ``retries`` times, backoff ``backoff_s`` * 3^n with ±10 % jitter,
``Retry-After`` honoured): connection errors, timeouts, 5xx, 429 and 409 (the same key still
running). Never retried: other 4xx, and a 5xx whose body says the handler itself raised — that
is a definite answer, not a transient fault.

Every failure says whether it *proves* the request never ran (``never_ran``): connection
refused, connect or pool timeout, circuit open, 429. Read timeouts and 5xx are ambiguous — the
orchestrator never runs a side-effect action elsewhere after one of those.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx

from circuit_breaker import BreakerState, CircuitBreaker
from cloud_routes import CloudRoutes
from envelope import Envelope, check_header_safe, new_request_id
from errors import (
    ActionError,
    CircuitOpen,
    CloudTimeout,
    CloudUnavailable,
    ErrorCode,
    HandlerError,
    InvalidParams,
    Source,
    Unauthorized,
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

    def __init__(self, error: ActionError, retry_after_s: float | None = None) -> None:
        super().__init__(error.detail)
        self.error = error
        self.retry_after_s = retry_after_s


class CloudExecutor:
    """Calls the cloud through one shared ``httpx.AsyncClient``."""

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
    ) -> None:
        self.routes = CloudRoutes(endpoint)
        self.endpoint = self.routes.endpoint
        self._client = client
        self._timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0))
        self.timeout_s = timeout_s
        self.policy = policy or RetryPolicy()
        self.breaker = breaker or CircuitBreaker(failure_threshold=5, reset_after_s=30.0)
        self._sleep = sleep
        self._rng = rng
        self._on_retry = on_retry
        self._on_outcome = on_outcome
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    @property
    def auth_headers(self) -> dict[str, str]:
        return dict(self._auth)

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

    async def call(self, action: str, params: dict[str, Any], *, request_id: str) -> CloudResult:
        """POST the action (retrying transient failures); raise an ``ActionError`` on failure."""
        url = self.routes.url(action)
        headers = {**self._auth, "Idempotency-Key": check_header_safe(request_id)}
        body = {"params": params}
        started = time.perf_counter()
        ambiguous = False
        attempt = 0
        while True:
            if not self.breaker.allow():
                raise CircuitOpen(
                    f"the cloud failed {self.breaker.failures} times in a row; calls to it are "
                    f"skipped for {self.breaker.retry_in_s():.0f} s more",
                    attempts=attempt,
                    never_ran=not ambiguous,
                )
            attempt += 1
            try:
                try:
                    response = await self._client.post(
                        url, json=body, headers=headers, timeout=self._timeout
                    )
                # RequestError, not just TransportError: a body that does not decode
                # (DecodingError) must not escape route(); the cloud answered, so it may have run.
                except httpx.RequestError as exc:
                    raise _Retry(_map_transport_error(exc, self.timeout_s)) from exc
                result = self._parse(action, response)
            except _Retry as retry:
                ambiguous = ambiguous or not retry.error.never_ran
                self._record(False)
                if attempt > self.policy.retries or self.breaker.state is BreakerState.OPEN:
                    raise self._final(retry.error, attempt, ambiguous) from None
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

    def _parse(self, action: str, response: httpx.Response) -> tuple[Any, Decimal | None]:
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
        if status == 429:
            raise _Retry(
                CloudUnavailable(f"the cloud is rate limiting (429): {detail}", never_ran=True),
                _retry_after_s(response),
            )
        if status == 409:
            raise _Retry(
                CloudUnavailable(
                    f"the cloud is still running this request (409): {detail}", never_ran=False
                ),
                _retry_after_s(response),
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
        if status in (401, 403):
            raise Unauthorized(
                f"the cloud refused the key ({status}): check EVERREACH_CLOUD_KEY matches the "
                f"cloud instance's key"
            )
        if status == 404:
            raise UnknownAction(f"the cloud has no handler for {action!r}: {detail}")
        if status in (400, 413, 422):
            raise InvalidParams(f"the cloud rejected the request ({status}): {detail}")
        raise CloudUnavailable(f"the cloud answered {status}: {detail}", never_ran=True)

    async def get_json(self, path: str, *, timeout_s: float | None = None) -> Any:
        """GET ``{endpoint}{path}`` with the bearer key (sync and schedule endpoints)."""
        response = await self._client.get(
            f"{self.endpoint}{path}",
            headers=self._auth,
            timeout=timeout_s or self._timeout,
        )
        response.raise_for_status()
        return response.json()


def _map_transport_error(exc: httpx.RequestError, timeout_s: float) -> ActionError:
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return CloudTimeout(
            f"could not connect to the cloud within the timeout: {exc!r}", never_ran=True
        )
    if isinstance(exc, httpx.TimeoutException):
        return CloudTimeout(f"the cloud did not answer within {timeout_s:g} s", never_ran=False)
    if isinstance(exc, httpx.ConnectError):
        return CloudUnavailable(f"cannot connect to the cloud: {exc}", never_ran=True)
    return CloudUnavailable(
        f"the connection to the cloud failed mid-request: {type(exc).__name__}: {exc}",
        never_ran=False,
    )


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _detail(body: Any, response: httpx.Response) -> str:
    if isinstance(body, dict):
        text = body.get("detail") or body.get("error") or ""
        return str(text)[:300]
    return response.text[:300]


def _cost(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        cost = Decimal(str(value))
    except InvalidOperation:
        return None
    return cost if cost.is_finite() and cost >= 0 else None


def _retry_after_s(response: httpx.Response) -> float | None:
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
