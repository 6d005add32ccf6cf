"""CloudTransport: aiohttp's failures read as the default HTTPX transport reads them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from cloud_transport import CloudTransport
from tests.conftest import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=CloudTransport(), timeout=5) as http:
        yield http


async def test_a_refused_connection_is_connect_error(client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.ConnectError):
        await client.get(f"http://127.0.0.1:{free_port()}/")


async def test_a_connection_dropped_mid_request_is_read_error(client: httpx.AsyncClient) -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server, url = await _serve(drop)
    async with server:
        with pytest.raises(httpx.ReadError):
            await client.get(url)


async def test_no_answer_within_the_read_timeout_is_read_timeout() -> None:
    answered = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await answered.wait()
        writer.close()

    server, url = await _serve(silent)
    async with server, httpx.AsyncClient(transport=CloudTransport()) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get(url, timeout=httpx.Timeout(0.2, connect=5))
        answered.set()


def _answering(raw: bytes) -> Handler:
    """A handler that writes ``raw`` after the request head, then closes the connection."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(raw)
        await writer.drain()
        writer.close()

    return answer


async def test_a_body_cut_short_is_read_error(client: httpx.AsyncClient) -> None:
    server, url = await _serve(_answering(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}"))
    async with server:
        with pytest.raises(httpx.ReadError):
            await client.get(url)


async def test_an_answer_is_read_as_with_the_default_transport(
    client: httpx.AsyncClient,
) -> None:
    created = b'HTTP/1.1 201 Created\r\nContent-Length: 8\r\n\r\n{"a": 1}'
    server, url = await _serve(_answering(created))
    async with server:
        response = await client.post(url, json={"x": 1})
    assert response.status_code == 201 and response.json() == {"a": 1}
