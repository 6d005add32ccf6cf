"""http_responses: an envelope or an error as the HTTP response the server sends."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.responses import Response

import http_responses
from envelope import Envelope
from errors import Forbidden, InvalidParams, RateLimited, Source
from http_responses import (
    bytes_response,
    envelope_response,
    error_response,
    json_response,
    lines_as_done,
)


def body_of(response: Response) -> Any:
    return json.loads(bytes(response.body))


def test_an_envelope_keeps_its_status_and_body() -> None:
    envelope = Envelope.success("system.echo", {"hi": 1}, source=Source.LOCAL, request_id="r1")
    response = envelope_response(envelope)
    assert response.status_code == 200
    assert response.media_type == "application/json"
    assert body_of(response) == envelope.to_dict()
    assert "retry-after" not in response.headers


def test_a_deferred_envelope_is_202_without_retry_after() -> None:
    until = datetime.now(UTC) + timedelta(seconds=30)
    envelope = Envelope.deferred(
        "dm.send", outbox_id="o1", request_id="r2", deferred_until=until, detail="scheduled"
    )
    response = envelope_response(envelope)
    assert response.status_code == 202
    assert body_of(response)["deferred_until"]
    assert "retry-after" not in response.headers


def test_a_rate_limited_error_says_when_to_ask_again() -> None:
    until = datetime.now(UTC) + timedelta(seconds=7.2)
    response = error_response("research.keyword", RateLimited("over its limit", not_before=until))
    assert response.status_code == 429
    assert response.headers["retry-after"] in {"7", "8"}
    body = body_of(response)
    assert body["error"] == "rate_limited" and body["ok"] is False and body["request_id"]


def test_an_error_keeps_the_exceptions_own_status() -> None:
    response = error_response("x.y", Forbidden("cross-site request"), "r3")
    assert response.status_code == 403
    assert body_of(response)["error"] == "unauthorized"
    assert error_response("x.y", InvalidParams("bad")).status_code == 422


def test_json_bodies_are_strict_ascii_even_with_nan_or_lone_surrogates() -> None:
    response = json_response({"result": float("nan"), "detail": "ok"}, 200, {"X-A": "1"})
    body = body_of(response)  # parses: no NaN written
    assert body["result"] is None and response.headers["x-a"] == "1"
    text = bytes(json_response({"detail": "\ud800"}, 422).body)
    assert text.isascii() and json.loads(text)["detail"] == "\ud800"
    assert bytes_response(b'{"a": 1}', 201).status_code == 201


async def test_lines_go_out_as_their_runs_end_those_ending_together_in_one_write() -> None:
    loop = asyncio.get_running_loop()
    runs = [loop.create_future() for _ in range(5)]
    writes: list[bytes] = []

    async def read() -> None:
        async for chunk in lines_as_done(runs):
            writes.append(chunk)

    reader = asyncio.ensure_future(read())
    await asyncio.sleep(0)
    runs[3].set_result(b"3\n")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert writes == [b"3\n"]  # out as soon as it ended, before the others
    runs[0].set_result(b"0\n")
    runs[4].set_result(b"4\n")  # the same turn: one write
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert writes == [b"3\n", b"0\n4\n"]
    runs[2].set_result(b"2\n")
    runs[1].set_result(b"1\n")
    await reader
    assert writes == [b"3\n", b"0\n4\n", b"2\n1\n"]
    assert all(not run._callbacks for run in runs)  # nothing left attached


async def test_a_reader_gone_mid_way_leaves_the_runs_it_did_not_read_alone() -> None:
    loop = asyncio.get_running_loop()
    runs = [loop.create_future() for _ in range(3)]
    lines = lines_as_done(runs)
    runs[1].set_result(b"1\n")
    assert await anext(lines) == b"1\n"
    await lines.aclose()  # the caller went away
    assert all(not run._callbacks for run in runs)
    runs[0].set_result(b"0\n")  # a run ending later needs nobody to read it


@pytest.mark.parametrize("status", [101, 200, 202, 204, 304, 400, 409, 413, 422, 500, 503])
@pytest.mark.parametrize("payload", [b"", b"{}", b'{"ok":true,"detail":"\\u00e9"}'])
def test_a_plain_json_response_is_what_starlettes_response_builds(
    status: int, payload: bytes
) -> None:
    """``bytes_response`` builds its responses without ``Response.__init__`` while the two are
    the same; if Starlette's ``Response.__init__``/``init_headers`` changed what they set, the
    answers fall back to it and this test says so."""
    assert http_responses._plain_made_as_starlette_does(), (
        "starlette.responses.Response.__init__ no longer sets what "
        "http_responses._plain_response sets: update it"
    )
    made = bytes_response(payload, status)
    reference = Response(payload, status_code=status, media_type="application/json")
    assert type(made) is Response
    assert vars(made) == vars(reference)
    assert list(vars(made)) == list(vars(reference))
    assert made.headers.raw == reference.headers.raw


async def test_a_plain_json_response_sends_what_starlettes_response_sends() -> None:
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request"}

    scope = {"type": "http"}
    await bytes_response(b'{"ok":true}', 200)(scope, receive, send)
    made = list(sent)
    sent.clear()
    await Response(b'{"ok":true}', status_code=200, media_type="application/json")(
        scope, receive, send
    )
    assert made == sent
