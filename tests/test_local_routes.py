"""local_routes: which registry topic runs an action here (identity plus aliases)."""

from __future__ import annotations

from typing import Any

from local_routes import LocalRoutes
from service_registry import ServiceRegistry


async def _handler(params: dict[str, Any]) -> dict[str, Any]:
    return params


def _registry() -> ServiceRegistry:
    return ServiceRegistry({"dm.send": _handler, "content.analyze": _handler}, builtins=False)


def test_registered_action_resolves_to_itself() -> None:
    routes = LocalRoutes(_registry())
    assert routes.topic("dm.send") == "dm.send"
    assert routes.resolve("dm.send") == "dm.send"
    assert routes.has_local("dm.send")


def test_unregistered_action_has_no_local_topic() -> None:
    routes = LocalRoutes(_registry())
    assert routes.topic("research.keyword") == "research.keyword"
    assert routes.resolve("research.keyword") is None
    assert not routes.has_local("research.keyword")


def test_alias_points_an_action_at_another_topic() -> None:
    routes = LocalRoutes(_registry(), {"legacy.dm": "dm.send"})
    assert routes.topic("legacy.dm") == "dm.send"
    assert routes.resolve("legacy.dm") == "dm.send"
    assert routes.has_local("legacy.dm")


def test_alias_to_a_missing_topic_is_not_local_even_if_the_alias_name_is() -> None:
    # The alias wins: "dm.send" is registered, but here it is redirected to a missing topic.
    routes = LocalRoutes(_registry(), {"dm.send": "dm.send_v2"})
    assert routes.topic("dm.send") == "dm.send_v2"
    assert routes.resolve("dm.send") is None


def test_builtins_resolve_when_the_registry_has_them() -> None:
    assert LocalRoutes(ServiceRegistry()).resolve("system.echo") == "system.echo"
    assert LocalRoutes(ServiceRegistry(builtins=False)).resolve("system.echo") is None


def test_aliases_are_copied_so_a_later_change_of_the_callers_dict_has_no_effect() -> None:
    aliases = {"legacy.dm": "dm.send"}
    routes = LocalRoutes(_registry(), aliases)
    aliases["legacy.dm"] = "nowhere.at_all"
    assert routes.resolve("legacy.dm") == "dm.send"


def test_a_handler_added_later_is_seen() -> None:
    registry = _registry()
    routes = LocalRoutes(registry)
    assert routes.resolve("late.topic") is None
    registry.add("late.topic", _handler)
    assert routes.resolve("late.topic") == "late.topic"
