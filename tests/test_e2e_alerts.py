"""End to end, with real processes: a terminal's alerts reach a webhook listener on loopback.

The terminal and its cloud are two ``uvicorn local_server:app`` processes; the listener is a
small HTTP server in this test. Killing the cloud sends exactly one ``cloud_offline``, its return
exactly one ``cloud_online``; a listener that answers 500 fails no dispatch and shows in /status.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.e2e]

KEY = "e2e-alerts-cloud-key"


class Hook:
    """A webhook listener: keeps every body POSTed to it and answers ``status``."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.status = 204
        self.url = ""

    def events(self) -> list[str]:
        return [body["event"] for body in list(self.bodies)]


@pytest.fixture
def hook() -> Iterator[Hook]:
    received = Hook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            received.bodies.append(json.loads(self.rfile.read(length)))
            self.send_response(received.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    received.url = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
    yield received
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def wait_for(predicate: Callable[[], Any], *, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s  # only stops a hung test
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def status(server: Any) -> dict[str, Any]:
    return dict(httpx.get(f"{server.url}/status", timeout=10).json())


def probes(server: Any) -> int:
    """How many probes in a row failed (0 once one answered)."""
    return int(status(server)["connectivity"]["consecutive_failures"])


def last_probe_at(server: Any) -> str | None:
    return status(server)["connectivity"]["last_probe_at"]


def probed_since(server: Any, seen: str | None) -> Callable[[], bool]:
    return lambda: last_probe_at(server) != seen


def start_cloud(server_factory: Callable[..., Any], port: int) -> Any:
    return server_factory(name="cloud", port=port, EVERREACH_ENV="cloud", EVERREACH_CLOUD_KEY=KEY)


def start_terminal(server_factory: Callable[..., Any], cloud_url: str, hook_url: str) -> Any:
    return server_factory(
        name="terminal",
        EVERREACH_ENV="hybrid",
        CLOUD_ENDPOINT=cloud_url,
        EVERREACH_CLOUD_KEY=KEY,
        CONNECTIVITY_INTERVAL_SEC="0.2",
        SYNC_INTERVAL_SEC="1",
        ALERT_WEBHOOK_URL=hook_url,
    )


def test_killing_the_cloud_sends_one_cloud_offline_and_its_return_one_cloud_online(
    server_factory: Callable[..., Any], hook: Hook
) -> None:
    port = free_port()
    cloud = start_cloud(server_factory, port)
    term = start_terminal(server_factory, cloud.url, hook.url)
    wait_for(lambda: status(term)["online"], what="the terminal to see its cloud")

    cloud.kill(signal.SIGKILL)
    wait_for(lambda: "cloud_offline" in hook.events(), what="the cloud_offline alert")
    offline_after = status(term)["connectivity"]["offline_after"]
    wait_for(lambda: probes(term) >= offline_after + 5, what="five more failed probes")
    assert [e for e in hook.events() if e.startswith("cloud_")] == ["cloud_offline"]

    start_cloud(server_factory, port)
    wait_for(lambda: "cloud_online" in hook.events(), what="the cloud_online alert")
    for _ in range(3):  # three more probes that found the cloud up
        wait_for(probed_since(term, last_probe_at(term)), what="one more probe")
    assert [e for e in hook.events() if e.startswith("cloud_")] == ["cloud_offline", "cloud_online"]

    offline = next(b for b in hook.bodies if b["event"] == "cloud_offline")
    assert {"event", "at", "instance", "detail"} <= set(offline)
    assert offline["instance"].startswith(socket.gethostname())
    assert cloud.url in offline["detail"]
    timeline = status(term)["alerts"]
    assert timeline["sinks"] == ["webhook"] and timeline["failures"] == []
    assert [(e["event"], e["status"]) for e in timeline["events"][:2]] == [
        ("cloud_online", "sent"),
        ("cloud_offline", "sent"),
    ]
    assert hook.url not in json.dumps(timeline)


def test_a_webhook_answering_500_fails_no_dispatch_and_shows_in_status(
    server_factory: Callable[..., Any], hook: Hook
) -> None:
    hook.status = 500
    dead_cloud = f"http://127.0.0.1:{free_port()}"  # nobody listens: offline after 3 probes
    term = start_terminal(server_factory, dead_cloud, hook.url)
    wait_for(lambda: len(hook.bodies) >= 2, what="the alert to be retried")
    assert status(term)["alerts"]["events"][0]["status"] == "pending"

    for n in range(3):  # while the alert is being retried
        answer = httpx.post(
            f"{term.url}/dispatch", json={"action": "system.echo", "params": {"n": n}}, timeout=10
        )
        assert answer.status_code == 200 and answer.json()["ok"], answer.text

    wait_for(lambda: status(term)["alerts"]["failures"], what="the delivery failure")
    alerts = status(term)["alerts"]
    assert alerts["failures"][0]["event"] == "cloud_offline"
    assert alerts["failures"][0]["sink"] == "webhook"
    assert "500" in alerts["failures"][0]["error"]
    assert (alerts["events"][0]["status"], alerts["events"][0]["attempts"]) == ("failed", 5)
    assert hook.events() == ["cloud_offline"] * 5
    assert hook.url not in json.dumps(alerts)
