"""body_limit: bodies over 1 MiB get the 413 envelope, by Content-Length or while streaming."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from body_limit import MAX_BODY_BYTES, BodyLimitMiddleware


@pytest.fixture
def client(app_client: Callable[..., TestClient]) -> TestClient:
    return app_client()


def _assert_payload_too_large(answer) -> None:
    assert answer.status_code == 413
    envelope = answer.json()
    assert envelope["ok"] is False and envelope["error"] == "payload_too_large"
    assert "1 MiB" in envelope["detail"] and envelope["request_id"]


def test_a_body_over_the_limit_by_content_length_is_a_413_envelope(client: TestClient) -> None:
    body = b'{"action": "system.echo", "params": {"x": "' + b"a" * MAX_BODY_BYTES + b'"}}'
    _assert_payload_too_large(client.post("/dispatch", content=body))


def test_a_chunked_body_over_the_limit_is_a_413_envelope(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(17):
            yield b"x" * 65536

    _assert_payload_too_large(client.post("/batch", content=chunks()))


def test_a_body_at_the_limit_is_read(client: TestClient) -> None:
    head, tail = b'{"action": "system.echo", "params": {"x": "', b'"}}'
    body = head + b"a" * (MAX_BODY_BYTES - len(head) - len(tail)) + tail
    assert client.post("/dispatch", content=body).status_code == 200


async def test_a_chunked_body_over_the_limit_is_refused_whatever_its_content_length() -> None:
    sent: list[dict[str, Any]] = []
    chunks = [b"x" * (MAX_BODY_BYTES // 2 + 1)] * 2 + [b""]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app must not run")

    headers = [(b"content-length", b"10"), (b"transfer-encoding", b"chunked")]
    scope = {"type": "http", "method": "POST", "path": "/dispatch", "headers": headers}
    await BodyLimitMiddleware(app)(scope, receive, send)
    assert sent[0]["status"] == 413
