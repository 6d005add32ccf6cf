"""CloudBatcher: the cloud calls of a ``/batch`` made in the same loop turn, sent as one request.

A terminal running a ``/batch`` of 1,000 cloud actions spent most of its CPU on one HTTP
request per item (~400 µs each over httpx). Here the calls that reach the cloud in the same
turn of the event loop go out together in one ``POST /api/batch``: one line per call in, one
line per answer out as each call ends (NDJSON, streamed, so a slow item holds back no other).

Nothing else changes for a call: each keeps its own ``Idempotency-Key`` and ``Cost-Limit``,
runs on the cloud exactly as ``POST /api/services/{service}/{topic}`` would run it, and its
answer comes back as the status, headers and body that call would have had; ``CloudExecutor``
reads it, retries it and counts it against the breaker one call at a time, as before. A
failure of the shared request reaches each call it carried as the same failure a call of its
own would have met (refused: never ran; dropped or timed out mid-answer: may have run), and a
retry goes out under the same key, which the cloud answers from its idempotency store.

A call alone in its turn goes out as a call of its own; so does every call to a cloud that does
not serve ``/api/batch`` (an older version: it answers 404 or 405, and ran nothing), after the
first such answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from cloud_client import CloudAnswer, CloudClient
from errors import ActionError, CloudTimeout, CloudUnavailable

BATCH_PATH = "/api/batch"
# At most this many calls, and about this many bytes, in one request: well under the cloud's
# 1 MiB body limit, and few enough that one request's answers stream back in small writes.
MAX_CALLS = 100
MAX_BYTES = 512 * 1024
# Lines that arrive together are handed to their calls this many at a time, the loop let run
# between slices: the calls answered first end and their successors go out in the next
# request while the other lines wait, so the terminal and the cloud work side by side instead
# of in turns (a /batch of 1,000 cloud calls of 20 ms, 50 in flight: ~7 % less wall time).
DELIVER_SLICE = 8

log = logging.getLogger("everreach.cloud")
# Where a failure of the shared request carries its ``SharedFailure`` (an ActionError's
# ``extra``, a response's ``extensions``).
SHARED = "everreach.shared_failure"


class SharedFailure:
    """One failure of a request that carried several calls: it counts once against the cloud
    (breaker, connectivity), as the failure of one request, whichever of its calls reads it
    first. Each call still hears it, and retries."""

    __slots__ = ("counted",)

    def __init__(self) -> None:
        self.counted = False

    def first(self) -> bool:
        """True for the first reader only."""
        first, self.counted = not self.counted, True
        return first


def shared_failure(failure: ActionError | CloudAnswer | None) -> SharedFailure | None:
    """The ``SharedFailure`` ``failure`` belongs to, if it failed a request of several calls."""
    if failure is None:
        return None
    if isinstance(failure, ActionError):
        return failure.extra.get(SHARED)
    return failure.extensions.get(SHARED)


class LineAnswer:
    """One call's answer read from its line of ``/api/batch``: what ``CloudExecutor`` reads of
    an ``httpx.Response`` (status, headers, JSON body), without building one: the body is
    already parsed with the line, and an ``httpx.Response`` costs ~11 µs to build and its JSON
    ~3 µs to read again, per call of a batch."""

    __slots__ = ("_body", "extensions", "headers", "status_code")

    def __init__(self, status_code: int, headers: dict[str, str], body: Any) -> None:
        self.status_code = status_code
        self.headers = httpx.Headers(headers)
        self.extensions: dict[str, Any] = {}
        self._body = body

    def json(self) -> Any:
        return self._body

    @property
    def text(self) -> str:
        return orjson.dumps(self._body).decode()


@dataclass(slots=True)
class _Call:
    line: bytes  # the item's JSON, as /api/batch reads it
    answer: asyncio.Future[CloudAnswer]
    url: str
    content: bytes  # its body as a call of its own
    headers: dict[str, str]


@dataclass(slots=True)
class _Group:
    calls: list[_Call] = field(default_factory=list)
    size: int = 0


class CloudBatcher:
    """Sends calls to the cloud, coalescing those of the same loop turn into one request."""

    def __init__(
        self, client: CloudClient, *, max_calls: int = MAX_CALLS, max_bytes: int = MAX_BYTES
    ) -> None:
        self.client = client
        self.max_calls = max_calls
        self.max_bytes = max_bytes
        self.supported = True  # False once the cloud answered that it has no /api/batch
        self._group: _Group | None = None
        self._url = client.url(BATCH_PATH)
        self._sending: set[asyncio.Task[None]] = set()
        self.requests_sent = 0  # shared requests, for tests and the benchmark

    async def send(
        self, action: str, url: str, content: bytes, headers: dict[str, str]
    ) -> CloudAnswer:
        """The cloud's answer to one call, as ``CloudClient.send`` would return it.

        ``content`` is the call's own body (``{"params": …}``) and ``headers`` its own
        ``Idempotency-Key`` / ``Cost-Limit``; failures are raised as ``CloudClient.send``
        raises them.
        """
        if not self.supported:
            return await self.client.send("POST", url, content=content, headers=headers)
        line = _item(action, content, headers)
        group = self._group
        if group is None or (
            len(group.calls) >= self.max_calls or group.size + len(line) > self.max_bytes
        ):
            group = self._group = _Group()
            asyncio.get_running_loop().call_soon(self._flush, group)
        answer: asyncio.Future[CloudAnswer] = asyncio.get_running_loop().create_future()
        group.calls.append(_Call(line, answer, url, content, headers))
        group.size += len(line) + 1
        return await answer

    def _flush(self, group: _Group) -> None:
        if self._group is group:
            self._group = None
        task = asyncio.ensure_future(self._send(group.calls))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, calls: list[_Call]) -> None:
        try:
            if len(calls) == 1 or not self.supported:
                await asyncio.gather(*(self._alone(call) for call in calls))
            else:
                await self._together(calls)
        except BaseException as exc:  # cancelled at shutdown, or a fault of ours
            for call in calls:
                if not call.answer.done():
                    call.answer.set_exception(_dropped(exc))
            if not isinstance(exc, Exception):
                raise

    async def _alone(self, call: _Call) -> None:
        try:
            response = await self.client.send(
                "POST", call.url, content=call.content, headers=call.headers
            )
        except ActionError as exc:
            _fail(call, exc)
        else:
            _answer(call, response)

    async def _together(self, calls: list[_Call]) -> None:
        body = b'{"items":[' + b",".join(call.line for call in calls) + b"]}"
        waiting = dict(enumerate(calls))
        self.requests_sent += 1
        failure: ActionError
        try:
            async with asyncio.timeout(self.client.timeouts.total_s):
                async with self.client.stream(
                    "POST",
                    self._url,
                    content=body,
                    headers={"Content-Type": "application/json"},
                ) as response:
                    if response.status_code in (404, 405):
                        # An older cloud: nothing ran. Every call goes alone from now on.
                        self.supported = False
                        log.info("the cloud does not serve /api/batch: calls go one by one")
                    elif response.status_code != 200:
                        # The whole request was refused (key) or failed: each call hears the
                        # answer a call of its own would have heard, counted once.
                        await response.aread()
                        response.extensions[SHARED] = SharedFailure()
                        for call in calls:
                            _answer(call, response)
                        return
                    else:
                        read = 0
                        async for line in response.aiter_lines():
                            if line:
                                _deliver(waiting, line)
                                read += 1
                                if read % DELIVER_SLICE == 0:
                                    await asyncio.sleep(0)
        except ActionError as exc:  # no answer, or the stream broke: each call hears it
            failure = exc
        except TimeoutError:
            failure = CloudTimeout(
                f"the cloud did not answer within {self.client.timeouts.total_s:g} s",
                never_ran=False,
            )
        else:
            if not self.supported:
                await asyncio.gather(*(self._alone(call) for call in calls))
                return
            failure = CloudUnavailable(
                "the cloud ended its answer to /api/batch without this call's line",
                never_ran=False,
            )
        shared = SharedFailure()
        for call in waiting.values():
            _fail(call, failure, shared)

    async def aclose(self) -> None:
        """Let requests under way end (they hold calls that wait for them)."""
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)


def _item(action: str, content: bytes, headers: dict[str, str]) -> bytes:
    """The /api/batch item of a call: its action, key, cost limit, and body's params."""
    fields = [b'{"action":', json.dumps(action).encode()]
    key = headers.get("Idempotency-Key")
    if key is not None:
        fields += [b',"idempotency_key":', json.dumps(key).encode()]
    limit = headers.get("Cost-Limit")
    if limit is not None:
        fields += [b',"cost_limit":', json.dumps(limit).encode()]
    # ``content`` is ``{"params":…}``: its members follow the item's own.
    fields += [b",", content[1:]]
    return b"".join(fields)


def _deliver(waiting: dict[int, _Call], line: str) -> None:
    """Hand one answer line to its call; a line that does not read is skipped (the call
    then hears that the answer ended without it)."""
    try:
        answer = orjson.loads(line)
        call = waiting.pop(answer["i"])
        status = answer["status"]
        if type(status) is not int:
            raise TypeError("status")
        response = LineAnswer(status, answer["headers"], answer["body"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        log.warning("the cloud sent a line of /api/batch that does not read: %.200s", line)
        return
    _answer(call, response)


def _answer(call: _Call, response: CloudAnswer) -> None:
    if not call.answer.done():
        call.answer.set_result(response)


def _fail(call: _Call, exc: ActionError, shared: SharedFailure | None = None) -> None:
    """Fail ``call`` with its own copy of ``exc`` (callers set ``attempts`` on theirs)."""
    if call.answer.done():
        return
    copy = type(exc)(exc.detail, never_ran=exc.never_ran)
    if shared is not None:
        copy.extra[SHARED] = shared
    copy.__cause__ = exc.__cause__  # ``was_refused`` reads the HTTPX error behind it
    call.answer.set_exception(copy)


def _dropped(exc: BaseException) -> ActionError:
    return CloudUnavailable(
        f"the request carrying this call was dropped: {type(exc).__name__}", never_ran=False
    )
