"""The baseline of ``bench_http``: the least a FastAPI endpoint can do to echo a dispatch body.

    uvicorn bench.bare_app:app

``POST /echo`` reads the same JSON body ``/dispatch`` gets (``{"action", "params"}``), checks it
is an object with an object ``params``, awaits the very handler ``system.echo`` runs, and answers
``{"ok": true, "action": …, "result": …}`` with a ``JSONResponse`` (the same response class
``/dispatch`` uses). Everything ``/dispatch`` does beyond that — the body-size middleware, the
token check, routing, the envelope, metrics, the dispatch log line — is what ``bench_http``
measures.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service_registry import _echo as echo  # the handler behind system.echo, not a copy


def create_app() -> FastAPI:
    """Build the bare app (nothing opened: there is nothing to open)."""
    app = FastAPI(title="bench bare endpoint")

    @app.post("/echo")
    async def echo_endpoint(request: Request) -> JSONResponse:
        try:
            body: Any = json.loads(await request.body())
        except (UnicodeDecodeError, json.JSONDecodeError):
            return JSONResponse({"ok": False, "error": "invalid_params"}, status_code=400)
        params = body.get("params") if isinstance(body, dict) else None
        if not isinstance(params, dict):
            return JSONResponse({"ok": False, "error": "invalid_params"}, status_code=400)
        result = await echo(params)
        return JSONResponse({"ok": True, "action": body.get("action"), "result": result})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


app = create_app()
