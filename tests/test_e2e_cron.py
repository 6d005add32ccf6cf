"""End to end: two server processes share Redis and one schedule; each fire time runs once."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.conftest import ready_together

pytestmark = [pytest.mark.prd200, pytest.mark.e2e, pytest.mark.redis]


def wait_for_fire_seconds(log: Path, *, since: int, count: int, timeout_s: float = 60.0) -> None:
    """Poll the tick log until runs fell in ``count`` distinct seconds from ``since`` on."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        if len({s for s in (json.loads(x)["second"] for x in lines) if s >= since}) >= count:
            return
        time.sleep(0.05)
    pytest.fail(f"the tick job did not fire in {count} seconds within {timeout_s} s")


def test_two_replicas_fire_each_interval_job_once(server_factory, redis_url, tmp_path):
    log = tmp_path / "tick.log"
    schedules = tmp_path / "schedules.json"
    schedules.write_text(
        json.dumps(
            [{"id": "tick", "action": "test.tick", "params": {"log": str(log)}, "interval_sec": 1}]
        )
    )
    replicas = ready_together(
        [
            server_factory(
                name=f"r{i}", REDIS_URL=redis_url, SCHEDULES_PATH=str(schedules), ready=False
            )
            for i in range(2)
        ]
    )
    both_up = int(time.time()) + 1
    wait_for_fire_seconds(log, since=both_up, count=4)  # both replicas raced for 4 fire times
    for replica in replicas:
        replica.stop()
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    per_second = Counter(run["second"] for run in runs)
    assert len(runs) >= 3, runs
    assert max(per_second.values()) == 1, per_second
    jobs = {run["pid"] for run in runs}
    assert jobs <= {r.proc.pid for r in replicas}


def test_status_lists_jobs_with_next_run_times(server_factory, tmp_path):
    schedules = tmp_path / "schedules.json"
    schedules.write_text(
        json.dumps([{"id": "nightly", "action": "system.heartbeat", "cron": "30 2 * * *"}])
    )
    server = server_factory(name="s", SCHEDULES_PATH=str(schedules), EVERREACH_TZ="Europe/Berlin")
    status = httpx.get(f"{server.url}/status", timeout=10).json()
    jobs = {job["id"]: job for job in status["scheduler"]["jobs"]}
    assert {"daily_routine", "nightly"} <= set(jobs)
    assert jobs["nightly"]["next_run_time"].endswith("+01:00")
    assert "02:30:00" in jobs["nightly"]["next_run_time"]
