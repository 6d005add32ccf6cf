"""A fault-injecting HTTP proxy for end-to-end tests, run as a real uvicorn server in a thread.

Each call of an action (``/api/services/*``, ``/api/batch``) takes the next fault from its plan
(then ``pass`` forever); other requests pass:

- ``pass``        forward to the target and return its answer;
- ``500``         answer 500 without forwarding (the cloud never ran it);
- ``500_after``   forward, wait for the target's answer, then answer 500 (it DID run: the
                  answer was lost — the ambiguous case idempotency keys exist for);
- ``slow_after``  forward, then hold the answer for ``slow_s`` (the client times out after
                  the action ran).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Iterable

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


class FaultProxy:
    def __init__(self, target: str, port: int, plan: Iterable[str] = (), *, slow_s: float = 2.0):
        self.target = target.rstrip("/")
        self.port = port
        self.plan: deque[str] = deque(plan)
        self.slow_s = slow_s
        self.seen: list[tuple[str, str]] = []  # (path, fault)
        self._lock = threading.Lock()
        app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST"])])
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fault proxy did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def _next_fault(self, path: str) -> str:
        with self._lock:
            calls = path.startswith(("api/services", "api/batch"))
            fault = self.plan.popleft() if self.plan and calls else "pass"
            self.seen.append((path, fault))
            return fault

    async def _handle(self, request: Request) -> Response:
        path = request.path_params["path"]
        fault = self._next_fault(path)
        if fault == "500":
            return Response('{"ok": false}', status_code=500, media_type="application/json")
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.request(
                request.method,
                f"{self.target}/{path}",
                content=await request.body(),
                headers=headers,
                params=dict(request.query_params),
            )
        if fault == "500_after":
            return Response('{"ok": false}', status_code=500, media_type="application/json")
        if fault == "slow_after":
            await asyncio.sleep(self.slow_s)
        return Response(
            answer.content,
            status_code=answer.status_code,
            media_type=answer.headers.get("content-type"),
        )
