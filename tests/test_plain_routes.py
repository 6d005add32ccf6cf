"""Tests of plain_routes.py: a plain route answers as the whole stack would, with less on the way
(the router and FastAPI's own layers)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.testclient import TestClient
from starlette.types import Receive, Scope, Send

from plain_routes import serve_plainly


class Refused(Exception):
    """An error the app maps to a response of its own."""


class Marking:
    """User middleware: marks every answer, so a test sees it ran."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def marked(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-marked", b"yes")]
            await send(message)

        await self.app(scope, receive, send=marked)


def _app(*, plain: bool) -> FastAPI:
    """Two identical POST routes, ``/hot`` (plain when ``plain``) and ``/cold``."""
    app = FastAPI()
    app.add_middleware(Marking)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Response:
        return JSONResponse({"refused": str(exc)}, status_code=409)

    @app.exception_handler(Exception)
    async def fault(request: Request, exc: Exception) -> Response:
        return JSONResponse({"fault": type(exc).__name__}, status_code=500)

    async def answer(request: Request) -> Response:
        body = await request.json()
        if body.get("refuse"):
            raise Refused("no")
        if body.get("crash"):
            raise RuntimeError("boom")
        if body.get("teapot"):
            raise HTTPException(418, "short and stout", headers={"x-teapot": "yes"})
        seen = {
            "path_params": request.path_params,
            "route": request.scope["route"].path,
            "endpoint": request.scope["endpoint"].__name__,
        }
        return JSONResponse({"echo": body, "seen": seen})

    app.post("/hot")(answer)
    app.post("/cold")(answer)
    if plain:
        serve_plainly(app, "/hot")
    return app


BODIES = [{"n": 1}, {"refuse": True}, {"crash": True}]


@pytest.mark.parametrize("body", BODIES, ids=["ok", "mapped-error", "fault"])
def test_a_plain_route_answers_as_the_whole_stack_does(body: dict[str, Any]) -> None:
    with (
        TestClient(_app(plain=True), raise_server_exceptions=False) as plain,
        TestClient(_app(plain=False), raise_server_exceptions=False) as whole,
    ):
        got, expected = plain.post("/hot", json=body), whole.post("/hot", json=body)
    assert got.status_code == expected.status_code
    assert got.json() == expected.json()
    # The user middleware ran (a fault's answer comes from outside it, in both)
    assert got.headers.get("x-marked") == expected.headers.get("x-marked")
    assert ("x-marked" in got.headers) == ("crash" not in body)


def test_an_http_exception_is_answered_by_the_same_handler_on_a_plain_route() -> None:
    with (
        TestClient(_app(plain=True), raise_server_exceptions=False) as plain,
        TestClient(_app(plain=False), raise_server_exceptions=False) as whole,
    ):
        got, expected = (c.post("/hot", json={"teapot": True}) for c in (plain, whole))
    assert (got.status_code, got.text) == (expected.status_code, expected.text)
    assert got.status_code == 418 and "short and stout" in got.text
    assert got.headers["x-teapot"] == expected.headers["x-teapot"] == "yes"
    assert got.headers.get("x-marked") == expected.headers.get("x-marked") == "yes"


def test_a_plain_route_skips_the_router() -> None:
    app = _app(plain=True)
    stack = app.middleware_stack
    whole: list[str] = []

    async def spy(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            whole.append(scope["path"])
        await inner(scope, receive, send)

    inner, stack.stack = stack.stack, spy  # type: ignore[union-attr]
    with TestClient(app) as client:
        assert client.post("/hot", json={"n": 1}).status_code == 200
        assert client.post("/cold", json={"n": 1}).status_code == 200
        assert client.get("/hot").status_code == 405
        assert client.post("/hot/", json={"n": 1}, follow_redirects=False).status_code == 307
    assert whole == ["/cold", "/hot", "/hot/"]


@pytest.mark.parametrize(
    "extra", [{"root_path": "/api"}, {"fastapi.telemetry": object()}], ids=["root-path", "traced"]
)
def test_a_request_under_a_root_path_or_traced_takes_the_whole_stack(extra: dict[str, Any]) -> None:
    app = _app(plain=True)
    lanes = app.middleware_stack
    taken: list[str] = []

    async def stack(scope: Scope, receive: Receive, send: Send) -> None:
        taken.append("whole")
        await Response(status_code=204)(scope, receive, send)

    lanes.stack = stack  # type: ignore[union-attr]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/hot", "headers": [], **extra}

    async def main() -> None:
        assert lanes is not None
        await lanes(scope, receive, send)

    asyncio.run(main())
    assert taken == ["whole"]
    assert sent[0]["status"] == 204


def test_only_post_routes_at_the_paths_given_are_made_plain() -> None:
    app = FastAPI()

    @app.get("/hot")
    async def read() -> dict[str, str]:
        return {"read": "yes"}

    @app.post("/hot")
    async def write(request: Request) -> Response:
        return JSONResponse({"wrote": "yes"})

    serve_plainly(app, "/hot", "/missing")
    with TestClient(app) as client:
        assert client.get("/hot").json() == {"read": "yes"}
        assert client.post("/hot").json() == {"wrote": "yes"}
    assert [getattr(route, "path", None) for route in app.router.routes][:1] == ["/hot"]
