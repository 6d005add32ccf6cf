"""The served OpenAPI document: request bodies, bearer schemes, and offline Swagger UI at /docs.

The routes read their bodies themselves (strict JSON, the envelope for every error), so FastAPI
cannot see them; this module adds what it cannot: the body schemas of ``request_body``'s models
and the two bearer schemes, so ``/docs`` can send a body with "Try it out".

It also owns how the routes' documented fields are built: ``without_pydantic_v1_probe`` keeps
FastAPI from importing ``pydantic.v1`` just to find that no route uses it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from request_body import (
    REQUEST_MODELS,
    BatchBody,
    BatchItem,
    DispatchBody,
    ServeBatchBody,
    ServeBatchItem,
    ServeBody,
)

LOCAL_TOKEN = "localApiToken"
CLOUD_KEY = "cloudKey"
_SCHEMES = {
    LOCAL_TOKEN: {
        "type": "http",
        "scheme": "bearer",
        "description": "LOCAL_API_TOKEN: needed by /dispatch, /batch and /status when it is set",
    },
    CLOUD_KEY: {
        "type": "http",
        "scheme": "bearer",
        "description": "EVERREACH_CLOUD_KEY: needed by every /api/* endpoint",
    },
}
# (method, path) -> (security scheme, body model or None)
_OPERATIONS: dict[tuple[str, str], tuple[str, type[BaseModel] | None]] = {
    ("post", "/dispatch"): (LOCAL_TOKEN, DispatchBody),
    ("post", "/batch"): (LOCAL_TOKEN, BatchBody),
    ("get", "/status"): (LOCAL_TOKEN, None),
    ("post", "/api/services/{service}/{topic}"): (CLOUD_KEY, ServeBody),
    ("post", "/api/batch"): (CLOUD_KEY, ServeBatchBody),
    ("get", "/api/sync/state"): (CLOUD_KEY, None),
    ("post", "/api/sync/state"): (CLOUD_KEY, None),
    ("get", "/api/schedules"): (CLOUD_KEY, None),
}


_PYDANTIC_V1 = "pydantic.v1"


@contextlib.contextmanager
def without_pydantic_v1_probe() -> Iterator[None]:
    """While routes are added, FastAPI does not import ``pydantic.v1`` to check their fields.

    For every path parameter and response model, FastAPI asks whether the type is a
    ``pydantic.v1`` model, importing ``pydantic.v1`` to ask: 1.5 MiB of the idle RSS and ~40 ms
    of CPU at start-up (measured), for a package nothing here uses. No type can be a
    ``pydantic.v1`` model unless ``pydantic.v1`` is imported, so while it is not, its import is
    made to fail (the case FastAPI handles as "no v1 models": newer Pythons lack it) and the
    answer is the same. Once imported (by a services module, say), FastAPI checks as before.
    Usable as a decorator (``create_app``).
    """
    if _PYDANTIC_V1 in sys.modules:
        yield
        return
    sys.modules[_PYDANTIC_V1] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if _PYDANTIC_V1 in sys.modules and sys.modules[_PYDANTIC_V1] is None:
            del sys.modules[_PYDANTIC_V1]


def _components() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in REQUEST_MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    # The batch runner checks items itself (naming the one at fault); the docs show their shape.
    schemas["BatchBody"]["properties"]["items"]["items"] = {
        "$ref": f"#/components/schemas/{BatchItem.__name__}"
    }
    schemas["ServeBatchBody"]["properties"]["items"]["items"] = {
        "$ref": f"#/components/schemas/{ServeBatchItem.__name__}"
    }
    return schemas


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` document the request bodies and bearer schemes."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = document.setdefault("components", {})
            components.setdefault("schemas", {}).update(_components())
            components["securitySchemes"] = _SCHEMES
            for (method, path), (scheme, model) in _OPERATIONS.items():
                operation = document.get("paths", {}).get(path, {}).get(method)
                if operation is None:
                    continue
                operation["security"] = [{scheme: []}]
                body: dict[str, Any] = (
                    {"$ref": f"#/components/schemas/{model.__name__}"}
                    if model is not None
                    else {"type": "object"}
                )
                if method == "post":
                    operation["requestBody"] = {
                        "required": model is not ServeBody,
                        "content": {"application/json": {"schema": body}},
                    }
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
