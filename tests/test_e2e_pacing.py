"""End to end, pacing and scheduled actions: real terminals, a real cloud, real restarts.

The cloud is a second instance of the server; its ``dm.send`` handler appends one line per
execution (id, pid, wall-clock time) to a log file, so the tests count executions per message
and per window across processes, restarts and SIGKILL.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_until_it_sees_its_cloud

pytestmark = [pytest.mark.e2e]

KEY = "e2e-cloud-key-123"
# The cloud sees a run a network hop after the terminal booked it; hops differ a little.
HOP_S = 0.3


def runs(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line]


def wait_for(predicate: Any, *, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def most_in_a_window(times: list[float], per_s: float) -> int:
    """The most runs in any window [t, t + per_s), less one hop of leeway."""
    times = sorted(times)
    span = per_s - HOP_S
    return max((sum(1 for u in times if t <= u < t + span) for t in times), default=0)


def send(server: Any, ident: str, log: Path, **extra: Any) -> httpx.Response:
    body = {"action": "dm.send", "params": {"id": ident, "log": str(log)}, **extra}
    return httpx.post(f"{server.url}/dispatch", json=body, timeout=60)


def status(server: Any) -> dict[str, Any]:
    return httpx.get(f"{server.url}/status", timeout=10).json()


def start_cloud(server_factory: Any) -> Any:
    """Launch the cloud; ``start_terminal`` waits for it, so the two start side by side."""
    return server_factory(name="cloud", EVERREACH_ENV="cloud", EVERREACH_CLOUD_KEY=KEY, ready=False)


def start_terminal(
    server_factory: Any, tmp_path: Path, cloud: Any, limits: dict[str, Any], **variables: Any
) -> Any:
    name = variables.pop("name", "terminal")
    path = tmp_path / f"{name}-limits.json"
    path.write_text(json.dumps(limits))
    # The terminal has no dm.send handler: every run is the cloud's, counted in its log.
    terminal = server_factory(
        name=name,
        EVERREACH_ENV="hybrid",
        CLOUD_ENDPOINT=cloud.url,
        EVERREACH_CLOUD_KEY=KEY,
        EVERREACH_SERVICES="tests.e2e_terminal_services",
        RATE_LIMITS_PATH=str(path),
        CONNECTIVITY_INTERVAL_SEC="0.3",
        SYNC_INTERVAL_SEC="1",
        **variables,
    )
    if variables.get("ready", True):
        cloud.wait_ready()
        wait_until_it_sees_its_cloud(terminal)
    return terminal


def test_six_sends_against_three_per_five_seconds(server_factory, tmp_path):
    log = tmp_path / "cloud-runs.jsonl"
    cloud = start_cloud(server_factory)
    terminal = start_terminal(
        server_factory, tmp_path, cloud, {"dm.send": {"max": 3, "per_sec": 5}}
    )
    answers = [send(terminal, f"m{i}", log) for i in range(6)]
    assert [a.status_code for a in answers] == [200, 200, 200, 202, 202, 202]
    deferred = [a.json() for a in answers[3:]]
    assert all(d["queued"] and d["source"] == "outbox" and d["outbox_id"] for d in deferred)
    first_run = min(r["at"] for r in runs(log))
    for body in deferred:
        until = datetime.fromisoformat(body["deferred_until"]).timestamp()
        assert until >= first_run + 5 - HOP_S
    wait_for(lambda: len(runs(log)) >= 6, what="the three deferred sends")
    wait_for(lambda: status(terminal)["outbox"]["depth"] == 0, what="the outbox to empty")
    done = runs(log)
    assert Counter(r["id"] for r in done) == Counter(f"m{i}" for i in range(6))  # once each
    assert [r["id"] for r in done][3:] == ["m3", "m4", "m5"]  # in order
    assert most_in_a_window([r["at"] for r in done], 5) == 3


def test_two_terminals_sharing_redis_never_exceed_the_limit_together(
    server_factory, tmp_path, redis_url
):
    log = tmp_path / "cloud-runs.jsonl"
    cloud = start_cloud(server_factory)
    # 1.5 s windows: the leeway a hop needs (HOP_S) does not grow with the window.
    limits = {"dm.send": {"max": 2, "per_sec": 1.5}}
    terminals = [
        start_terminal(
            server_factory, tmp_path, cloud, limits, name=f"t{n}", REDIS_URL=redis_url, ready=False
        )
        for n in range(2)
    ]
    for server in (*terminals, cloud):  # the three start side by side
        server.wait_ready()
    for terminal in terminals:
        wait_until_it_sees_its_cloud(terminal)
    codes: list[int] = []

    def burst(n: int) -> None:
        for i in range(4):
            codes.append(send(terminals[n], f"t{n}-{i}", log).status_code)

    threads = [threading.Thread(target=burst, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(codes) == [200, 200] + [202] * 6
    wait_for(lambda: len(runs(log)) >= 8, what="all eight sends", timeout_s=90)
    wait_for(
        lambda: all(status(t)["outbox"]["depth"] == 0 for t in terminals), what="outboxes empty"
    )
    done = runs(log)
    assert Counter(r["id"] for r in done) == Counter(
        f"t{n}-{i}" for n in range(2) for i in range(4)
    )
    assert most_in_a_window([r["at"] for r in done], 1.5) == 2


def test_deferred_and_scheduled_items_survive_sigkill(server_factory, tmp_path):
    log = tmp_path / "cloud-runs.jsonl"
    cloud = start_cloud(server_factory)
    terminal = start_terminal(
        server_factory, tmp_path, cloud, {"dm.send": {"max": 1, "per_sec": 2}}
    )
    codes = [send(terminal, f"k{i}", log).status_code for i in range(3)]
    assert codes == [200, 202, 202]
    scheduled = send(terminal, "later", log, delay_sec=3)
    assert scheduled.status_code == 202 and scheduled.json()["deferred_until"]
    terminal.kill()  # SIGKILL: nothing is flushed or closed
    assert [r["id"] for r in runs(log)] == ["k0"]
    terminal.start()
    wait_for(lambda: len(runs(log)) >= 4, what="the kept items after the restart")
    wait_for(lambda: status(terminal)["outbox"]["depth"] == 0, what="the outbox to empty")
    assert Counter(r["id"] for r in runs(log)) == Counter(["k0", "k1", "k2", "later"])


def test_a_scheduled_action_cancelled_before_its_time_never_runs(server_factory, tmp_path):
    log = tmp_path / "cloud-runs.jsonl"
    cloud = start_cloud(server_factory)
    terminal = start_terminal(server_factory, tmp_path, cloud, {})
    doomed = send(terminal, "doomed", log, delay_sec=1.5).json()
    kept = send(terminal, "kept", log, delay_sec=2.5).json()
    gone = httpx.delete(f"{terminal.url}/outbox/{doomed['outbox_id']}", timeout=10)
    assert gone.status_code == 200
    wait_for(lambda: len(runs(log)) >= 1, what="the scheduled action that was kept")
    wait_for(lambda: status(terminal)["outbox"]["depth"] == 0, what="the outbox to empty")
    assert [r["id"] for r in runs(log)] == ["kept"]
    again = httpx.delete(f"{terminal.url}/outbox/{kept['outbox_id']}", timeout=10)
    assert again.status_code == 404 and "sent already" in again.json()["detail"]


def test_the_clouds_own_limit_defers_on_the_terminal_and_never_runs_twice(server_factory, tmp_path):
    log = tmp_path / "cloud-runs.jsonl"
    limits = tmp_path / "cloud-limits.json"
    limits.write_text(json.dumps({"dm.send": {"max": 1, "per_sec": 1.5}}))
    cloud = server_factory(
        name="cloud",
        EVERREACH_ENV="cloud",
        EVERREACH_CLOUD_KEY=KEY,
        RATE_LIMITS_PATH=str(limits),
    )
    terminal = start_terminal(server_factory, tmp_path, cloud, {})  # no limits of its own
    answers = [send(terminal, f"c{i}", log) for i in range(3)]
    assert [a.status_code for a in answers] == [200, 202, 202]
    assert all(a.json()["deferred_until"] for a in answers[1:])
    wait_for(lambda: len(runs(log)) >= 3, what="the sends the cloud deferred")
    wait_for(lambda: status(terminal)["outbox"]["depth"] == 0, what="the outbox to empty")
    done = runs(log)
    assert Counter(r["id"] for r in done) == Counter(["c0", "c1", "c2"])
    assert most_in_a_window([r["at"] for r in done], 1.5) == 1
    assert status(terminal)["circuits"]["cloud"] == "closed"
