"""Map an action to its cloud URL: ``{CLOUD_ENDPOINT}/api/services/{service}/{topic}``.

The URL is built from the validated action name only — never from params — so a request can
never be steered to another host or path.
"""

from __future__ import annotations

from service_registry import check_action_name


class CloudRoutes:
    """Cloud URLs of actions under one endpoint."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._memo: dict[str, str] = {}

    def url(self, action: str) -> str:
        url = self._memo.get(action)
        if url is None:
            service, _, topic = check_action_name(action).partition(".")
            url = f"{self.endpoint}/api/services/{service}/{topic}"
            if len(self._memo) < 10_000:
                self._memo[action] = url
        return url


def cloud_url(endpoint: str, action: str) -> str:
    """The cloud URL of ``action`` under ``endpoint``."""
    return CloudRoutes(endpoint).url(action)
