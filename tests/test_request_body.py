"""request_body: strict JSON, the body models, and hostile bodies against the in-process app.

Every hostile body gets a 4xx envelope (never a 5xx), and bad input never opens a circuit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from errors import InvalidParams, UnsupportedMediaType
from request_body import (
    DispatchBody,
    _parse_strictly,
    check_content_type,
    nested_deeper_than,
    parse_json,
    read_body,
)

KEY = "cloud-key-for-tests"
DEEP = b"[" * 1000 + b"]" * 1000


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _height(value: Any) -> int:
    """How deep ``value`` nests arrays and objects, walked in Python: the reference."""
    if isinstance(value, dict):
        return 1 + max(map(_height, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_height, value), default=0)
    return 0


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ ab,:'),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=40,
)


@given(_JSON, st.integers(min_value=0, max_value=12))
def test_nested_deeper_than_agrees_with_walking_the_value(value: Any, limit: int) -> None:
    # Strings full of brackets and escaped quotes do not count; only the containers do.
    assert nested_deeper_than(json.dumps(value), limit) == (_height(value) > limit)


def test_nested_deeper_than_is_exact_at_the_limit() -> None:
    assert not nested_deeper_than(json.dumps(_nested(64)), 64)
    assert nested_deeper_than(json.dumps(_nested(65)), 64)
    assert not nested_deeper_than(json.dumps([[1, {"a": [2]}], {"b": {}}]), 4)
    assert nested_deeper_than(json.dumps([[1, {"a": [2]}], {"b": {}}]), 3)


# -- parse_json: pure table ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b'{"x": NaN}', "not a JSON number"),
        (b'{"x": Infinity}', "not a JSON number"),
        (b'{"x": -Infinity}', "not a JSON number"),
        (b'{"x": 1e999}', "out of range"),
        (b'{"x": -1e999}', "out of range"),
        (b'{"x": ' + b"9" * 5000 + b"}", "5000 digits"),
        (b'{"x": ' + DEEP + b"}", "nested deeper than 64"),
        (b"[" * 65 + b"]" * 65, "nested deeper than 64"),
        (b'{"s": "' + b"[" * 100 + b'", "x": ' + b"[" * 65 + b"]" * 65 + b"}", "deeper than 64"),
        (b'\xef\xbb\xbf{"x": 1}', "Unexpected UTF-8 BOM"),
        (b'{"x": "\\ud800"}', "lone UTF-16 surrogate"),
        (b'{"\\udfff": 1}', "lone UTF-16 surrogate"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"{broken", "not valid JSON"),
        # An unclosed string of escaped quotes: refused by the parser before any scan of it.
        (b'{"a": "' + b'\\"' * 400_000, "Unterminated string"),
    ],
)
def test_parse_json_refuses_what_rfc_8259_or_utf_8_does_not_allow(raw: bytes, why: str) -> None:
    with pytest.raises(InvalidParams) as refused:
        parse_json(raw)
    assert why in refused.value.detail


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b'{"x": 1.5, "y": -2, "z": "\\ud83d\\ude00"}', {"x": 1.5, "y": -2, "z": "\U0001f600"}),
        (b'{"s": "[[[[{{{{"}', {"s": "[[[[{{{{"}),  # brackets in strings are not nesting
        (b'{"s": "' + b"{" * 100 + b'"}', {"s": "{" * 100}),  # more than 64, all in a string
        (b'"\\\\"', "\\"),
        (b"[" * 64 + b"]" * 64, _nested(64)),
        (b"", None),
    ],
)
def test_parse_json_reads_valid_json(raw: bytes, value: Any) -> None:
    assert parse_json(raw) == value


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "application/json",
        "application/json; charset=utf-8",
        "application/x-www-form-urlencoded",
        "application/merge-patch+json",
    ],
)
def test_json_and_curls_default_content_types_are_read(content_type: str | None) -> None:
    check_content_type(content_type)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "text/plain;charset=UTF-8", "multipart/form-data; boundary=x"]
)
def test_content_types_a_cross_site_form_can_send_are_refused(content_type: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        check_content_type(content_type)


def test_an_unknown_field_is_named_with_the_allowed_ones() -> None:
    with pytest.raises(InvalidParams) as refused:
        read_body(b'{"action": "system.echo", "parms": {"a": 1}}', None, DispatchBody)
    detail = refused.value.detail
    assert "'parms'" in detail
    assert "action, params, force_env, idempotency_key" in detail


def test_the_action_name_is_checked_before_the_other_fields() -> None:
    with pytest.raises(InvalidParams) as refused:
        read_body(b'{"action": "Bad Name", "parms": 1, "params": []}', None, DispatchBody)
    assert "service.topic" in refused.value.detail and "parms" not in refused.value.detail


# -- hostile bodies against the app -------------------------------------------------------------


@pytest.fixture
def client(app_client: Callable[..., TestClient]) -> TestClient:
    return app_client(EVERREACH_CLOUD_KEY=KEY)


@pytest.fixture(scope="module")
def shared_client(module_app_client: Callable[..., TestClient]) -> TestClient:
    """One app for the hostile bodies: each is refused before it runs, so none leaves state."""
    return module_app_client(EVERREACH_CLOUD_KEY=KEY)


def _echo(extra: str) -> bytes:
    return b'{"action": "system.echo", ' + extra.encode() + b"}"


HOSTILE: list[tuple[str, str, bytes]] = [
    ("/dispatch", "nan", _echo('"params": {"x": NaN}')),
    ("/dispatch", "infinity", _echo('"params": {"x": Infinity}')),
    ("/dispatch", "minus-infinity", _echo('"params": {"x": -Infinity}')),
    ("/dispatch", "1e999", _echo('"params": {"x": 1e999}')),
    ("/dispatch", "huge-int", _echo('"params": {"x": ' + "1" * 5000 + "}")),
    ("/dispatch", "deep", _echo('"params": {"x": ' + "[" * 2000 + "]" * 2000 + "}")),
    ("/dispatch", "surrogate-in-params", _echo('"params": {"x": "\\ud800"}')),
    ("/dispatch", "surrogate-in-action", b'{"action": "system.\\ud800"}'),
    ("/dispatch", "surrogate-action-only", b'{"action": "\\udc80"}'),
    ("/dispatch", "surrogate-in-key", _echo('"\\udc00": 1')),
    ("/dispatch", "not-utf8", b'{"action": "system.echo", "params": {"x": "\xff"}}'),
    ("/dispatch", "array", b"[1, 2]"),
    ("/dispatch", "null", b"null"),
    ("/dispatch", "empty", b""),
    ("/dispatch", "action-number", b'{"action": 7}'),
    ("/dispatch", "action-missing", b'{"params": {}}'),
    ("/dispatch", "action-newline", b'{"action": "system.echo\\n"}'),
    ("/dispatch", "params-list", _echo('"params": [1]')),
    ("/dispatch", "typo", _echo('"parms": {"a": 1}')),
    ("/dispatch", "force-env", _echo('"force_env": "mars"')),
    ("/dispatch", "force-cloud-without-a-cloud", _echo('"force_env": "cloud"')),
    ("/dispatch", "key-crlf", _echo('"idempotency_key": "key-0001\\r\\nX-Evil: 1"')),
    ("/dispatch", "key-nul", _echo('"idempotency_key": "key-0001\\u0000"')),
    ("/dispatch", "key-non-ascii", _echo('"idempotency_key": "cl\\u00e9-00000001"')),
    ("/dispatch", "key-space", _echo('"idempotency_key": "key with space"')),
    ("/dispatch", "key-short", _echo('"idempotency_key": "1234567"')),
    ("/dispatch", "key-long", _echo('"idempotency_key": "' + "k" * 201 + '"')),
    ("/dispatch", "key-number", _echo('"idempotency_key": 12345678')),
    ("/batch", "items-missing", b"{}"),
    ("/batch", "items-object", b'{"items": {}}'),
    ("/batch", "max-concurrent-string", b'{"items": [], "max_concurrent": "3"}'),
    ("/batch", "max-concurrent-bool", b'{"items": [], "max_concurrent": true}'),
    ("/batch", "max-concurrent-zero", b'{"items": [], "max_concurrent": 0}'),
    ("/batch", "batch-typo", b'{"items": [], "max_concurent": 2}'),
    ("/batch", "batch-nan", b'{"items": [{"action": "system.echo", "params": {"x": NaN}}]}'),
    ("/api/services/system/echo", "serve-nan", b'{"params": {"x": NaN}}'),
    ("/api/services/system/echo", "serve-typo", b'{"params": {}, "extra": 1}'),
    ("/api/services/system/echo", "serve-surrogate", b'{"params": {"x": "\\ud800"}}'),
    ("/api/services/System/echo", "serve-bad-action", b'{"params": {}}'),
]


@pytest.mark.parametrize(
    ("path", "body"), [(p, b) for p, _, b in HOSTILE], ids=[n for _, n, _ in HOSTILE]
)
def test_a_hostile_body_gets_a_4xx_envelope_never_a_5xx(
    shared_client: TestClient, path: str, body: bytes
) -> None:
    answer = shared_client.post(
        path,
        content=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    assert 400 <= answer.status_code < 500, answer.text
    envelope = answer.json()
    assert envelope["ok"] is False and envelope["error"] == "invalid_params"
    assert envelope["detail"]


def test_an_unknown_field_is_a_422_that_names_it(client: TestClient) -> None:
    answer = client.post("/dispatch", json={"action": "system.echo", "parms": {"a": 1}})
    assert answer.status_code == 422
    assert "'parms'" in answer.json()["detail"] and "params" in answer.json()["detail"]


def test_a_valid_idempotency_key_header_is_served_and_an_invalid_one_refused(
    client: TestClient,
) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    good = client.post(
        "/api/services/system/echo",
        json={"params": {}},
        headers={**auth, "Idempotency-Key": "k!~0000001"},
    )
    assert good.status_code == 200
    for key in (b"caf\xc3\xa9-00000", b"short", b"k" * 201, b"with space 0001"):
        answer = client.post(
            "/api/services/system/echo",
            json={"params": {}},
            headers=[(b"authorization", f"Bearer {KEY}".encode()), (b"idempotency-key", key)],
        )
        assert answer.status_code == 422, key
        assert "visible ASCII" in answer.json()["detail"]


def test_text_plain_is_refused_and_curls_form_type_is_read(client: TestClient) -> None:
    body = b'{"action": "system.echo", "params": {"hi": 1}}'
    plain = client.post("/dispatch", content=body, headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415 and plain.json()["error"] == "invalid_params"
    curl = client.post(
        "/dispatch", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert curl.status_code == 200 and curl.json()["result"] == {"hi": 1}


def test_three_nan_requests_do_not_open_the_echo_circuit(client: TestClient) -> None:
    for _ in range(3):
        answer = client.post("/dispatch", content=_echo('"params": {"x": NaN}'))
        assert answer.status_code == 422
    assert (
        client.post("/dispatch", json={"action": "system.echo", "params": {"a": 1}}).status_code
        == 200
    )
    assert client.get("/status").json()["circuits"]["local"] == {}


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
_NUMBER_TEXT = st.from_regex(r"\A-?(0|[1-9][0-9]{0,25})(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,3})?\Z")


def _read(raw: bytes, parse: Callable[[bytes], Any]) -> tuple[Any, ...]:
    try:
        value = parse(raw)
    except InvalidParams:
        return "refused", None
    return "read", json.dumps(value, sort_keys=True, default=repr), _types(value)


def _types(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _types(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_types(item) for item in value]
    return type(value).__name__


@given(
    st.one_of(
        _JSON_VALUES.map(lambda v: json.dumps(v).encode()),
        _JSON_VALUES.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "replace")),
        _NUMBER_TEXT.map(str.encode),
        st.binary(max_size=40),
        st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
    )
)
def test_the_fast_parse_reads_what_the_strict_decoder_reads(raw: bytes) -> None:
    strictly = _read(raw, _parse_strictly) if raw else ("read", "null", "NoneType")
    assert _read(raw, parse_json) == strictly


@pytest.mark.parametrize(
    "raw", [b"123456789012345678901234567890", b"-9223372036854775809", b"[18446744073709551616]"]
)
def test_an_integer_past_64_bits_stays_exact(raw: bytes) -> None:
    assert parse_json(raw) == json.loads(raw)
    assert "float" not in str(_types(parse_json(raw)))
