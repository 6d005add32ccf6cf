"""cloud_routes: an action's cloud URL is built from its validated name only."""

from __future__ import annotations

import pytest

from cloud_routes import CloudRoutes, cloud_url
from errors import InvalidParams


def test_url_is_endpoint_api_services_service_topic() -> None:
    routes = CloudRoutes("https://cloud.example")
    assert routes.url("content.analyze_video") == (
        "https://cloud.example/api/services/content/analyze_video"
    )


@pytest.mark.parametrize("endpoint", ["https://c.example/", "https://c.example//"])
def test_trailing_slashes_of_the_endpoint_are_dropped(endpoint: str) -> None:
    assert cloud_url(endpoint, "dm.send") == "https://c.example/api/services/dm/send"


def test_endpoint_with_a_path_prefix_keeps_it() -> None:
    assert cloud_url("http://h:8000/base", "a.b") == "http://h:8000/base/api/services/a/b"


@pytest.mark.parametrize(
    "action",
    [
        "../admin.x",
        "dm.send/../../admin",
        "dm.send?host=evil.example",
        "dm.send#frag",
        "https://evil.example.x",
        "dm.send\n",
        "DM.send",
        "dm",
        "dm.send.extra",
        "",
    ],
)
def test_an_action_that_could_steer_the_url_is_refused(action: str) -> None:
    routes = CloudRoutes("https://cloud.example")
    with pytest.raises(InvalidParams, match=r"action must be 'service\.topic'"):
        routes.url(action)


def test_refused_action_is_not_memoised() -> None:
    routes = CloudRoutes("https://cloud.example")
    for _ in range(2):
        with pytest.raises(InvalidParams):
            routes.url("Bad.Action")
    assert routes.url("ok.action") == "https://cloud.example/api/services/ok/action"


def test_memo_is_bounded_and_urls_stay_right_past_the_bound() -> None:
    routes = CloudRoutes("https://c.example")
    for i in range(10_050):
        assert routes.url(f"s.t{i}") == f"https://c.example/api/services/s/t{i}"
    assert len(routes._memo) == 10_000
    assert routes.url("s.t10049") == "https://c.example/api/services/s/t10049"
