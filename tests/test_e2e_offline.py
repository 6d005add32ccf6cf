"""End to end, with faults: the cloud dies, the terminal is SIGKILLed, answers are lost.

Nothing acknowledged is lost and nothing runs twice: every side-effect handler appends one line
per execution to a log file, and the tests count them per message id.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, until, wait_until_it_sees_its_cloud
from tests.fault_proxy import FaultProxy

pytestmark = [pytest.mark.prd200, pytest.mark.e2e]

KEY = "e2e-cloud-key-123"


def dispatch(server, action: str, params: dict | None = None) -> httpx.Response:
    return httpx.post(
        f"{server.url}/dispatch", json={"action": action, "params": params or {}}, timeout=60
    )


def executions(log: Path) -> Counter[str]:
    if not log.exists():
        return Counter()
    return Counter(json.loads(line)["id"] for line in log.read_text().splitlines() if line)


def wait_for(predicate, *, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def outbox_depth(server) -> int:
    return httpx.get(f"{server.url}/status", timeout=10).json()["outbox"]["depth"]


def last_sync_at(server) -> float:
    """When the server's last sync pass (outbox replay, state push) ran; 0 before the first."""
    status = httpx.get(f"{server.url}/status", timeout=10).json()
    return float((status.get("sync") or {}).get("at", 0))


def start_cloud(server_factory, port: int, *, ready: bool = True):
    return server_factory(
        name="cloud", port=port, EVERREACH_ENV="cloud", EVERREACH_CLOUD_KEY=KEY, ready=ready
    )


def start_terminal(server_factory, cloud_url: str, **variables):
    # The terminal has no dm.send or research.keyword handler: those can only run in the cloud.
    settings = {
        "EVERREACH_ENV": "hybrid",
        "CLOUD_ENDPOINT": cloud_url,
        "EVERREACH_CLOUD_KEY": KEY,
        "EVERREACH_SERVICES": "tests.e2e_terminal_services",
        "CLOUD_RETRIES": "1",
        "CLOUD_BACKOFF_SEC": "0.05",
        "CONNECTIVITY_INTERVAL_SEC": "0.3",
        "SYNC_INTERVAL_SEC": "0.3",
    }
    settings.update(variables)
    return server_factory(name="terminal", **settings)


def start_pair(server_factory, port: int, **variables):
    """The cloud and its terminal, started side by side; the terminal has seen its cloud up."""
    cloud = start_cloud(server_factory, port, ready=False)
    term = start_terminal(server_factory, cloud.url, **variables)
    cloud.wait_ready()
    wait_until_it_sees_its_cloud(term)
    return cloud, term


def test_killed_cloud_serves_reads_queues_writes_and_delivers_each_once(server_factory, tmp_path):
    port = free_port()
    cloud, term = start_pair(server_factory, port)
    log = tmp_path / "dm.log"

    warm = dispatch(term, "research.keyword", {"keyword": "ai"}).json()
    assert warm["source"] == "cloud"
    sent = dispatch(term, "dm.send", {"to": "a", "id": "before", "log": str(log)}).json()
    assert sent["source"] == "cloud"

    cloud.kill(signal.SIGKILL)
    queued_ids = []
    for n in range(6):
        read = dispatch(term, "research.keyword", {"keyword": "ai"}).json()
        assert read["ok"] and read["source"] == "cache" and read["cached_at"], read
        local = dispatch(term, "research.platform", {"platform": "x"}).json()
        assert local["ok"] and local["source"] == "local_fallback"
        answer = dispatch(term, "dm.send", {"to": "b", "id": f"q{n}", "log": str(log)})
        body = answer.json()
        assert answer.status_code == 202 and body["queued"] and body["source"] == "outbox", body
        queued_ids.append(f"q{n}")
    never_seen = dispatch(term, "research.keyword", {"keyword": "never-cached"})
    assert never_seen.status_code in (502, 503) and not never_seen.json()["ok"]
    assert outbox_depth(term) == 6
    assert executions(log) == Counter({"before": 1})

    start_cloud(server_factory, port)
    wait_for(lambda: outbox_depth(term) == 0, what="the outbox to drain")
    assert executions(log) == Counter({"before": 1, **{i: 1 for i in queued_ids}})
    drained_at = last_sync_at(term)  # another sync pass must not send anything again
    wait_for(lambda: last_sync_at(term) > drained_at, what="one more sync pass")
    assert executions(log) == Counter({"before": 1, **{i: 1 for i in queued_ids}})
    order = [json.loads(line)["id"] for line in log.read_text().splitlines()]
    assert order == ["before", *queued_ids]


def test_outbox_survives_sigkill_of_the_terminal(server_factory, tmp_path):
    port = free_port()  # nothing listens here yet: the cloud is down
    term = start_terminal(server_factory, f"http://127.0.0.1:{port}")
    log = tmp_path / "dm.log"
    for n in range(3):
        answer = dispatch(term, "dm.send", {"to": "c", "id": f"k{n}", "log": str(log)})
        assert answer.status_code == 202
    term.kill(signal.SIGKILL)

    cloud = start_cloud(server_factory, port, ready=False)  # starts beside the terminal
    term.start()
    cloud.wait_ready()
    wait_for(lambda: outbox_depth(term) == 0, what="the outbox to drain after restart")
    assert executions(log) == Counter({"k0": 1, "k1": 1, "k2": 1})


def test_ambiguous_failures_queue_and_replay_with_the_same_key(server_factory, tmp_path):
    port = free_port()
    cloud = start_cloud(server_factory, port)
    # Every attempt reaches the cloud and then loses its answer: the DM *was* sent.
    proxy = FaultProxy(cloud.url, free_port(), ["500_after", "500_after"]).start()
    try:
        term = start_terminal(server_factory, proxy.url)
        log = tmp_path / "dm.log"
        answer = dispatch(term, "dm.send", {"to": "d", "id": "amb", "log": str(log)})
        assert answer.status_code == 202, answer.json()
        wait_for(lambda: outbox_depth(term) == 0, what="the replay")
    finally:
        proxy.stop()
    assert executions(log) == Counter({"amb": 1})


def test_corrupt_outbox_rows_are_reported_not_a_crash_loop(server_factory, tmp_path):
    port = free_port()
    term = start_terminal(server_factory, f"http://127.0.0.1:{port}")
    assert dispatch(term, "dm.send", {"to": "e", "id": "bad"}).status_code == 202
    term.stop()
    db = Path(term.env["DATA_DIR"]) / "hybrid.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE hybrid_outbox SET params_json = '{not json'")
    cloud = start_cloud(server_factory, port, ready=False)  # starts beside the terminal
    term.start()
    cloud.wait_ready()
    wait_for(
        lambda: httpx.get(f"{term.url}/status", timeout=10).json()["outbox"]["dead_letters"] == 1,
        what="the corrupt row to become a dead letter",
    )
    status = httpx.get(f"{term.url}/status", timeout=10).json()
    assert "corrupt" in status["dead_letters"][0]["error"]
    assert dispatch(term, "research.platform", {"platform": "ok"}).json()["ok"]


def test_offline_mode_serves_local_and_queues_without_touching_the_cloud(server_factory, tmp_path):
    port = free_port()
    cloud = start_cloud(server_factory, port, ready=False)  # the terminal never asks it
    term = start_terminal(server_factory, cloud.url, OFFLINE_MODE="true")
    cloud.wait_ready()
    log = tmp_path / "dm.log"
    health = httpx.get(f"{term.url}/health", timeout=10).json()
    assert health["online"] is False and health["offline_mode"] is True
    assert dispatch(term, "research.platform").json()["source"] == "local_fallback"
    answer = dispatch(term, "dm.send", {"to": "f", "id": "off", "log": str(log)})
    assert answer.status_code == 202
    offline = dispatch(term, "research.keyword", {"keyword": "x"})
    assert offline.status_code == 503 and offline.json()["error"] == "offline"
    time.sleep(1.0)
    assert executions(log) == Counter()


def test_terminal_pulls_cloud_state_at_start_up(server_factory):
    port = free_port()
    cloud = start_cloud(server_factory, port)
    auth = {"Authorization": f"Bearer {KEY}"}
    changes = {
        "changes": [
            {
                "key": "crm.stats",
                "value": {"leads": 42},
                "kind": "crm",
                "updated_at": "2026-11-01T00:00:00+00:00",
            },
            {
                "key": "feedback.strategy",
                "value": {"tone": "warm"},
                "kind": "feedback",
                "updated_at": "2026-11-01T00:00:00+00:00",
            },
        ]
    }
    pushed = httpx.post(f"{cloud.url}/api/sync/state", json=changes, headers=auth, timeout=10)
    assert pushed.status_code == 200 and pushed.json()["applied"] == 2
    term = start_terminal(server_factory, cloud.url)

    def pulled() -> dict:
        answer = httpx.get(f"{term.url}/api/sync/state", headers=auth, timeout=10)
        return answer.json()["state"]

    wait_for(lambda: "crm.stats" in pulled(), what="the start-up pull")
    assert pulled()["crm.stats"]["value"] == {"leads": 42}
    assert pulled()["feedback.strategy"]["value"] == {"tone": "warm"}
    assert httpx.get(f"{term.url}/api/sync/state", timeout=10).status_code == 401


def _outbox_items(term) -> list[tuple[str, str]]:
    """(DM id, status) of every item left in the terminal's outbox."""
    path = Path(term.env["DATA_DIR"]) / "hybrid.sqlite3"
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT params_json, status FROM hybrid_outbox").fetchall()
    return [(json.loads(params)["id"], status) for params, status in rows]


def test_a_cloud_killed_mid_burst_leaves_every_dm_delivered_or_parked_and_none_twice(
    server_factory, tmp_path
):
    port = free_port()
    cloud, term = start_pair(server_factory, port)
    log = tmp_path / "dm.log"
    total = 200
    answers: dict[str, int] = {}
    restarted_at: list[float] = []
    bursting = tmp_path / "bursting"  # handlers sleep 0.1 s while it exists: the burst's only
    bursting.touch()

    async def burst() -> None:
        limit = asyncio.Semaphore(20)
        async with httpx.AsyncClient(timeout=120) as client:

            async def send(n: int) -> None:
                dm = f"m{n:03d}"
                params = {
                    "to": "x",
                    "id": dm,
                    "log": str(log),
                    "sleep_s": 0.1,
                    "sleep_while": str(bursting),
                }
                async with limit:
                    answer = await client.post(
                        f"{term.url}/dispatch", json={"action": "dm.send", "params": params}
                    )
                answers[dm] = answer.status_code

            async def kill_and_restart() -> None:
                await until(lambda: sum(executions(log).values()) >= 30, what="30 DMs sent")
                await asyncio.to_thread(cloud.kill, signal.SIGKILL)  # mid-handler, mid-burst
                await asyncio.sleep(0.5)
                await asyncio.to_thread(start_cloud, server_factory, port)
                restarted_at.append(time.monotonic())

            await asyncio.gather(kill_and_restart(), *(send(n) for n in range(total)))

    asyncio.run(burst())
    bursting.unlink()  # the outbox's replays need not be slow
    acknowledged = {dm for dm, code in answers.items() if code in (200, 202)}
    assert len(acknowledged) == total, Counter(answers.values())

    def settled() -> bool:
        left = _outbox_items(term)
        parked = {dm for dm, status in left if status == "indeterminate"}
        delivered = set(executions(log))
        return not [s for _, s in left if s == "pending"] and acknowledged <= delivered | parked

    try:
        wait_for(settled, what="every acknowledged DM delivered or parked", timeout_s=60)
    except AssertionError:
        status = httpx.get(f"{term.url}/status", timeout=10).json()
        raise AssertionError(
            f"{Counter(s for _, s in _outbox_items(term))} delivered={len(executions(log))} "
            f"sync={status['sync']} circuits={status['circuits']} online={status['online']}\n"
            f"{term.log()[-3000:]}"
        ) from None
    drain_s = time.monotonic() - restarted_at[0]
    left = _outbox_items(term)
    parked = {dm for dm, status in left if status == "indeterminate"}
    ran = executions(log)
    assert max(ran.values()) == 1, [dm for dm, n in ran.items() if n > 1]  # none twice
    assert {status for _, status in left} <= {"indeterminate"}  # no attempt burned to death
    delivered = set(ran) - parked
    print(
        f"\nSIGKILL burst: acknowledged {len(acknowledged)}, delivered {len(delivered)}, "
        f"parked as indeterminate {len(parked)}, drained {drain_s:.1f} s after the restart"
    )
    status = httpx.get(f"{term.url}/status", timeout=10).json()
    assert sum(1 for d in status["dead_letters"] if d["indeterminate"]) == len(parked)
