"""The action registry: who handles ``service.topic``, and the call into that handler.

Users plug their services in with the ``register`` decorator in a module named in
``EVERREACH_SERVICES``::

    from service_registry import register

    @register("content.analyze_video")
    async def analyze_video(params: dict) -> dict: ...

A handler that acts on another platform (a DM, a post) can ask for the idempotency key of the
call it serves with ``current_idempotency_key()``: the same key comes back when the call is
replayed, so the handler can ask its platform whether it already acted (or pass the key on to
a platform that dedupes by it) before acting again.

Decorating only declares the handler. ``ServiceRegistry.from_modules()`` imports the named
modules at start-up and builds the registry one server uses; a module that fails to import or
an action declared twice stops start-up with a ``RegistryError``.
"""

from __future__ import annotations

import asyncio
import contextvars
import difflib
import importlib
import inspect
import json
import platform
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from errors import HandlerError, InvalidParams, RegistryError, UnknownAction
from json_encoders import c_encoder

Handler = Callable[[dict[str, Any]], Awaitable[Any] | Any]

# \Z, not $: "$" also matches before a trailing newline, which would let "dm.send\n" through.
ACTION_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}\.[a-z][a-z0-9_]{0,63}\Z")

SELF_TEST_CHECK_TIMEOUT_S = 5.0

# Built once: json.dumps with keyword arguments builds a new encoder on every call (0.8 µs).
# allow_nan=False: NaN and Infinity are not JSON, and no answer may carry them.
_PARAMS_ENCODER = json.JSONEncoder(allow_nan=False, ensure_ascii=False)
_RESULT_ENCODER = json.JSONEncoder(allow_nan=False)  # ASCII out: no lone surrogate can break it
# What _RESULT_ENCODER.encode runs, built once instead of per call (3.6 -> 1.8 µs for a small
# result, timeit); a cyclic result then fails on the recursion limit, still a handler_error.
_RESULT_C_ENCODER = c_encoder(ensure_ascii=True, allow_nan=False, default=_RESULT_ENCODER.default)

# Filled by @register while services modules are imported; read by from_modules().
_DECLARED: dict[str, Handler] = {}

_IDEMPOTENCY_KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "everreach_idempotency_key", default=None
)


def current_idempotency_key() -> str | None:
    """The idempotency key of the call the running handler serves (None outside a call).

    It stays the same across retries and outbox replays of one request, so a handler can use
    it to ask its platform whether it already acted.
    """
    return _IDEMPOTENCY_KEY.get()


def idempotency_key_scope(key: str) -> _KeyScope:
    """Make ``key`` the ``current_idempotency_key()`` of handlers run inside this block."""
    return _KeyScope(key)


class _KeyScope:
    # A class, not @contextlib.contextmanager: its generator cost ~1.5 µs per routed call.
    __slots__ = ("key", "token")

    def __init__(self, key: str) -> None:
        self.key = key

    def __enter__(self) -> None:
        self.token = _IDEMPOTENCY_KEY.set(self.key)

    def __exit__(self, *exc_info: object) -> None:
        _IDEMPOTENCY_KEY.reset(self.token)


def check_action_name(action: object) -> str:
    """Return ``action`` if it is a ``service.topic`` name, else raise ``InvalidParams``."""
    # Names that passed are kept (a /dispatch checks its name twice, and the same few names
    # come again and again): a set lookup instead of the regex, ~0.3 µs each.
    if type(action) is str and action in _GOOD_NAMES:
        return action
    if not isinstance(action, str) or not ACTION_RE.match(action):
        raise InvalidParams(
            f"action must be 'service.topic' in lower case letters, digits and '_' "
            f"(e.g. 'research.keyword'); got {str(action)[:80]!r}"
        )
    if type(action) is str and len(_GOOD_NAMES) < _MAX_GOOD_NAMES:  # not a subclass's own ==
        _GOOD_NAMES.add(action)
    return action


_GOOD_NAMES: set[str] = set()
_MAX_GOOD_NAMES = 4096


def _check_params(action: str, params: Any) -> None:
    """Refuse params that are not JSON before the handler runs: that is the caller's fault.

    A handler that echoed NaN or a lone surrogate would fail to encode its answer and count as a
    handler failure, so three bad requests would open the action's circuit for everyone.
    """
    try:
        _PARAMS_ENCODER.encode(params).encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvalidParams(
            f"params of {action} are not JSON (NaN, Infinity or a lone surrogate?): "
            f"{type(exc).__name__}"
        ) from None


def register(action: str) -> Callable[[Handler], Handler]:
    """Declare ``func`` as the handler of ``action``; declaring an action twice is an error."""
    check_action_name(action)

    def decorator(func: Handler) -> Handler:
        known = _DECLARED.get(action)
        if known is not None and _qualname(known) != _qualname(func):
            raise RegistryError(
                f"action {action!r} is registered twice: by {_qualname(known)} and by "
                f"{_qualname(func)}; the registry is the one source of topics, keep one"
            )
        _DECLARED[action] = func
        return func

    return decorator


def _put_first_on_path(directory: Path) -> None:
    entry = str(directory.resolve())
    if entry not in sys.path:
        sys.path.insert(0, entry)


def _is_parent_or_self(missing: str, name: str) -> bool:
    return name == missing or name.startswith(missing + ".")


def _import_failed(name: str, exc: Exception) -> RegistryError:
    return RegistryError(
        f"EVERREACH_SERVICES: module {name!r} failed to import: {type(exc).__name__}: {exc}"
    )


def _not_found_message(name: str) -> str:
    searched = [entry or "." for entry in sys.path if not entry or Path(entry).is_dir()]
    file_name = name.replace(".", "/") + ".py"
    return (
        f"EVERREACH_SERVICES: module {name!r} failed to import: no module named {name!r}; "
        f"looked for {file_name} (or a package "
        f"{name.replace('.', '/')}/) in: {', '.join(searched)}. Fix: start the server from the "
        f"directory that holds {file_name}, or add that directory to PYTHONPATH"
    )


def _qualname(func: Handler) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"


async def _heartbeat(params: dict[str, Any]) -> dict[str, Any]:
    return {"alive": True, "ts": time.time(), "host": platform.node()}


async def _echo(params: dict[str, Any]) -> dict[str, Any]:
    return params


class Ran(NamedTuple):
    """A handler's result and its JSON text, encoded once: the check and the answer's bytes."""

    value: Any
    json: bytes


class ServiceRegistry:
    """A set of action handlers and the one way to call them."""

    def __init__(self, handlers: Mapping[str, Handler] | None = None, *, builtins: bool = True):
        self._handlers: dict[str, Handler] = {}
        self._is_async: dict[str, bool] = {}
        self._checks: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {}
        if builtins:
            self.add("system.heartbeat", _heartbeat)
            self.add("system.echo", _echo)
            self.add("system.self_test", self._self_test)
        for action, handler in (handlers or {}).items():
            self.add(action, handler)

    @classmethod
    def from_modules(
        cls, names: Iterable[str], *, app_dir: str | Path | None = None
    ) -> ServiceRegistry:
        """Import the services modules and build a registry of the built-ins and their handlers.

        ``app_dir`` (default: the current directory) goes first on ``sys.path``, as uvicorn's
        ``--app-dir`` does, so ``my_services.py`` next to where the server starts imports without
        ``PYTHONPATH`` even when the server runs from a console script.
        """
        names = list(names)
        if names:
            _put_first_on_path(Path(app_dir) if app_dir is not None else Path.cwd())
        for name in names:
            try:
                importlib.import_module(name)
            except RegistryError:
                raise
            except ModuleNotFoundError as exc:
                if exc.name is None or not _is_parent_or_self(exc.name, name):
                    raise _import_failed(name, exc) from exc
                raise RegistryError(_not_found_message(name)) from exc
            except Exception as exc:
                raise _import_failed(name, exc) from exc
        registry = cls()
        for action, handler in sorted(_DECLARED.items()):
            module = getattr(handler, "__module__", "")
            if any(module == name or module.startswith(name + ".") for name in names):
                registry.add(action, handler)
        return registry

    def add(self, action: str, handler: Handler, *, replace: bool = False) -> None:
        """Add a handler; an action already present is a ``RegistryError`` unless ``replace``."""
        check_action_name(action)
        if action in self._handlers and not replace:
            raise RegistryError(
                f"action {action!r} is registered twice: by {_qualname(self._handlers[action])} "
                f"and by {_qualname(handler)}"
            )
        self._handlers[action] = handler
        self._is_async[action] = inspect.iscoroutinefunction(handler)

    def add_check(self, name: str, check: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        """Add a component check that ``system.self_test`` runs and reports."""
        self._checks[name] = check

    def has(self, action: str) -> bool:
        return action in self._handlers

    def actions(self) -> list[str]:
        return sorted(self._handlers)

    def near(self, action: str) -> list[str]:
        """Registered actions whose names are close to ``action`` (for error messages)."""
        return difflib.get_close_matches(action, self._handlers, n=5, cutoff=0.5)

    async def dispatch(self, action: str, params: dict[str, Any]) -> Any:
        """Run ``action``'s handler with ``params``; return its JSON-serialisable result."""
        return (await self.call(action, params)).value

    async def call(self, action: str, params: dict[str, Any], *, json_params: bool = False) -> Ran:
        """Run ``action``'s handler: its result and that result's JSON text, encoded once.

        The result is encoded here, once: a value that is not JSON is the handler's failure
        (``handler_error``, counted by its breaker), and the text becomes the answer's
        ``result`` as it is (``Envelope.to_json``), never encoded a second time.
        ``json_params``: the params were read by the strict parser (``request_body``), which
        refuses all that the params check would: it is not run again.
        """
        handler = self._handlers.get(action)
        if handler is None:
            check_action_name(action)  # a malformed name is invalid_params, not unknown_action
            near = self.near(action)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise UnknownAction(f"no handler is registered for {action!r}{hint}", near=near)
        if not json_params:
            _check_params(action, params)
        try:
            if self._is_async[action]:
                result = await handler(params)
            else:
                result = await asyncio.to_thread(handler, params)
                if inspect.isawaitable(result):
                    result = await result
        except asyncio.CancelledError:
            raise
        except InvalidParams:
            raise  # a handler that rejects its params answers 422, not handler_error
        except Exception as exc:
            raise HandlerError(f"{action} raised {type(exc).__name__}: {exc}") from exc
        try:
            text = (
                _RESULT_ENCODER.encode(result)
                if _RESULT_C_ENCODER is None
                else _RESULT_C_ENCODER(result)
            )
        except (TypeError, ValueError, RecursionError) as exc:
            raise HandlerError(
                f"{action} returned a value that is not JSON-serialisable "
                f"({type(result).__name__}): {exc}"
            ) from exc
        return Ran(result, text.encode("ascii"))

    async def _self_test(self, params: dict[str, Any]) -> dict[str, Any]:
        report: dict[str, Any] = {"registry": {"ok": True, "actions": len(self._handlers)}}
        for name, check in self._checks.items():
            try:
                report[name] = await asyncio.wait_for(check(), SELF_TEST_CHECK_TIMEOUT_S)
            except TimeoutError:
                report[name] = {"ok": False, "error": f"no answer in {SELF_TEST_CHECK_TIMEOUT_S} s"}
            except Exception as exc:
                report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        report["ok"] = all(
            part.get("ok", False) for part in report.values() if isinstance(part, dict)
        )
        return report


def _default_registry() -> ServiceRegistry:
    return ServiceRegistry({a: h for a, h in _DECLARED.items() if not a.startswith("system.")})


async def dispatch(action: str, params: dict[str, Any]) -> Any:
    """Dispatch on the registry of every declared handler (for scripts; servers build their own)."""
    return await _default_registry().dispatch(action, params)


def actions() -> list[str]:
    """Actions of the default registry."""
    return _default_registry().actions()
