"""Envelopes and errors as HTTP responses: the one place their JSON bodies and headers are made.

``POST /api/batch`` answers many calls in one response, one line each (``answer_line``): the
status, the headers a caller reads, and the body the call alone would have had.

``local_server.py`` answers every route through these: an ``Envelope`` (with ``Retry-After``
when it is rate limited), an ``ActionError`` as the failure envelope with the exception's own
status, or a ready JSON body (a stored idempotent answer, a conflict).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Iterable
from typing import Any

from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from envelope import Envelope, envelope_bytes, new_request_id
from errors import ActionError


def json_response(
    body: dict[str, Any], status_code: int, headers: dict[str, str] | None = None
) -> Response:
    """``body`` as strict ASCII JSON (``envelope_bytes``)."""
    return bytes_response(envelope_bytes(body), status_code, headers)


def bytes_response(
    payload: bytes, status_code: int, headers: dict[str, str] | None = None
) -> Response:
    """A JSON body encoded already."""
    if headers is None and _plain_made_as_starlette_does():
        return _plain_response(payload, status_code)
    return Response(payload, status_code=status_code, headers=headers, media_type=_JSON)


_JSON = "application/json"
_CONTENT_TYPE = (b"content-type", _JSON.encode("latin-1"))
# Whether ``_plain_response`` makes what Starlette's own ``Response`` makes; found at first use.
_PLAIN_SAME: bool | None = None


def _plain_response(payload: bytes, status_code: int) -> Response:
    """``Response(payload, status_code, media_type=_JSON)`` without its ``__init__``.

    What Starlette's ``__init__``, ``render`` and ``init_headers`` set for a bytes body and no
    headers, set at once: the same attributes in the same order (``content-length`` then
    ``content-type``; no length for 1xx, 204 and 304): ~0.7 µs less per answer. Used only
    while ``_plain_made_as_starlette_does()`` holds (a test names it when it no longer does).
    """
    response = object.__new__(Response)
    response.__dict__ = {
        "status_code": status_code,
        "media_type": _JSON,
        "background": None,
        "body": payload,
        "raw_headers": (
            [_CONTENT_TYPE]
            if status_code < 200 or status_code in (204, 304)
            else [(b"content-length", b"%d" % len(payload)), _CONTENT_TYPE]
        ),
    }
    return response


def _plain_made_as_starlette_does() -> bool:
    """Does ``_plain_response`` build what ``Response(...)`` builds? Checked once, at first use:
    a Starlette that builds its responses otherwise gets its own constructor."""
    global _PLAIN_SAME
    if _PLAIN_SAME is None:
        _PLAIN_SAME = all(
            vars(_plain_response(body, status))
            == vars(Response(body, status_code=status, media_type=_JSON))
            for body, status in ((b'{"ok":true}', 200), (b"{}", 422), (b"", 204), (b"{}", 304))
        )
    return _PLAIN_SAME


def _retry_after(envelope: Envelope) -> dict[str, str] | None:
    retry_after = envelope.retry_after()  # rate_limited: when to ask again
    return None if retry_after is None else {"Retry-After": retry_after}


def envelope_response(envelope: Envelope) -> Response:
    """``envelope`` with its own status, encoded once (``Envelope.to_json``)."""
    return bytes_response(envelope.to_json(), envelope.http_status, _retry_after(envelope))


def error_response(action: str, exc: ActionError, request_id: str | None = None) -> Response:
    """The failure envelope of ``exc``, with the exception's own status: several statuses
    share a code (403 and 401 are both ``unauthorized``)."""
    envelope = Envelope.failure(action, exc, source=None, request_id=request_id or new_request_id())
    return json_response(envelope.to_dict(), exc.http_status, _retry_after(envelope))


NDJSON = "application/x-ndjson"
# The headers of a call's answer that a caller of /api/batch reads: they travel in its line.
_LINE_HEADERS = ("retry-after", "idempotent-replayed")


def answer_line(index: int, response: Response) -> bytes:
    """One line of ``POST /api/batch``: ``{"i", "status", "headers", "body"}`` and a newline.

    The body is the response's own bytes (encoded once, strict ASCII JSON: no raw newline).
    """
    headers = {name: response.headers[name] for name in _LINE_HEADERS if name in response.headers}
    return b'{"i":%d,"status":%d,"headers":%s,"body":%s}\n' % (
        index,
        response.status_code,
        json.dumps(headers, separators=(",", ":")).encode(),
        bytes(response.body),
    )


class LinesResponse(StreamingResponse):
    """NDJSON lines (``lines_as_done``), written as they come.

    Without the task ``StreamingResponse`` runs beside the stream to notice the caller leaving
    (an anyio task group per request): each line's run goes on whether the caller stays or not,
    so there is nothing to stop early, and uvicorn drops what is written to a connection gone.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.stream_response(send)
        except OSError:
            raise ClientDisconnect() from None


async def lines_as_done(runs: Iterable[asyncio.Future[bytes]]) -> AsyncGenerator[bytes, None]:
    """The runs' lines as they end; lines that end together go out in one write.

    Each run hands its line over as it ends (a done callback), so a run ending costs the same
    whether 1 or 100 are still running (``asyncio.wait`` adds and removes a callback on every
    run still pending each time one ends).
    """
    runs = list(runs)
    ended: list[asyncio.Future[bytes]] = []
    wake: asyncio.Future[None] | None = None

    def on_end(run: asyncio.Future[bytes]) -> None:
        ended.append(run)
        if wake is not None and not wake.done():
            wake.set_result(None)

    for run in runs:
        run.add_done_callback(on_end)
    try:
        left = len(runs)
        while left:
            if not ended:
                wake = asyncio.get_running_loop().create_future()
                await wake
            done, ended[:] = list(ended), []
            left -= len(done)
            yield b"".join(run.result() for run in done)
    finally:
        for run in runs:
            run.remove_done_callback(on_end)
