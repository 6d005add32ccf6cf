"""Fuzz every operation of the served OpenAPI document of a real server with schemathesis.

Valid and invalid cases (a fixed seed: the same cases every run) for each operation; no answer
may be a 5xx unless it is a handler's own failure (``handler_error`` from a handler that raised).
Bounded to a few thousand cases so the suite stays fast.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

pytestmark = pytest.mark.e2e

KEY = "fuzz-cloud-key-0001"
CASES_PER_OPERATION_AND_MODE = 150


def _handlers_own_failure(response: Any) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    detail = body.get("detail") or "" if isinstance(body, dict) else ""
    return body.get("error") == "handler_error" and " raised " in detail


# Some 2,400 cases against a real server: about a minute on a quiet 2-core machine, twice that
# beside other work; past the suite's 120 s per test only when the machine is that busy.
@pytest.mark.timeout(360)
def test_fuzzing_the_served_openapi_gives_no_5xx_but_a_handlers_own_error(server_factory) -> None:
    server = server_factory(name="fuzz", EVERREACH_CLOUD_KEY=KEY)
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    session = requests.Session()
    statuses: Counter[int] = Counter()
    faults: list[str] = []

    def fuzz(operation: Any, mode: schemathesis.GenerationMode) -> None:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=CASES_PER_OPERATION_AND_MODE,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            response = case.call(
                base_url=server.url,
                session=session,
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=30,
            )
            statuses[response.status_code] += 1
            if response.status_code >= 500 and not _handlers_own_failure(response):
                faults.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:200]}"
                )

        try:
            run()
        except Unsatisfiable:
            # An operation with nothing to send (GET /health) has no invalid cases.
            assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label

    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    for path in ("/dispatch", "/batch", "/api/services/{service}/{topic}"):
        assert "requestBody" in document["paths"][path]["post"], f"{path}: nothing to fuzz"
    for operation in operations:
        for mode in schemathesis.GenerationMode:
            fuzz(operation, mode)

    total = sum(statuses.values())
    print(
        f"fuzzed {total} cases over {len(operations)} operations: {dict(sorted(statuses.items()))}"
    )
    assert total >= 2000
    assert faults == []
