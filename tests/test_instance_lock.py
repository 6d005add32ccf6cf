"""InstanceLock: a second live instance on one DATA_DIR is noticed, a dead one is not."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from instance_lock import InstanceLock
from tests.conftest import free_port

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows")


def test_the_first_instance_holds_the_lock_and_a_second_sees_it(tmp_path: Path) -> None:
    first = InstanceLock(tmp_path, host="127.0.0.1", port=8080)
    second = InstanceLock(tmp_path, host="127.0.0.1", port=8081)
    assert first.acquire() is None and first.held
    holder = second.acquire()
    assert not second.held
    assert holder is not None and (holder["pid"], holder["port"]) == (os.getpid(), 8080)
    first.release()
    first.release()
    assert second.acquire() is None and second.held
    second.release()


@pytest.mark.process
def test_a_killed_holder_leaves_no_false_warning(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from instance_lock import InstanceLock; "
        f"InstanceLock(Path({str(tmp_path)!r}), host='h', port=1).acquire(); "
        "print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert InstanceLock(tmp_path, host="h", port=2).acquire() == {
            "pid": holder.pid,
            "host": "h",
            "port": 1,
            "since": pytest.approx(time.time(), abs=60),
        }
    finally:
        holder.kill()
        holder.wait()
    lock = InstanceLock(tmp_path, host="h", port=2)
    assert lock.acquire() is None and lock.held  # the stale file is not a live instance
    lock.release()


@pytest.mark.e2e
def test_a_second_server_on_the_same_data_dir_warns_and_still_serves(server_factory, tmp_path):
    data_dir = str(tmp_path / "shared-data")
    port = free_port()
    first = server_factory(name="first", port=port, DATA_DIR=data_dir, PORT=str(port))
    second = server_factory(name="second", DATA_DIR=data_dir)
    assert httpx.get(f"{first.url}/health").json()["data_dir_shared_with"] is None
    shared = httpx.get(f"{second.url}/health").json()["data_dir_shared_with"]
    assert first.proc is not None
    assert (shared["pid"], shared["port"]) == (first.proc.pid, first.port)
    assert httpx.get(f"{second.url}/status").json()["data_dir_shared_with"] == shared
    assert "is in use by another live instance" in second.log()
