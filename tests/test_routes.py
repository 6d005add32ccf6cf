"""LocalRoutes and CloudRoutes: action -> registry topic, action -> cloud URL."""

from __future__ import annotations

import inspect
from typing import Any
from urllib.parse import urlsplit

import pytest

from cloud_routes import CloudRoutes, cloud_url
from errors import InvalidParams
from local_routes import LocalRoutes
from service_registry import ServiceRegistry

pytestmark = pytest.mark.prd200


@pytest.mark.parametrize(
    ("endpoint", "action", "url"),
    [
        ("https://cloud.example", "dm.send", "https://cloud.example/api/services/dm/send"),
        ("https://cloud.example/", "dm.send", "https://cloud.example/api/services/dm/send"),
        ("https://cloud.example//", "dm.send", "https://cloud.example/api/services/dm/send"),
        (
            "https://cloud.example/everreach/",
            "content.analyze_video",
            "https://cloud.example/everreach/api/services/content/analyze_video",
        ),
        (
            "http://127.0.0.1:9000",
            "research.keyword",
            "http://127.0.0.1:9000/api/services/research/keyword",
        ),
    ],
)
def test_the_cloud_url_is_endpoint_api_services_service_topic(
    endpoint: str, action: str, url: str
) -> None:
    assert CloudRoutes(endpoint).url(action) == url
    assert cloud_url(endpoint, action) == url


def test_the_endpoint_is_kept_without_its_trailing_slash() -> None:
    assert CloudRoutes("https://cloud.example/x/").endpoint == "https://cloud.example/x"


def test_a_repeated_lookup_gives_the_same_url() -> None:
    routes = CloudRoutes("https://cloud.example")
    assert (
        routes.url("dm.send")
        == routes.url("dm.send")
        == cloud_url("https://cloud.example", "dm.send")
    )
    assert routes.url("dm.conversations") == "https://cloud.example/api/services/dm/conversations"


@pytest.mark.parametrize(
    "action",
    [
        "../x",
        "a.b/c",
        "A.B",
        "x",
        "dm.send/../../admin",
        "dm.send?to=evil",
        "dm.send#frag",
        "@evil.example.x",
        "dm.%2e%2e",
        "dm.send\n",
        "evil.example:80.x",
        "",
    ],
)
def test_an_invalid_action_never_becomes_a_url(action: str) -> None:
    with pytest.raises(InvalidParams):
        CloudRoutes("https://cloud.example").url(action)


@pytest.mark.parametrize("action", ["dm.send", "a.b", "z9_.y_8"])
def test_the_url_stays_under_the_endpoint(action: str) -> None:
    url = CloudRoutes("https://cloud.example:8443/base").url(action)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc) == ("https", "cloud.example:8443")
    assert parts.path.startswith("/base/api/services/")
    assert (parts.query, parts.fragment) == ("", "")


def test_the_url_depends_on_the_action_alone() -> None:
    # url() has no params argument: nothing a caller sends can steer the request elsewhere.
    assert list(inspect.signature(CloudRoutes.url).parameters) == ["self", "action"]


async def _noop(params: dict[str, Any]) -> None:
    return None


@pytest.fixture
def local_routes() -> LocalRoutes:
    registry = ServiceRegistry({"content.analyze_video": _noop, "content.analyze_v2": _noop})
    return LocalRoutes(
        registry,
        aliases={"video.analyze": "content.analyze_v2", "video.missing": "content.nowhere"},
    )


@pytest.mark.parametrize(
    ("action", "topic", "resolved"),
    [
        ("content.analyze_video", "content.analyze_video", "content.analyze_video"),
        ("system.heartbeat", "system.heartbeat", "system.heartbeat"),
        ("video.analyze", "content.analyze_v2", "content.analyze_v2"),  # alias
        ("video.missing", "content.nowhere", None),  # alias to nothing registered
        ("dm.send", "dm.send", None),  # no local handler
    ],
)
def test_local_routes(
    local_routes: LocalRoutes, action: str, topic: str, resolved: str | None
) -> None:
    assert local_routes.topic(action) == topic
    assert local_routes.resolve(action) == resolved
    assert local_routes.has_local(action) is (resolved is not None)


def test_local_routes_follow_the_registry() -> None:
    registry = ServiceRegistry()
    routes = LocalRoutes(registry)
    assert not routes.has_local("dm.send")
    registry.add("dm.send", _noop)
    assert routes.resolve("dm.send") == "dm.send"
