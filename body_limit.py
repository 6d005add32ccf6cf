"""ASGI middleware that refuses request bodies over a size limit with a 413 envelope.

The limit is checked against ``Content-Length`` before anything is read (the HTTP server reads
that many bytes and no more, so a body within the limit by its length goes straight to the
app), or, for a body without a length (a chunked upload), while it streams in: the app then
runs only once the whole body is in, and reads it from a replay of what came. Either way the
answer is the result envelope with ``error: "payload_too_large"``, like every other refusal.
"""

from __future__ import annotations

import asyncio
from typing import Any

from envelope import Envelope, envelope_bytes

MAX_BODY_BYTES = 1024 * 1024


async def send_envelope(send: Any, status: int, body: dict[str, Any]) -> None:
    """Send ``body`` as a complete JSON response from plain ASGI middleware."""
    payload = envelope_bytes(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413, by Content-Length or while streaming."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = None
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit():
                if int(value) > self.max_bytes:
                    await self._refuse(send)
                    return
                length = value
            elif name == b"transfer-encoding":  # it frames the body, whatever the length says
                length = None
                break
        if length is not None:
            # The HTTP server frames the body by its Content-Length (it reads that many bytes
            # and no more), so a body within the limit by its length is within it.
            await self.app(scope, receive, send)
            return
        messages = await self._read(receive)
        if messages is None:
            await self._refuse(send)
            return
        # The app reads the messages back from a queue, not through a function of this module:
        # the request goes down once, and nothing below calls back up into the middleware.
        replay: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for message in messages:
            replay.put_nowait(message)
        await self.app(scope, replay.get, send)

    async def _read(self, receive: Any) -> list[dict[str, Any]] | None:
        """The body's messages as they came, or None once it passes the limit.

        A chunked body has no length, so it is counted as it streams in. The read ends with
        the last chunk, or with ``http.disconnect`` (the app sees that as before).
        """
        messages: list[dict[str, Any]] = []
        seen = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return None
            if not message.get("more_body", False):
                return messages

    async def _refuse(self, send: Any) -> None:
        envelope = Envelope.too_large(
            f"the request body is larger than {self.max_bytes} bytes (1 MiB); "
            f"split the batch or send less data"
        )
        await send_envelope(send, envelope.http_status, envelope.to_dict())
