"""Load and look up ``route_table.json``: where each action prefers to run and how it fails.

Format::

    {"version": 1,
     "unknown": {"preferred_env": "auto", "fallback_env": "local", "side_effect": true},
     "actions": {
        "dm.send": {"preferred_env": "cloud", "fallback_env": "local", "side_effect": true},
        "linkedin.*": {...}}}

Every entry needs all three fields; ``note`` and ``idempotent`` are optional. ``idempotent``
(default false) says running the action twice does no harm: a call whose process died
mid-handler may then be re-run instead of being parked for a person as "may have run".

An exact entry wins over a ``service.*`` family entry; an action in neither gets ``unknown``.
A malformed table raises ``RouteTableError`` naming the file, the entry and the reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from errors import RouteTableError

DEFAULT_PATH = Path(__file__).resolve().parent / "route_table.json"
_ENTRY_RE = re.compile(r"^[a-z][a-z0-9_]*\.([a-z][a-z0-9_]*|\*)\Z")


class Preferred(StrEnum):
    LOCAL = "local"
    CLOUD = "cloud"
    AUTO = "auto"


class Fallback(StrEnum):
    LOCAL = "local"
    CLOUD = "cloud"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Route:
    """How one action is routed."""

    preferred_env: Preferred
    fallback_env: Fallback
    side_effect: bool
    known: bool = True
    # Not part of a route's identity (where it runs, how it falls back): only whether a call
    # whose process died mid-handler may be run again.
    idempotent: bool = field(default=False, compare=False)


class RouteTable:
    """Exact and family entries of the route table, with a memo of looked-up actions."""

    def __init__(self, routes: dict[str, Route], unknown: Route, *, source: str = "<memory>"):
        self._exact = {k: v for k, v in routes.items() if not k.endswith(".*")}
        self._family = {k[:-2]: v for k, v in routes.items() if k.endswith(".*")}
        self._unknown = unknown
        self._memo: dict[str, Route] = {}
        self.source = source

    @classmethod
    def load(cls, path: Path | None = None) -> RouteTable:
        """Read and validate a route table file (the bundled one when ``path`` is None)."""
        path = path or DEFAULT_PATH
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RouteTableError(
                f"{path}: route table not found; set ROUTE_TABLE_PATH to an existing file "
                f"or unset it to use the bundled table"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RouteTableError(f"{path}: not readable JSON: {exc}") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, *, source: str = "<memory>") -> RouteTable:
        if not isinstance(raw, dict) or not isinstance(raw.get("actions"), dict):
            raise RouteTableError(f"{source}: must be an object with an 'actions' object")
        routes = {}
        for name, entry in raw["actions"].items():
            if not isinstance(name, str) or not _ENTRY_RE.match(name):
                raise RouteTableError(
                    f"{source}: entry {name!r}: name must be 'service.topic' or 'service.*'"
                )
            routes[name] = _parse_entry(source, name, entry)
        default = {"preferred_env": "auto", "fallback_env": "local", "side_effect": True}
        parsed = _parse_entry(source, "unknown", raw.get("unknown", default))
        unknown = Route(
            parsed.preferred_env,
            parsed.fallback_env,
            parsed.side_effect,
            known=False,
            idempotent=parsed.idempotent,
        )
        return cls(routes, unknown, source=source)

    def get(self, action: str) -> Route:
        """Return the route of ``action`` (exact entry, else family, else the unknown default)."""
        route = self._memo.get(action)
        if route is None:
            route = self._exact.get(action)
            if route is None:
                service, dot, _ = action.partition(".")
                route = self._family.get(service, self._unknown) if dot else self._unknown
            if len(self._memo) < 10_000:
                self._memo[action] = route
        return route

    def names(self) -> list[str]:
        """Every entry name, families as ``service.*``."""
        return sorted([*self._exact, *(f"{f}.*" for f in self._family)])

    def is_known(self, action: str) -> bool:
        service, dot, _ = action.partition(".")
        return action in self._exact or (bool(dot) and service in self._family)

    def rows(self) -> list[dict[str, Any]]:
        """Table rows for docs and ``everreach routes``."""
        rows = []
        for name in self.names():
            route = self._family[name[:-2]] if name.endswith(".*") else self._exact[name]
            rows.append(
                {
                    "action": name,
                    "preferred_env": route.preferred_env.value,
                    "fallback_env": route.fallback_env.value,
                    "side_effect": route.side_effect,
                }
            )
        return rows


def _parse_entry(source: str, name: str, entry: Any) -> Route:
    if not isinstance(entry, dict):
        raise RouteTableError(f"{source}: entry {name!r}: must be an object")
    allowed = {"preferred_env", "fallback_env", "side_effect", "idempotent", "note"}
    unknown_keys = set(entry) - allowed
    if unknown_keys:
        raise RouteTableError(
            f"{source}: entry {name!r}: unknown field(s) {sorted(unknown_keys)}; allowed: "
            f"preferred_env, fallback_env, side_effect, idempotent, note"
        )
    # Every field is required: a silent default (side_effect false above all) could let a post
    # or DM run twice.
    missing = [f for f in ("preferred_env", "fallback_env", "side_effect") if f not in entry]
    if missing:
        raise RouteTableError(f"{source}: entry {name!r}: missing field(s) {missing}")
    try:
        preferred = Preferred(entry["preferred_env"])
    except ValueError:
        raise RouteTableError(
            f"{source}: entry {name!r}: preferred_env must be local, cloud or auto; "
            f"got {entry.get('preferred_env')!r}"
        ) from None
    try:
        fallback = Fallback(entry["fallback_env"])
    except ValueError:
        raise RouteTableError(
            f"{source}: entry {name!r}: fallback_env must be local, cloud or none; "
            f"got {entry.get('fallback_env')!r}"
        ) from None
    side_effect = entry["side_effect"]
    if not isinstance(side_effect, bool):
        raise RouteTableError(
            f"{source}: entry {name!r}: side_effect must be true or false; got {side_effect!r}"
        )
    idempotent = entry.get("idempotent", False)
    if not isinstance(idempotent, bool):
        raise RouteTableError(
            f"{source}: entry {name!r}: idempotent must be true or false; got {idempotent!r}"
        )
    return Route(preferred, fallback, side_effect, idempotent=idempotent)


def markdown(table: RouteTable, kind_of: Callable[[str], str] | None = None) -> str:
    """The route table as a markdown table (the docs' routing table is this output)."""
    lines = [
        "| action | preferred_env | fallback_env | side_effect | classifier |",
        "|---|---|---|---|---|",
    ]
    for row in table.rows():
        kind = kind_of(row["action"].replace("*", "x")) if kind_of else ""
        lines.append(
            f"| `{row['action']}` | {row['preferred_env']} | {row['fallback_env']} | "
            f"{'yes' if row['side_effect'] else 'no'} | {kind} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from action_classifier import ActionClassifier

    print(markdown(RouteTable.load(), lambda a: ActionClassifier().classify(a).value), end="")
