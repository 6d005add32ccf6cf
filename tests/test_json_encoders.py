"""Tests of json_encoders.py: an encoder built once writes what json.dumps writes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from json_encoders import c_encoder

_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@pytest.mark.parametrize("ensure_ascii", [True, False])
@given(value=_VALUES)
def test_it_writes_what_json_dumps_writes(ensure_ascii: bool, value: Any) -> None:
    encode = c_encoder(ensure_ascii=ensure_ascii, allow_nan=True, default=str)
    assert encode is not None
    assert encode(value) == json.dumps(value, ensure_ascii=ensure_ascii, default=str)


def test_nan_is_refused_unless_allowed_and_default_handles_the_rest() -> None:
    strict = c_encoder(ensure_ascii=True, allow_nan=False, default=json.JSONEncoder().default)
    assert strict is not None
    with pytest.raises(ValueError, match="not JSON compliant"):
        strict({"x": float("nan")})
    with pytest.raises(TypeError, match="not JSON serializable"):
        strict(object())
    lenient = c_encoder(ensure_ascii=False, allow_nan=True, default=str)
    assert lenient is not None
    assert lenient([float("nan"), "é"]) == '[NaN, "é"]'


def test_a_value_that_contains_itself_hits_the_recursion_limit() -> None:
    encode = c_encoder(ensure_ascii=True, allow_nan=False, default=str)
    assert encode is not None
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(RecursionError):
        encode(cyclic)
