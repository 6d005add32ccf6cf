"""The HTTP face of an instance: ``create_app(config) -> FastAPI`` and the module-level ``app``.

``uvicorn local_server:app`` serves the instance configured by the environment and ``.env``;
``create_app(config)`` serves a given config (tests, the CLI). Every resource is opened and
closed in the lifespan (``Runtime.open``); importing this module does nothing but build objects.

Errors become responses in one place (``_envelope_response`` and the exception handlers): the
body is always the result envelope, or FastAPI's validation error for a 422 on the body shape.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal, InvalidOperation
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from config.hybrid_config import HybridConfig
from envelope import Envelope, new_request_id
from errors import (
    ActionError,
    CostLimitExceeded,
    ErrorCode,
    HandlerError,
    Indeterminate,
    InvalidParams,
    NotFound,
    Source,
    Unauthorized,
    storage_fault,
)
from idempotency import ClaimState
from local_batch import batch_execute
from offline_cache import params_hash
from runtime import VERSION, IdempotencyStores, Runtime
from service_registry import idempotency_key_scope
from structured_log import DISPATCH_LOGGER, config_secrets, configure_logging, log_dispatch

MAX_BODY_BYTES = 1024 * 1024
# How long a repeat of a running key waits for it before answering 409: well inside the
# client's timeout, so the client hears "busy" instead of timing out (which would count
# against the cloud). At most this, and at most a quarter of CLOUD_TIMEOUT_SEC.
BUSY_WAIT_S = 2.0
# Failures that prove the handler was never reached: the key is forgotten, not kept as "ran".
_NEVER_REACHED = frozenset(
    {ErrorCode.UNKNOWN_ACTION, ErrorCode.CIRCUIT_OPEN, ErrorCode.OFFLINE, ErrorCode.UNAUTHORIZED}
)
_dispatch_log = logging.getLogger(DISPATCH_LOGGER)
_fault_log = logging.getLogger("everreach.server")


class BodyTooLarge(Exception):
    """The request body passed MAX_BODY_BYTES."""


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

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(
            {
                "ok": False,
                "error": "invalid_params",
                "source": None,
                "detail": f"request body is larger than {self.max_bytes} bytes (1 MiB); "
                f"split the batch or send less data",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _bearer_matches(request: Request, expected: str) -> bool:
    """Does the request carry ``Authorization: Bearer <expected>``? (constant-time compare)"""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return (
        scheme.lower() == "bearer"
        and bool(token)
        and hmac.compare_digest(token.encode(), expected.encode())
    )


def _envelope_response(envelope: Envelope) -> JSONResponse:
    return JSONResponse(envelope.to_dict(), status_code=envelope.http_status)


def _error_response(action: str, exc: ActionError, request_id: str | None = None) -> JSONResponse:
    return _envelope_response(
        Envelope.failure(action, exc, source=None, request_id=request_id or new_request_id())
    )


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidParams(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidParams('the body must be a JSON object, e.g. {"action": "system.echo"}')
    return body


async def _once(
    store: IdempotencyStores,
    key: str,
    action: str,
    digest: str,
    *,
    timeout_s: float,
    rerun_if_dead: bool,
    run: Callable[[], Awaitable[Envelope]],
    keep: Callable[[Envelope], bool],
    what: str,
) -> Response:
    """Run ``run()`` at most once per ``key``; a repeat gets the stored answer.

    The same key with another action or other params is 422; while the first call still runs,
    a repeat waits up to ``timeout_s`` and then gets 409 ``conflict`` with ``Retry-After``. A
    key whose holder died mid-call is re-run only if ``rerun_if_dead`` (an idempotent action),
    else it is 409 ``indeterminate``: it may have run, a person decides. Only answers for
    which ``keep(envelope)`` holds are stored; a failure releases the key so a retry may run.
    """
    claim = await store.wait(key, action, digest, timeout_s=timeout_s, rerun_if_dead=rerun_if_dead)
    if claim.state is ClaimState.DONE:
        return JSONResponse(
            claim.body,
            status_code=claim.status_code or 200,
            headers={"Idempotent-Replayed": "true"},
        )
    if claim.state is ClaimState.MISMATCH:
        raise InvalidParams(f"{what} was already used for another action or other params")
    if claim.state is ClaimState.RUNNING:
        # The envelope's shape, with a code of its own: the first call is still running.
        busy = Envelope(ok=False, action=action, source=None, request_id=key).to_dict()
        busy.update(error="conflict", detail=f"a request with this {what} is still running")
        return JSONResponse(busy, status_code=409, headers={"Retry-After": "1"})
    if claim.state is ClaimState.INDETERMINATE:
        exc = Indeterminate(
            f"the process that ran this {what} died mid-handler: {action} may have run; it is "
            f"not run again under this key (retry with a new key to run it again)"
        )
        return _envelope_response(Envelope.failure(action, exc, source=None, request_id=key))
    try:
        with idempotency_key_scope(key):
            envelope = await run()
    except BaseException:
        await store.release(key)
        raise
    if keep(envelope):
        await store.complete(key, envelope.http_status, envelope.to_dict())
    else:
        await store.release(key, ran=envelope.error not in _NEVER_REACHED)
    return _envelope_response(envelope)


def _check_cost_limit(action: str, price_usd: Decimal, header: str | None) -> None:
    """Refuse, before anything runs, a call whose price here is above the caller's Cost-Limit.

    The caller reserved ``Cost-Limit`` against its monthly cap; running a dearer call would pass
    it. The refusal carries our price so the caller can reserve that and ask again.
    """
    if header is None:
        return
    try:
        limit = Decimal(header.strip())
    except InvalidOperation:
        limit = Decimal("NaN")
    if not limit.is_finite() or limit < 0:
        raise InvalidParams(
            f"Cost-Limit must be a non-negative decimal of US dollars; got {header[:40]!r}"
        )
    if price_usd > limit:
        raise CostLimitExceeded(
            f"{action} costs ${format(price_usd, 'f')} here, above the Cost-Limit of "
            f"${format(limit, 'f')} the caller reserved; nothing ran",
            price_usd=price_usd,
        )


def create_app(config: HybridConfig | None = None) -> FastAPI:
    """Build the app; ``config=None`` reads the environment and ``.env`` at start-up."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings = config or HybridConfig.load()
        configure_logging(
            settings.log_level, fmt=settings.log_format, secrets=config_secrets(settings)
        )
        async with Runtime.open(settings) as runtime:
            app.state.runtime = runtime
            yield
        app.state.runtime = None

    app = FastAPI(title="EverReach hybrid orchestrator", version=VERSION, lifespan=lifespan)
    app.add_middleware(BodyLimitMiddleware)

    def rt(request: Request) -> Runtime:
        runtime: Runtime = request.app.state.runtime
        return runtime

    def check_local_token(request: Request) -> None:
        token = rt(request).config.secret("local_api_token")
        if token is not None and not _bearer_matches(request, token):
            raise Unauthorized(
                "missing or wrong bearer token: send 'Authorization: Bearer <LOCAL_API_TOKEN>'"
            )

    def check_cloud_key(request: Request) -> None:
        key = rt(request).config.secret("everreach_cloud_key")
        if key is None:
            raise Unauthorized(
                "this instance does not serve /api/*: set EVERREACH_CLOUD_KEY on it to the key "
                "its callers send"
            )
        if not _bearer_matches(request, key):
            raise Unauthorized(
                "missing or wrong bearer key: send 'Authorization: Bearer <EVERREACH_CLOUD_KEY>'"
            )

    @app.exception_handler(ActionError)
    async def on_action_error(request: Request, exc: ActionError) -> JSONResponse:
        return _error_response(str(getattr(request.state, "action", "") or ""), exc)

    @app.exception_handler(Exception)
    async def on_fault(request: Request, exc: Exception) -> JSONResponse:
        # A fault of ours (disk full, a store gone): an envelope, never an HTML page, and never
        # a 202 — nothing was queued.
        _fault_log.exception("unexpected error", extra={"path": request.url.path})
        fault = storage_fault(exc) or HandlerError(
            f"internal error: {type(exc).__name__}: {exc}"[:300]
        )
        return _error_response(str(getattr(request.state, "action", "") or ""), fault)

    @app.post("/dispatch")
    async def dispatch(request: Request) -> Response:
        runtime = rt(request)
        check_local_token(request)
        body = await _json_object(request)
        action = body.get("action")
        request.state.action = action if isinstance(action, str) else ""
        if not isinstance(action, str):
            raise InvalidParams("'action' is required: a 'service.topic' string")
        params = body.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise InvalidParams(f"'params' must be a JSON object; got {type(params).__name__}")
        force_env = body.get("force_env")
        key = body.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or not 8 <= len(key) <= 200):
            raise InvalidParams("'idempotency_key' must be a string of 8 to 200 characters")
        if key is None:
            envelope = await _route(runtime, action, params, force_env, new_request_id())
            return _envelope_response(envelope)
        return await _route_once(runtime, action, params, force_env, key)

    async def _route(
        runtime: Runtime, action: str, params: dict[str, Any], force_env: Any, request_id: str
    ) -> Envelope:
        assert runtime.orchestrator is not None
        envelope = await runtime.orchestrator.route(
            action, params, force_env, request_id=request_id
        )
        outcome = (
            "ok"
            if envelope.ok
            else (
                "queued"
                if envelope.queued
                else (envelope.error.value if envelope.error else "error")
            )
        )
        source = envelope.source.value if envelope.source else None
        runtime.metrics.observe_dispatch(action, source, outcome, envelope.duration_ms / 1000)
        log_dispatch(
            _dispatch_log,
            request_id=envelope.request_id,
            action=action,
            env=envelope.env.value if envelope.env else "none",
            source=source,
            outcome=outcome,
            duration_ms=envelope.duration_ms,
            error=envelope.error.value if envelope.error else None,
            attempts=envelope.attempts,
        )
        return envelope

    async def _route_once(
        runtime: Runtime, action: str, params: dict[str, Any], force_env: Any, key: str
    ) -> Response:
        """Route under an idempotency key: a repeated key answers what the first call did."""
        return await _once(
            runtime.idempotency,
            f"dispatch:{key}",
            action,
            params_hash({"force_env": force_env, "params": params}),
            timeout_s=runtime.config.cloud_timeout_sec,
            rerun_if_dead=runtime.route_table.get(action).idempotent,
            run=lambda: _route(runtime, action, params, force_env, key),
            keep=lambda envelope: envelope.ok or envelope.queued,
            what="idempotency_key",
        )

    @app.post("/batch")
    async def batch(request: Request) -> Response:
        runtime = rt(request)
        check_local_token(request)
        body = await _json_object(request)
        items = body.get("items")
        if not isinstance(items, list):
            raise InvalidParams("'items' is required: a list of {action, params} objects")
        max_concurrent = body.get("max_concurrent", 3)
        if not isinstance(max_concurrent, int) or isinstance(max_concurrent, bool):
            raise InvalidParams("'max_concurrent' must be an integer")

        async def route(
            action: str, params: dict[str, Any] | None, force_env: str | None
        ) -> Envelope:
            return await _route(runtime, action, params or {}, force_env, new_request_id())

        return JSONResponse(await batch_execute(items, max_concurrent, route=route))

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        return await rt(request).health()

    @app.get("/status")
    async def status(request: Request) -> dict[str, Any]:
        check_local_token(request)
        return await rt(request).status()

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, content_type = rt(request).metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", response_class=HTMLResponse)
    async def status_page(request: Request) -> HTMLResponse:
        from status_page import render_status_page

        return HTMLResponse(render_status_page())

    # -- the cloud role: every instance can serve another one ------------------------------------

    @app.post("/api/services/{service}/{topic}")
    async def serve_action(service: str, topic: str, request: Request) -> Response:
        runtime = rt(request)
        action = f"{service}.{topic}"
        request.state.action = action
        check_cloud_key(request)
        body = await _json_object(request)
        params = body.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise InvalidParams(f"'params' must be a JSON object; got {type(params).__name__}")
        if runtime.local.has(action):  # an unknown action is a 404 below, whatever its price
            _check_cost_limit(action, runtime.rates.rate(action), request.headers.get("cost-limit"))
        key = request.headers.get("idempotency-key")
        if key is None:
            return _envelope_response(await _serve(runtime, action, params, new_request_id()))
        if not 8 <= len(key) <= 200:
            raise InvalidParams("Idempotency-Key must be 8 to 200 characters")
        return await _once(
            runtime.idempotency,
            key,
            action,
            params_hash(params),
            timeout_s=min(BUSY_WAIT_S, runtime.config.cloud_timeout_sec / 4),
            rerun_if_dead=runtime.route_table.get(action).idempotent,
            run=lambda: _serve(runtime, action, params, key),
            keep=lambda envelope: envelope.ok,
            what="Idempotency-Key",
        )

    async def _serve(
        runtime: Runtime, action: str, params: dict[str, Any], request_id: str
    ) -> Envelope:
        started = time.perf_counter()
        with idempotency_key_scope(request_id):
            envelope = await runtime.local.execute(action, params, request_id=request_id)
        envelope.source = Source.CLOUD
        if envelope.ok:
            envelope.cost_usd = runtime.rates.rate(action)
        outcome = "ok" if envelope.ok else (envelope.error.value if envelope.error else "error")
        runtime.metrics.observe_dispatch(action, "cloud", outcome, time.perf_counter() - started)
        return envelope

    @app.get("/api/sync/state")
    async def get_state(request: Request) -> dict[str, Any]:
        check_cloud_key(request)
        runtime = rt(request)
        assert runtime.state_sync is not None
        return await runtime.state_sync.serve_state()

    @app.post("/api/sync/state")
    async def post_state(request: Request) -> dict[str, Any]:
        check_cloud_key(request)
        runtime = rt(request)
        assert runtime.state_sync is not None
        return await runtime.state_sync.accept_state(await _json_object(request))

    @app.get("/api/schedules")
    async def schedules(request: Request) -> dict[str, Any]:
        check_cloud_key(request)
        from local_cron import load_schedules

        runtime = rt(request)
        return {"schedules": [s.to_dict() for s in load_schedules(runtime.config.schedules_path)]}

    @app.get("/api/idempotency/{key}")
    async def idempotency_state(key: str, request: Request) -> dict[str, Any]:
        """Did a handler here ever run ``key``? unknown | running | done | indeterminate."""
        check_cloud_key(request)
        return {"key": key, "state": (await rt(request).idempotency.lookup(key)).value}

    # -- the outbox, for a person: retry or drop dead letters, cancel queued items ---------------

    @app.post("/outbox/{item_id}/retry")
    async def retry_outbox_item(item_id: str, request: Request) -> dict[str, Any]:
        """Queue a dead letter again; an indeterminate one needs ``{"rerun": true}``."""
        check_local_token(request)
        raw = await request.body()
        body = await _json_object(request) if raw.strip() else {}
        rerun = body.get("rerun", False)
        if not isinstance(rerun, bool):
            raise InvalidParams("'rerun' must be true or false")
        runtime = rt(request)
        try:
            item = await runtime.outbox.retry_dead(item_id, rerun=rerun)
        except KeyError:
            raise NotFound(f"no dead letter with id {item_id!r} in the outbox") from None
        await runtime.refresh_gauges()
        return {
            "ok": True,
            "id": item.id,
            "action": item.action,
            "status": item.status.value,
            "idempotency_key": item.idempotency_key,
        }

    @app.delete("/outbox/{item_id}")
    async def drop_outbox_item(item_id: str, request: Request) -> dict[str, Any]:
        """Drop a dead letter, or cancel a queued item before it is sent."""
        check_local_token(request)
        runtime = rt(request)
        try:
            item = await runtime.outbox.drop(item_id)
        except KeyError:
            raise NotFound(f"no item with id {item_id!r} in the outbox") from None
        await runtime.refresh_gauges()
        return {"ok": True, "id": item.id, "action": item.action, "dropped": item.status.value}

    return app


app = create_app()
