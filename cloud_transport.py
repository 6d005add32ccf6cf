"""cloud_transport: the ``httpx.AsyncClient`` transport of cloud calls, aiohttp underneath.

Measured on loopback (a 20 ms handler, client CPU per request, medians of 3 rounds): httpx's
own transport 1,900-2,100 µs at 1 in flight and 4,600-7,000 µs at 32-256, where httpcore
scans its whole pool on every request; over aiohttp 1,400 µs at 1, 370-570 µs at 32-256.

The package's transport reads aiohttp's failures loosely (a refused connection or a dropped
one becomes ``ConnectTimeout``, which would mean "never ran"); here each is mapped to the
HTTPX error the default transport raises for the same failure, so ``cloud_client``'s reading
(never ran, may have run, refused) stays what it was::

    aiohttp.ConnectionTimeoutError      httpx.ConnectTimeout  (includes waiting for the pool)
    aiohttp.ServerTimeoutError          httpx.ReadTimeout
    aiohttp.ClientConnectorError        httpx.ConnectError    (refused, no route, DNS)
    any other aiohttp.ClientError       httpx.ReadError       (dropped mid-request)

aiohttp is imported, and its transport built, on the first request: an instance that never
calls out (local mode without a cloud, alerts or Supabase) does not load it (9 MiB resident and
about 0.1 s of start-up, measured).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    import aiohttp


class CloudTransport(httpx.AsyncBaseTransport):
    """``AiohttpTransport`` raising the HTTPX errors the default transport raises.

    Takes ``AiohttpTransport``'s options (``limits=``…); builds it on the first request.
    """

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._transport: httpx.AsyncBaseTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._transport is None:  # no await before this assignment: built once
            self._transport = _mapped_transport_class()(**self._options)
        return await self._transport.handle_async_request(request)

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()


@functools.cache
def _mapped_transport_class() -> type[httpx.AsyncBaseTransport]:
    import aiohttp
    from httpx_aiohttp import AiohttpTransport

    class MappedTransport(AiohttpTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            try:
                response = await super().handle_async_request(request)
            except (httpx.TransportError, aiohttp.ClientError) as exc:
                cause = exc.__cause__ if isinstance(exc, httpx.TransportError) else exc
                if not isinstance(cause, aiohttp.ClientError):
                    raise
                raise transport_error(cause, request) from cause
            response.stream = _MappedStream(response.stream, request)
            return response

    return MappedTransport


class _MappedStream(httpx.AsyncByteStream):
    """The body stream, with a failure while reading mapped like one before the head."""

    def __init__(
        self, stream: httpx.AsyncByteStream | httpx.SyncByteStream, request: httpx.Request
    ):
        assert isinstance(stream, httpx.AsyncByteStream)
        self._stream = stream
        self._request = request

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        import aiohttp  # loaded already: this stream comes from the aiohttp transport

        try:
            async for chunk in self._stream:
                yield chunk
        except (httpx.TransportError, aiohttp.ClientError) as exc:
            cause = exc.__cause__ if isinstance(exc, httpx.TransportError) else exc
            if not isinstance(cause, aiohttp.ClientError):
                raise
            raise transport_error(cause, self._request) from cause

    async def aclose(self) -> None:
        await self._stream.aclose()


def transport_error(exc: aiohttp.ClientError, request: httpx.Request) -> httpx.TransportError:
    """The HTTPX error the default transport raises for the failure aiohttp reports as ``exc``."""
    import aiohttp

    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message, request=request)
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return httpx.ReadTimeout(message, request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message, request=request)
    return httpx.ReadError(message, request=request)
