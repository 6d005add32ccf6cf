"""Map an action to the local service-registry topic that runs it.

The registry is the one source of topics (PRD rule 1), so the mapping is the identity plus
optional aliases; ``resolve()`` answers whether this instance can run the action locally.
"""

from __future__ import annotations

from collections.abc import Mapping

from service_registry import ServiceRegistry


class LocalRoutes:
    """Which registry topic runs an action here, if any."""

    def __init__(self, registry: ServiceRegistry, aliases: Mapping[str, str] | None = None):
        self._registry = registry
        self._aliases = dict(aliases or {})

    def topic(self, action: str) -> str:
        """The registry topic for ``action`` (an alias target, or the action itself)."""
        return self._aliases.get(action, action)

    def resolve(self, action: str) -> str | None:
        """The registry topic for ``action`` if a local handler exists, else None."""
        topic = self.topic(action)
        return topic if self._registry.has(topic) else None

    def has_local(self, action: str) -> bool:
        return self.resolve(action) is not None
