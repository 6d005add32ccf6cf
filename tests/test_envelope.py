"""Envelope and the error tree: the HTTP status of every outcome and the JSON body's fields."""

from __future__ import annotations

import dataclasses
import json
import re
from decimal import Decimal
from typing import Any

import pytest

import errors
from envelope import Envelope, check_idempotency_key, new_request_id
from errors import (
    HTTP_STATUS_BY_CODE,
    ActionError,
    CircuitOpen,
    CloudTimeout,
    CloudUnavailable,
    ConfigError,
    CostCapReached,
    ErrorCode,
    EverReachError,
    HandlerError,
    InvalidParams,
    Offline,
    PayloadTooLarge,
    RegistryError,
    RouteTableError,
    Source,
    StorageUnavailable,
    Unauthorized,
    UnknownAction,
)

pytestmark = pytest.mark.prd200

# The contract: 401 token, 404 unknown action, 413 body too large, 422 bad params, 429 cost
# cap, 502 cloud error, 503 circuit open / offline / storage, 504 timeout; a handler that raised
# is a 500.
CONTRACT_STATUS = {
    ErrorCode.UNKNOWN_ACTION: 404,
    ErrorCode.INVALID_PARAMS: 422,
    ErrorCode.HANDLER_ERROR: 500,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.CLOUD_UNAVAILABLE: 502,
    ErrorCode.OFFLINE: 503,
    ErrorCode.COST_CAP_REACHED: 429,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.CIRCUIT_OPEN: 503,
    ErrorCode.UNAUTHORIZED: 401,
    # The serving side prices the call above the caller's Cost-Limit: not retried as is.
    ErrorCode.COST_LIMIT_EXCEEDED: 402,
    ErrorCode.CONFLICT: 409,  # the key is still running
    ErrorCode.INDETERMINATE: 409,  # the key's holder died mid-handler: it may have run
    ErrorCode.NOT_FOUND: 404,  # no such outbox item
    ErrorCode.STORAGE_UNAVAILABLE: 503,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
}
EXCEPTIONS: list[type[ActionError]] = [
    UnknownAction,
    InvalidParams,
    HandlerError,
    Unauthorized,
    CostCapReached,
    CircuitOpen,
    Offline,
    CloudUnavailable,
    CloudTimeout,
    StorageUnavailable,
    PayloadTooLarge,
]


def _envelope(**fields: Any) -> Envelope:
    base: dict[str, Any] = {"ok": True, "action": "dm.send", "source": Source.CLOUD}
    return Envelope(**{**base, **fields})


def test_every_error_code_has_a_status() -> None:
    assert set(HTTP_STATUS_BY_CODE) == set(ErrorCode)
    assert HTTP_STATUS_BY_CODE == CONTRACT_STATUS


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.value)
def test_a_failed_envelope_has_the_status_of_its_code(code: ErrorCode) -> None:
    assert _envelope(ok=False, error=code).http_status == CONTRACT_STATUS[code]


@pytest.mark.parametrize("exc_type", EXCEPTIONS, ids=lambda t: t.__name__)
def test_every_exception_maps_to_its_code_and_status(exc_type: type[ActionError]) -> None:
    exc = exc_type("what happened", attempts=2)
    envelope = Envelope.failure("dm.send", exc, source=Source.CLOUD, request_id="r1")
    assert envelope.error is exc_type.code
    assert envelope.http_status == exc_type.http_status == CONTRACT_STATUS[exc_type.code]
    body = envelope.to_dict()
    assert (body["ok"], body["error"], body["detail"]) == (False, exc_type.code.value, exc.detail)
    assert (body["attempts"], body["request_id"]) == (2, "r1")


@pytest.mark.parametrize(
    ("envelope", "status"),
    [
        (_envelope(), 200),
        (_envelope(source=Source.LOCAL_FALLBACK), 200),
        (_envelope(source=Source.CACHE, cached_at="2024-01-01T00:00:00Z"), 200),
        (_envelope(source=Source.OUTBOX, queued=True, outbox_id="o1"), 202),
        (_envelope(ok=False, source=Source.OUTBOX, queued=True, outbox_id="o1"), 202),
        (_envelope(ok=False, error=ErrorCode.OFFLINE, cached={"old": 1}), 503),
        (_envelope(ok=False), 500),  # a failure without a code is a server fault
    ],
    ids=["ok", "fallback", "cache", "queued", "queued-not-ok", "offline-stale", "no-code"],
)
def test_outcome_status(envelope: Envelope, status: int) -> None:
    assert envelope.http_status == status


def test_to_dict_has_the_design_fields() -> None:
    body = _envelope(result={"id": 7}, duration_ms=12.34567, attempts=1, request_id="abc").to_dict()
    assert body == {
        "ok": True,
        "action": "dm.send",
        "source": "cloud",
        "result": {"id": 7},
        "error": None,
        "detail": None,
        "duration_ms": 12.346,
        "request_id": "abc",
        "attempts": 1,
        "cost_usd": 0.0,
        "cost_guard_triggered": False,
    }


@pytest.mark.parametrize(
    ("fields", "extra"),
    [
        ({"cached_at": "2024-01-01T00:00:00Z"}, {"cached_at": "2024-01-01T00:00:00Z"}),
        ({"cached": {"old": True}}, {"cached": {"old": True}}),
        ({"cached": None}, {"cached": None}),  # set to null is still set
        ({"queued": True, "outbox_id": "ob-1"}, {"queued": True, "outbox_id": "ob-1"}),
        ({"outbox_id": "ob-1"}, {}),  # not queued: no outbox fields
    ],
)
def test_optional_fields_appear_only_when_set(
    fields: dict[str, Any], extra: dict[str, Any]
) -> None:
    body = _envelope(**fields).to_dict()
    optional = {"cached_at", "cached", "queued", "outbox_id"}
    assert {k: v for k, v in body.items() if k in optional} == extra


@pytest.mark.parametrize(
    ("cost", "json_text"),
    [
        (Decimal("0.01"), '"cost_usd": 0.01,'),
        (Decimal("0.002"), '"cost_usd": 0.002,'),
        (Decimal("0.0015"), '"cost_usd": 0.0015,'),
        (Decimal("0.1") + Decimal("0.2"), '"cost_usd": 0.3,'),
        (Decimal("0.01") * 3, '"cost_usd": 0.03,'),
        (Decimal(0), '"cost_usd": 0.0,'),
        (Decimal("400"), '"cost_usd": 400.0,'),
    ],
)
def test_cost_usd_is_serialised_exactly(cost: Decimal, json_text: str) -> None:
    text = json.dumps(_envelope(cost_usd=cost).to_dict())
    assert json_text in text
    assert Decimal(str(json.loads(text)["cost_usd"])) == cost


@pytest.mark.parametrize("source", list(Source), ids=lambda s: s.value)
def test_source_is_its_string(source: Source) -> None:
    assert _envelope(source=source).to_dict()["source"] == source.value


def test_the_body_is_json() -> None:
    envelope = _envelope(ok=False, error=ErrorCode.TIMEOUT, detail="30 s", cached={"a": [1]})
    assert json.loads(json.dumps(envelope.to_dict()))["error"] == "timeout"


def test_request_ids_are_fresh() -> None:
    assert new_request_id() != new_request_id()
    assert _envelope().request_id != _envelope().request_id


def test_request_ids_are_32_lowercase_hex_digits_and_pass_as_idempotency_keys() -> None:
    ids = {new_request_id() for _ in range(1_000)}
    assert len(ids) == 1_000
    assert all(re.fullmatch("[0-9a-f]{32}", rid) and check_idempotency_key(rid) for rid in ids)


def test_never_ran_defaults_per_exception() -> None:
    assert UnknownAction("x").never_ran and CircuitOpen("x").never_ran
    assert not HandlerError("x").never_ran
    assert not CloudUnavailable("5xx").never_ran
    assert CloudUnavailable("refused", never_ran=True).never_ran
    assert not CloudTimeout("read timeout").never_ran


def test_the_exception_tree() -> None:
    assert issubclass(RouteTableError, ConfigError)
    assert issubclass(RegistryError, ConfigError)
    assert issubclass(ConfigError, EverReachError)
    assert issubclass(CloudTimeout, CloudUnavailable)
    assert all(issubclass(t, ActionError) for t in EXCEPTIONS)
    assert issubclass(ActionError, EverReachError)
    # The docstring draws the tree; every public exception is in it.
    doc = errors.__doc__ or ""
    assert all(t.__name__ in doc for t in [*EXCEPTIONS, ConfigError, RegistryError])


def test_an_action_error_carries_its_fields() -> None:
    exc = UnknownAction("no handler", attempts=0, near=["dm.send"])
    assert (exc.detail, exc.attempts, exc.extra) == ("no handler", 0, {"near": ["dm.send"]})
    assert str(exc) == "no handler"


# -- immutable, with named constructors ----------------------------------------------------------


def test_an_envelope_cannot_be_changed_after_it_is_built() -> None:
    envelope = _envelope()
    with pytest.raises(dataclasses.FrozenInstanceError):
        envelope.source = Source.LOCAL  # type: ignore[misc]


@pytest.mark.parametrize(
    ("envelope", "outcome"),
    [
        (_envelope(), "ok"),
        (
            Envelope.queued_in_outbox("dm.send", outbox_id="o1", request_id="r", detail="d"),
            "queued",
        ),
        (Envelope.failure("dm.send", Offline("x"), source=None, request_id="r"), "offline"),
        (_envelope(ok=False), "error"),
    ],
)
def test_outcome_is_ok_queued_or_the_error_code(envelope: Envelope, outcome: str) -> None:
    assert envelope.outcome == outcome


def test_a_busy_key_is_a_409_conflict_envelope_of_the_usual_shape() -> None:
    busy = Envelope.conflict("dm.send", request_id="key-0001", detail="still running")
    assert busy.http_status == 409
    assert busy.to_dict() == {
        **_envelope(ok=False, source=None, request_id="key-0001").to_dict(),
        "error": "conflict",
        "detail": "still running",
    }


def test_a_body_too_large_is_a_413_envelope() -> None:
    refused = Envelope.too_large("too big")
    assert (refused.http_status, refused.error, refused.detail) == (
        413,
        ErrorCode.PAYLOAD_TOO_LARGE,
        "too big",
    )


def test_a_queued_envelope_is_202_from_the_outbox() -> None:
    queued = Envelope.queued_in_outbox("dm.send", outbox_id="o1", request_id="r", detail="later")
    body = queued.to_dict()
    assert queued.http_status == 202
    assert (body["source"], body["queued"], body["outbox_id"]) == ("outbox", True, "o1")


_RESULTS = [None, {"a": [1, 2.5, None, "é"]}, "\ud800 lone", [True, {"n": 10**30}]]


@pytest.mark.parametrize("result", _RESULTS, ids=["none", "nested", "surrogate", "bigint"])
@pytest.mark.parametrize("detail", [None, "plain", "\udfff lone"], ids=["no", "plain", "lone"])
def test_to_json_is_the_body_of_to_dict_with_or_without_the_registry_text(
    result: Any, detail: str | None
) -> None:
    text = json.dumps(result, allow_nan=False).encode("ascii")  # as ServiceRegistry.call
    for result_json in (None, text):
        envelope = Envelope.success(
            "system.echo",
            result,
            source=Source.LOCAL,
            request_id="r" * 32,
            detail=detail,
            result_json=result_json,
        )
        assert json.loads(envelope.to_json()) == envelope.to_dict()


@pytest.mark.parametrize("result", [float("nan"), {"x": float("-inf")}], ids=["nan", "inf"])
def test_to_json_never_writes_nan_or_infinity(result: Any) -> None:
    envelope = Envelope.success("system.echo", result, source=Source.LOCAL, request_id="r" * 32)
    body = envelope.to_json()
    assert b"NaN" not in body and b"Infinity" not in body
    assert json.loads(body)["result"] is None


@pytest.mark.process  # forks
def test_request_ids_stay_unique_across_threads_and_in_a_forked_child() -> None:
    import os
    import threading

    found: list[str] = []

    def take() -> None:
        found.extend(new_request_id() for _ in range(500))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(found)) == len(found) == 2_000
    new_request_id()  # the parent holds ids it has read but not handed out yet
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids, written back to the parent
        os.write(write, "".join(new_request_id() for _ in range(8)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    child = {text[i : i + 32] for i in range(0, len(text), 32)}
    parent = {new_request_id() for _ in range(64)}
    assert len(child) == 8 and not child & parent
