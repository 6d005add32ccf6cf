"""ASGI middleware that refuses request bodies over a size limit with a 413 envelope.

The limit is checked twice: against ``Content-Length`` before anything is read, and while the
body streams in (a chunked upload has no length). Either way the answer is the result envelope
with ``error: "payload_too_large"``, like every other refusal of the server.
"""

from __future__ import annotations

from typing import Any

from envelope import Envelope, envelope_bytes

MAX_BODY_BYTES = 1024 * 1024


class _BodyTooLarge(Exception):
    """Raised inside ``receive`` once the streamed body passes the limit."""


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
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._refuse(send)
                return
        seen = 0
        started = False

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracked(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        envelope = Envelope.too_large(
            f"the request body is larger than {self.max_bytes} bytes (1 MiB); "
            f"split the batch or send less data"
        )
        await send_envelope(send, envelope.http_status, envelope.to_dict())
