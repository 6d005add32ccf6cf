"""params_digest: equal data gives an equal digest, different data a different one."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from types import MappingProxyType

import pytest

from params_digest import canonical_json, params_hash


def test_canonical_json_sorts_keys_at_every_depth_and_has_no_spaces() -> None:
    text = canonical_json({"b": 1, "a": {"z": [1, 2], "y": None}})
    assert text == '{"a":{"y":null,"z":[1,2]},"b":1}'


def test_canonical_json_keeps_non_ascii_text_as_is() -> None:
    assert canonical_json({"name": "Zoë 🚀"}) == '{"name":"Zoë 🚀"}'


def test_key_order_does_not_change_the_digest() -> None:
    first = {"a": 1, "b": {"c": 2, "d": 3}}
    second = OrderedDict([("b", OrderedDict([("d", 3), ("c", 2)])), ("a", 1)])
    assert params_hash(first) == params_hash(second)


def test_any_mapping_hashes_like_the_equal_dict() -> None:
    assert params_hash(MappingProxyType({"x": 1})) == params_hash({"x": 1})


@pytest.mark.parametrize(
    "other",
    [
        {"a": 2},  # another value
        {"a": "1"},  # same text, another type
        {"a": [1]},  # wrapped in a list
        {"A": 1},  # keys are case sensitive
        {"a": 1, "b": None},  # an extra null is not the same as absent
        {},
    ],
)
def test_different_params_give_a_different_digest(other: dict[str, object]) -> None:
    assert params_hash({"a": 1}) != params_hash(other)


def test_digest_is_the_sha256_hex_of_the_canonical_utf8_text() -> None:
    params = {"text": "é", "n": 1.5}
    expected = hashlib.sha256('{"n":1.5,"text":"é"}'.encode()).hexdigest()
    assert params_hash(params) == expected
    assert len(expected) == 64


def test_list_order_matters() -> None:
    assert params_hash({"ids": [1, 2]}) != params_hash({"ids": [2, 1]})


def test_non_json_params_are_refused() -> None:
    with pytest.raises(TypeError):
        params_hash({"when": object()})


def test_canonical_json_round_trips() -> None:
    value = {"z": [1, {"b": True, "a": None}], "a": "x"}
    assert json.loads(canonical_json(value)) == value
