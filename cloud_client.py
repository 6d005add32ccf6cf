"""CloudClient: the one way this instance talks HTTP to its cloud.

It owns what every cloud request shares: the endpoint, the bearer key, the timeouts and the
mapping of HTTPX failures onto the exception tree. Callers add what is theirs: retries and the
breaker (``CloudExecutor``), the outbox replay and state push/pull (``StateSync``), the schedule
mirror, the cost guard's request-state query and the connectivity probes.

How failures map (``raise … from exc``, so the HTTPX error stays in ``__cause__``)::

    httpx.LocalProtocolError            InvalidParams   never_ran  (nothing left this process)
    httpx.ConnectTimeout, PoolTimeout   CloudTimeout    never_ran
    httpx.TimeoutException (read, …)    CloudTimeout    may have run
    httpx.ConnectError                  CloudUnavailable never_ran (refused, no route, DNS)
    any other httpx.RequestError        CloudUnavailable may have run (dropped mid-request)

    HTTP 401 / 403                      Unauthorized
    HTTP 400 / 413 / 422                InvalidParams
    HTTP 5xx                            CloudUnavailable may have run
    any other non-2xx                   CloudUnavailable never_ran
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from errors import ActionError, CloudTimeout, CloudUnavailable, InvalidParams, Unauthorized

if TYPE_CHECKING:
    from config.hybrid_config import HybridConfig

IDEMPOTENCY_PATH = "/api/idempotency/"
SCHEDULES_PATH = "/api/schedules"


# URLs kept parsed per client; past this many (a route table of that many cloud actions), the
# cache starts again.
_MAX_PARSED_URLS = 1024


class CloudAnswer(Protocol):
    """What a caller reads of one answer of the cloud: an ``httpx.Response``, or one call's
    line of a shared ``/api/batch`` answer (``cloud_batch.LineAnswer``)."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> httpx.Headers: ...

    @property
    def extensions(self) -> dict[str, Any]: ...

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class CloudTimeouts:
    """Seconds a cloud request may take: to connect, and in all (per attempt)."""

    total_s: float = 30.0
    connect_s: float = 5.0

    def httpx(self, total_s: float | None = None) -> httpx.Timeout:
        total = self.total_s if total_s is None else total_s
        return httpx.Timeout(total, connect=min(total, self.connect_s))


class CloudClient:
    """Requests to ``{endpoint}…`` with the bearer key, over one shared ``httpx.AsyncClient``.

    The HTTP client belongs to whoever opened it (the runtime); this object only borrows it.
    """

    def __init__(
        self,
        *,
        endpoint: str,
        api_key: str | None,
        http: httpx.AsyncClient,
        timeouts: CloudTimeouts | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.http = http
        self.timeouts = timeouts or CloudTimeouts()
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = self.timeouts.httpx()
        # Each URL parsed once: httpx parses a URL given as text on every request (~12 µs of
        # the ~30 µs building one takes, timeit), and a cloud is called at a few URLs only.
        self._urls: dict[str, httpx.URL] = {}

    @classmethod
    def from_config(cls, config: HybridConfig, http: httpx.AsyncClient) -> CloudClient | None:
        """The client of CLOUD_ENDPOINT with EVERREACH_CLOUD_KEY; None without an endpoint."""
        if not config.cloud_endpoint:
            return None
        return cls(
            endpoint=config.cloud_endpoint,
            api_key=config.secret("everreach_cloud_key"),
            http=http,
            timeouts=CloudTimeouts(total_s=config.cloud_timeout_sec),
        )

    @property
    def auth_headers(self) -> dict[str, str]:
        """The bearer header (empty without a key); a copy the caller may extend."""
        return dict(self._auth)

    def url(self, path: str) -> str:
        return f"{self.endpoint}{path}"

    async def send(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        json: Any = None,
        timeout_s: float | None = None,
    ) -> httpx.Response:
        """Send one request to ``url`` (under the endpoint) with the key; map HTTPX failures.

        Any HTTP answer is returned as it is: what a status means is the caller's business
        (``raise_for_status`` gives the common reading).
        """
        try:
            return await self.http.request(
                method,
                self._parsed(url),
                headers={**self._auth, **(headers or {})},
                content=content,
                json=json,
                timeout=self._timeout if timeout_s is None else self.timeouts.httpx(timeout_s),
            )
        except httpx.RequestError as exc:
            raise request_error(exc, f"{method} {_path(url)}", self.timeouts) from exc
        except (TypeError, ValueError) as exc:  # building the request: it never left
            raise InvalidParams(
                f"{method} {_path(url)} cannot be sent: {type(exc).__name__}: {str(exc)[:200]}",
                never_ran=True,
            ) from exc

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """``send``, with the body read by the caller as it comes (``aiter_lines``…).

        A failure to get the answer's head, or while reading its body, is mapped as ``send``
        maps it (a body cut off mid-way: may have run).
        """
        what = f"{method} {_path(url)}"
        try:
            request = self.http.build_request(
                method,
                self._parsed(url),
                headers={**self._auth, **(headers or {})},
                content=content,
                timeout=self._timeout,
            )
            response = await self.http.send(request, stream=True)
        except httpx.RequestError as exc:
            raise request_error(exc, what, self.timeouts) from exc
        try:
            yield response
        except httpx.RequestError as exc:
            raise request_error(exc, what, self.timeouts) from exc
        finally:
            await response.aclose()

    def _parsed(self, url: str) -> httpx.URL:
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) >= _MAX_PARSED_URLS:
                self._urls.clear()
            parsed = self._urls[url] = httpx.URL(url)
        return parsed

    async def request_json(
        self, method: str, path: str, *, body: Any = None, timeout_s: float | None = None
    ) -> Any:
        """``method {endpoint}{path}``; the decoded JSON of a 2xx answer, else an ActionError."""
        what = f"{method} {path}"
        response = await self.send(method, self.url(path), json=body, timeout_s=timeout_s)
        raise_for_status(response, what)
        try:
            return response.json()
        except ValueError as exc:
            raise CloudUnavailable(f"{what}: the body is not JSON") from exc

    async def schedules(self, *, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """The cloud's schedule list (``GET /api/schedules``), for the mirror."""
        body = await self.request_json("GET", SCHEDULES_PATH, timeout_s=timeout_s)
        schedules = body.get("schedules") if isinstance(body, dict) else body
        return list(schedules or [])

    async def request_state(self, request_id: str, *, timeout_s: float = 5.0) -> str | None:
        """What the cloud knows of idempotency key ``request_id``, or None if it cannot say.

        'unknown' means the cloud never ran it; 'running', 'done' and 'indeterminate' mean it
        may have. Any failure (no such endpoint, offline, junk) is None: the caller must assume
        the request ran.
        """
        path = IDEMPOTENCY_PATH + urllib.parse.quote(request_id, safe="")
        try:
            body = await self.request_json("GET", path, timeout_s=timeout_s)
        except ActionError:
            return None
        state = body.get("state") if isinstance(body, dict) else None
        if not isinstance(state, str) or body.get("key") not in (None, request_id):
            return None
        return state


def request_error(exc: httpx.RequestError, what: str, timeouts: CloudTimeouts) -> ActionError:
    """The exception-tree reading of a request that got no usable HTTP answer."""
    if isinstance(exc, httpx.LocalProtocolError):
        # h11 refused to write our request (e.g. a header it cannot carry): nothing left this
        # process, and sending it again would fail the same way.
        return InvalidParams(
            f"{what} cannot be sent: {type(exc).__name__}: {str(exc)[:200]}", never_ran=True
        )
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return CloudTimeout(
            f"could not connect to the cloud within the timeout: {exc!r}", never_ran=True
        )
    if isinstance(exc, httpx.TimeoutException):
        return CloudTimeout(
            f"the cloud did not answer within {timeouts.total_s:g} s", never_ran=False
        )
    if isinstance(exc, httpx.ConnectError):
        return CloudUnavailable(f"cannot connect to the cloud: {exc}", never_ran=True)
    return CloudUnavailable(
        f"the connection to the cloud failed mid-request: {type(exc).__name__}: {exc}",
        never_ran=False,
    )


def raise_for_status(response: httpx.Response, what: str) -> None:
    """Raise the exception-tree reading of a non-2xx answer; return on 2xx."""
    if not response.is_success:
        raise status_error(response, what)


def status_error(response: CloudAnswer, what: str) -> ActionError:
    """The exception-tree reading of a non-2xx answer."""
    status = response.status_code
    if status in (401, 403):
        return Unauthorized(
            f"{what}: the cloud refused the key ({status}): check EVERREACH_CLOUD_KEY matches "
            f"the cloud instance's key"
        )
    if status in (400, 413, 422):
        return InvalidParams(f"{what}: the cloud rejected the request ({status})")
    return CloudUnavailable(f"{what}: the cloud answered {status}", never_ran=status < 500)


def was_refused(error: BaseException) -> bool:
    """Whether ``error`` came from a refused connection (proof the request never ran)."""
    return isinstance(error.__cause__, httpx.ConnectError)


def _path(url: str) -> str:
    return urllib.parse.urlsplit(url).path or "/"
