"""request_guard: Host allowlist, cross-site refusal, and no public service without a token.

Pure rules are table tests; the behaviours that depend on a real socket run real uvicorn
processes on this machine (``--host 0.0.0.0`` with HOST unset, as a user might start it).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from request_guard import allowed_hosts, host_allowed, is_public_ip, listening_addresses
from tests.conftest import ServerProcess

ECHO = {"action": "system.echo", "params": {"hi": 1}}


@pytest.mark.parametrize(
    ("host", "allowed", "ok"),
    [
        ("localhost:8080", "", True),
        ("127.0.0.1:8080", "", True),
        ("[::1]:8080", "", True),
        ("127.0.0.1", "", True),
        ("evil.example", "", False),
        ("evil.example:8080", "", False),
        ("localhost.evil.example", "", False),
        ("", "", False),
        ("api.example.com", "api.example.com", True),
        ("API.example.com:443", "api.example.com", True),
        ("localhost:8080", "api.example.com", False),
        ("eu.api.example.com", "*.example.com", True),
        ("example.com.evil", "*.example.com", False),
        ("anything", "*", True),
    ],
)
def test_host_allowlist(host: str, allowed: str, ok: bool) -> None:
    assert host_allowed(host, allowed_hosts(allowed.split(","), "127.0.0.1")) is ok


def test_the_bound_host_is_allowed_by_default_but_not_a_wildcard() -> None:
    assert "192.168.1.5" in allowed_hosts([""], "192.168.1.5")
    assert "[fd00::2]" in allowed_hosts([""], "fd00::2")
    assert allowed_hosts([""], "0.0.0.0") == frozenset({"localhost", "127.0.0.1", "[::1]"})


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False),
        ("127.8.9.1", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("0.0.0.0", True),
        ("::", True),
        ("192.0.2.2", True),
        ("testserver", False),
    ],
)
def test_is_public_ip(address: str, public: bool) -> None:
    assert is_public_ip(address) is public


@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="needs Linux /proc")
def test_listening_addresses_sees_this_process_sockets() -> None:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        before = listening_addresses()
        sock.listen()
        after = listening_addresses()
    assert before is not None and after is not None
    assert after.count("0.0.0.0") == before.count("0.0.0.0") + 1


# -- in-process -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(module_app_client: Callable[..., TestClient]) -> TestClient:
    """One app for the module: its tests send requests that leave nothing to see."""
    return module_app_client()


def test_by_default_only_loopback_host_names_are_served(
    app_client: Callable[..., TestClient],
) -> None:
    test_client = app_client(ALLOWED_HOSTS="")
    refused = test_client.get("/health")
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_params"
    assert "ALLOWED_HOSTS" in refused.json()["detail"]
    assert test_client.get("/health", headers={"Host": "localhost:8080"}).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "http://localhost:3000"},
        {"Origin": "http://testserver.evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
)
@pytest.mark.parametrize("path", ["/dispatch", "/batch", "/api/services/system/echo"])
def test_a_cross_site_browser_request_is_refused(
    client: TestClient, path: str, headers: dict[str, str]
) -> None:
    answer = client.post(path, json=ECHO, headers=headers)
    assert answer.status_code == 403
    assert answer.json()["error"] == "unauthorized"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Origin": "http://testserver"},
        {"Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},
    ],
)
def test_same_origin_pages_and_programs_are_served(
    client: TestClient, headers: dict[str, str]
) -> None:
    answer = client.post("/dispatch", json=ECHO, headers=headers)
    assert answer.status_code == 200 and answer.json()["result"] == {"hi": 1}


def test_reads_from_another_origin_are_left_to_the_browsers_same_origin_policy(
    client: TestClient,
) -> None:
    assert client.get("/health", headers={"Origin": "https://evil.example"}).status_code == 200


# -- real processes --------------------------------------------------------------------------------


def _non_loopback_ip() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else str(address)


@pytest.mark.e2e
def test_a_server_listening_on_all_addresses_without_a_token_serves_nothing_but_health(
    server_factory: Callable[..., ServerProcess],
) -> None:
    # HOST is unset: the old check read HOST (127.0.0.1) and served /dispatch to the network.
    server = server_factory(name="public", args=["--host", "0.0.0.0"])
    urls = [server.url]
    public_ip = _non_loopback_ip()
    if public_ip is not None:
        urls.append(f"http://{public_ip}:{server.port}")
    for url in urls:
        headers = {"Host": f"127.0.0.1:{server.port}"}
        answer = httpx.post(f"{url}/dispatch", json=ECHO, headers=headers, timeout=10)
        assert answer.status_code == 403, url
        assert "LOCAL_API_TOKEN" in answer.json()["detail"]
        assert httpx.get(f"{url}/status", headers=headers, timeout=10).status_code == 403
        assert httpx.get(f"{url}/health", headers=headers, timeout=10).status_code == 200


@pytest.mark.e2e
def test_a_server_listening_on_all_addresses_with_a_token_serves_with_it(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(
        name="token", args=["--host", "0.0.0.0"], LOCAL_API_TOKEN="t0ken-for-tests"
    )
    auth = {"Authorization": "Bearer t0ken-for-tests"}
    answer = httpx.post(f"{server.url}/dispatch", json=ECHO, headers=auth, timeout=10)
    assert answer.status_code == 200 and answer.json()["result"] == {"hi": 1}


@pytest.mark.e2e
def test_a_real_server_refuses_a_rebound_host_and_a_cross_site_post_but_serves_curl(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(name="loopback")
    rebound = httpx.post(
        f"{server.url}/dispatch", json=ECHO, headers={"Host": "evil.example"}, timeout=10
    )
    assert rebound.status_code == 400 and rebound.json()["error"] == "invalid_params"
    csrf = httpx.post(
        f"{server.url}/dispatch",
        content=b'{"action": "system.echo"}',
        headers={"Origin": "https://evil.example", "Content-Type": "text/plain"},
        timeout=10,
    )
    assert csrf.status_code == 403 and csrf.json()["error"] == "unauthorized"
    # What `curl -s -X POST localhost:8080/dispatch -d '{...}'` sends.
    curl = httpx.post(
        f"http://localhost:{server.port}/dispatch",
        content=b'{"action": "system.echo", "params": {"hi": 1}}',
        headers={"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "curl/8"},
        timeout=10,
    )
    assert curl.status_code == 200 and curl.json()["result"] == {"hi": 1}


def test_a_host_header_gets_the_same_answer_every_time_and_per_config() -> None:
    from types import SimpleNamespace

    from errors import BadRequest
    from request_guard import RequestGuardMiddleware

    guard = RequestGuardMiddleware(None)
    local = SimpleNamespace(allowed_hosts="", host="127.0.0.1", local_api_token="t")
    public = SimpleNamespace(allowed_hosts="api.example.com", host="0.0.0.0", local_api_token="t")

    def check(host: bytes, config: SimpleNamespace) -> bool:
        scope = {"headers": [(b"host", host)], "path": "/dispatch", "method": "POST"}
        try:
            guard.check(scope, config)
        except BadRequest:
            return False
        return True

    for _ in range(3):  # the answer kept for a Host is the one it got the first time
        assert check(b"localhost:8080", local) and not check(b"api.example.com", local)
    for _ in range(2):  # another config: every Host is judged again
        assert not check(b"localhost:8080", public) and check(b"api.example.com", public)
    assert check(b"localhost:8080", local)
