"""Serve a few hot routes plainly: ``serve_plainly(app, *paths)``, once all routes are added.

``POST /dispatch`` and ``POST /batch`` carry nearly all of the traffic. Their endpoints take the
``Request`` alone, read the body themselves and return a ``Response``, so two layers of the
framework do nothing for them but cost CPU on every call:

- FastAPI's per-route machinery (dependency solving, parameter parsing, response
  serialisation): ~15 µs per call. They are wrapped in Starlette's plain ``request_response``
  instead. They stay ``APIRoute``s, so the OpenAPI document and the
  endpoint reference still describe them.
- The router and the middleware that only FastAPI's own features use (the route search, the
  exit stack for files of dependencies, the app-wide body limit that is not configured here):
  ~8 µs per call, measured with py-spy under wrk. A request for one of these paths goes
  straight to its route inside the same error handling and the same user middleware
  (``add_middleware``: the request guard, the body limit) as every other request; only that
  search and those layers are skipped. The exception handling and the route's own wrapper are
  one layer (``plain_endpoint.Endpoint``): one ``Request`` and one wrap in the same handlers,
  not two. A request FastAPI's native telemetry is tracing takes the whole stack, so its spans
  and exception events are as they were.

Everything else (another method or path, a ``root_path``, a trailing slash) takes the whole
stack as before.
"""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.routing import request_response
from starlette.types import ASGIApp, Receive, Scope, Send

from plain_endpoint import Endpoint


def serve_plainly(app: FastAPI, *paths: str) -> None:
    """Serve the POST routes at ``paths`` plainly; builds ``app``'s middleware stack now.

    Call it last: the stack is built with the middleware and exception handlers the app has
    (Starlette refuses ``add_middleware`` afterwards, as it does once an app has started).
    """
    plain = [
        route
        for route in app.router.routes
        if isinstance(route, APIRoute) and route.path in paths and "POST" in (route.methods or ())
    ]
    for route in plain:
        route.app = request_response(route.endpoint)
        app.router.routes.remove(route)
    # First in line for the whole stack too: the router tries routes in order.
    app.router.routes[:0] = plain
    app.middleware_stack = _Lanes(app.build_middleware_stack(), _lanes(app, plain), app.router)


def _lanes(app: FastAPI, plain: list[APIRoute]) -> dict[str, tuple[APIRoute, ASGIApp]]:
    """Each route inside the error handling and user middleware the whole stack has."""
    error_handler = None
    handlers: dict[Any, Any] = {}
    for key, value in app.exception_handlers.items():  # split as FastAPI's own stack does
        if key in (500, Exception):
            error_handler = value
        else:
            handlers[key] = value
    lanes: dict[str, tuple[APIRoute, ASGIApp]] = {}
    for route in plain:
        lane: ASGIApp = (
            Endpoint(route.endpoint, handlers=handlers, debug=app.debug)
            if inspect.iscoroutinefunction(route.endpoint)
            else ExceptionMiddleware(route.app, handlers=handlers, debug=app.debug)
        )
        for cls, args, kwargs in reversed(app.user_middleware):
            lane = cls(lane, *args, **kwargs)
        lanes[route.path] = (route, ServerErrorMiddleware(lane, error_handler, app.debug))
    return lanes


class _Lanes:
    """ASGI: a plain route's POST to its lane, anything else to the whole stack."""

    def __init__(
        self, stack: ASGIApp, lanes: dict[str, tuple[APIRoute, ASGIApp]], router: Any
    ) -> None:
        self.stack = stack
        self.lanes = lanes
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and not scope.get("root_path")
            and scope.get("fastapi.telemetry") is None
        ):
            found = self.lanes.get(scope["path"])
            if found is not None:
                route, lane = found
                # What the router and the route's match put in the scope.
                scope.setdefault("router", self.router)
                scope["endpoint"] = route.endpoint
                scope["route"] = route
                scope["path_params"] = {}
                await lane(scope, receive, send)
                return
        await self.stack(scope, receive, send)
