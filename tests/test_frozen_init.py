"""Tests of frozen_init.py: the fast ``__init__`` builds what the dataclass's own would."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest

from dispatch_record import DispatchRecord
from envelope import Envelope
from errors import Env, Source
from frozen_init import fast_init
from route_plan import Plan, RouteState, Step

_counter = itertools.count()


def _next() -> int:
    return next(_counter)


def _pair() -> tuple[type[Any], type[Any]]:
    """The same frozen slots dataclass twice: with its own ``__init__`` and with ``fast_init``."""

    def make() -> type[Any]:
        @dataclasses.dataclass(frozen=True, slots=True)
        class Sample:
            a: int
            b: str = "b"
            c: list[int] = dataclasses.field(default_factory=list)
            d: int = dataclasses.field(default_factory=_next, compare=False)

        return Sample

    return make(), fast_init(make())


def test_the_fast_init_builds_what_the_dataclass_init_builds() -> None:
    plain, fast = _pair()
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((1,), {}),
        ((1, "x"), {}),
        ((), {"a": 2, "c": [3]}),
        ((4, "y", [5], 6), {}),
    ]
    for args, kwargs in calls:
        expected, got = plain(*args, **kwargs), fast(*args, **kwargs)
        assert dataclasses.astuple(got)[:3] == dataclasses.astuple(expected)[:3]
        assert repr(got).split(", d=")[0] == repr(expected).split(", d=")[0]
    assert fast(1).c is not fast(1).c  # a factory runs per instance
    assert fast(1).d != fast(1).d
    assert fast(1, d=7).d == 7


def test_the_fast_init_refuses_what_the_dataclass_init_refuses() -> None:
    _, fast = _pair()
    with pytest.raises(TypeError):
        fast()  # a is required
    with pytest.raises(TypeError):
        fast(1, e=2)  # no such field
    instance = fast(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        instance.a = 2
    assert dataclasses.replace(instance, b="z") == fast(1, "z", d=instance.d)


def test_fast_init_takes_only_a_frozen_slots_dataclass() -> None:
    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclasses.dataclass(slots=True)
    class NotFrozen:
        a: int

    for cls in (NoSlots, NotFrozen, int):
        with pytest.raises(TypeError, match="frozen dataclass with slots"):
            fast_init(cls)


@pytest.mark.parametrize("cls", [Envelope, DispatchRecord, RouteState, Plan, Step])
def test_the_project_classes_keep_their_signature(cls: type[Any]) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    assert list(cls.__init__.__code__.co_varnames[1 : len(names) + 1]) == names


def test_an_envelope_gets_a_fresh_request_id_by_default() -> None:
    one = Envelope(ok=True, action="system.echo", source=Source.LOCAL, env=Env.LOCAL)
    two = Envelope(ok=True, action="system.echo", source=Source.LOCAL)
    assert len(one.request_id) == 32 and one.request_id != two.request_id
    assert one.to_dict() == {**two.to_dict(), "request_id": one.request_id}
