"""api_docs: the served OpenAPI document has request bodies and bearer schemes; /docs is offline."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def client(module_app_client: Callable[..., TestClient]) -> TestClient:
    """One app for the module: its tests only read the documents."""
    return module_app_client()


@pytest.fixture(scope="module")
def document(client: TestClient) -> dict[str, Any]:
    answer = client.get("/openapi.json")
    assert answer.status_code == 200
    body: dict[str, Any] = answer.json()
    return body


@pytest.mark.parametrize(
    ("path", "model", "scheme"),
    [
        ("/dispatch", "DispatchBody", "localApiToken"),
        ("/batch", "BatchBody", "localApiToken"),
        ("/api/services/{service}/{topic}", "ServeBody", "cloudKey"),
    ],
)
def test_post_endpoints_document_their_body_and_bearer_scheme(
    document: dict[str, Any], path: str, model: str, scheme: str
) -> None:
    operation = document["paths"][path]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": f"#/components/schemas/{model}"}
    assert operation["security"] == [{scheme: []}]
    component = document["components"]["schemas"][model]
    assert component["additionalProperties"] is False


def test_the_dispatch_body_names_its_fields_and_the_bearer_schemes_are_declared(
    document: dict[str, Any],
) -> None:
    fields = document["components"]["schemas"]["DispatchBody"]["properties"]
    assert set(fields) == {
        "action",
        "params",
        "force_env",
        "idempotency_key",
        "not_before",
        "delay_sec",
    }
    assert fields["not_before"]["anyOf"][0]["format"] == "date-time"
    assert document["components"]["schemas"]["DispatchBody"]["required"] == ["action"]
    schemes = document["components"]["securitySchemes"]
    assert schemes["localApiToken"] == {
        **schemes["localApiToken"],
        "type": "http",
        "scheme": "bearer",
    }
    assert "BatchItem" in document["components"]["schemas"]


def test_docs_load_every_asset_from_this_server(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=["']?([^"' >]+)""", page.text)
    assert any(asset.endswith("swagger-ui-bundle.js") for asset in assets)
    for asset in assets:
        assert asset.startswith("/"), f"{asset} is not served by this server"
        assert client.get(asset).status_code == 200, asset


# A served app (lifespan, /health, /status, /openapi.json), then whether pydantic.v1 was loaded,
# then a model with a pydantic.v1 response type, which FastAPI must still refuse.
_V1_PROBE = """
import sys
from fastapi.testclient import TestClient
from config.hybrid_config import HybridConfig
from local_server import create_app

variables = {"DATA_DIR": sys.argv[1], "EVERREACH_ENV": "local", "ALLOWED_HOSTS": "testserver"}
with TestClient(create_app(HybridConfig.from_mapping(variables))) as client:
    for path in ("/health", "/status", "/openapi.json"):
        assert client.get(path).status_code == 200, path
print("v1 loaded" if "pydantic.v1" in sys.modules else "v1 not loaded")

from fastapi import FastAPI
from pydantic import v1

class Old(v1.BaseModel):
    x: int

try:
    FastAPI().get("/old", response_model=Old)(lambda: None)
except Exception as exc:
    print("refused", type(exc).__name__)
"""


@pytest.mark.process
def test_serving_does_not_load_pydantic_v1_and_v1_models_are_still_refused(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _V1_PROBE, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["v1 not loaded", "refused PydanticV1NotSupportedError"]
