"""``fast_init(cls)``: a frozen slots dataclass built at the cost of a plain one.

A frozen dataclass's generated ``__init__`` sets each field with ``object.__setattr__`` (the
class's own ``__setattr__`` refuses): a global lookup, an attribute lookup and a generic
``setattr`` per field, about three times a plain dataclass's ``__init__`` (timeit, 10 fields:
2.9 against 0.5 µs on the benchmark machine). ``/dispatch`` builds several such objects per call
(the route state, the plan, the envelope, the dispatch record). ``fast_init`` gives the class an
``__init__`` with the same signature, defaults and default factories that sets each slot through
its own descriptor, looked up once (1.0 µs for the same 10 fields). Everything else is the
dataclass's: equality, hashing, ``repr``, ``dataclasses.replace`` and ``fields``, and assigning
to a field afterwards still raises ``FrozenInstanceError``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def fast_init(cls: type[T]) -> type[T]:
    """Replace the ``__init__`` of ``cls``, a frozen dataclass with slots (see the module)."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"fast_init needs a frozen dataclass with slots; {cls.__name__} is not")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"fast_init does not run __post_init__; {cls.__name__} has one")
    namespace: dict[str, Any] = {"_FACTORY": _FACTORY}
    arguments: list[str] = []
    body: list[str] = []
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = field.name
        if not field.init or field.kw_only:
            raise TypeError(f"fast_init: {cls.__name__}.{name} is not a plain init field")
        namespace[f"_set_{name}"] = cls.__dict__[name].__set__  # the slot's member descriptor
        value = name
        if field.default is not dataclasses.MISSING:
            namespace[f"_default_{name}"] = field.default
            arguments.append(f"{name}=_default_{name}")
        elif field.default_factory is not dataclasses.MISSING:
            namespace[f"_factory_{name}"] = field.default_factory
            arguments.append(f"{name}=_FACTORY")
            value = f"_factory_{name}() if {name} is _FACTORY else {name}"
        else:
            arguments.append(name)
        body.append(f"    _set_{name}(self, {value})")
    source = f"def __init__(self, {', '.join(arguments)}):\n" + "\n".join(body or ["    pass"])
    exec(source, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__doc__ = cls.__init__.__doc__  # type: ignore[misc]
    init.__annotations__ = dict(cls.__init__.__annotations__)  # type: ignore[misc]
    cls.__init__ = init  # type: ignore[misc,method-assign]
    return cls


class _Factory:
    """The default of a field with a ``default_factory``: call the factory."""

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY: Any = _Factory()
