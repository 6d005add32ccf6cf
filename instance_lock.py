"""InstanceLock: notice a second live instance on the same DATA_DIR.

Two instances on one data directory share its SQLite files: the cloud's ``/status`` then shows
the terminal's spend, cache and outbox. That is a mistake to point out, not a reason to refuse
to start (the files themselves stay consistent: SQLite locks them), so the second instance warns.

The first instance holds an exclusive ``flock`` on ``DATA_DIR/instance.lock`` and writes its pid,
host and port into it. The kernel drops the lock when the process dies, however it dies, so a
stale file left by a killed instance never causes a false warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock; the check is skipped
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = "instance.lock"


class InstanceLock:
    """An exclusive, advisory lock on ``DATA_DIR/instance.lock`` naming its holder."""

    def __init__(self, data_dir: Path, *, host: str, port: int) -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self.host = host
        self.port = port
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> dict[str, Any] | None:
        """Take the lock; return ``None``, or what the live instance holding it wrote."""
        if fcntl is None or self._fd is not None:
            return None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            return holder
        except BaseException:
            os.close(fd)
            raise
        me = {"pid": os.getpid(), "host": self.host, "port": self.port, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        """Give the lock up (idempotent); the file stays, it is rewritten by the next holder."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the descriptor drops the flock


def _read_holder(fd: int) -> dict[str, Any]:
    raw = os.pread(fd, 4096, 0)
    try:
        holder = json.loads(raw)
    except ValueError:
        holder = None
    return holder if isinstance(holder, dict) else {"pid": None}
