"""ScheduleMirror: keep a copy of the cloud's ``mirror: true`` schedules, also across restarts.

The list is fetched every ``SYNC_INTERVAL_SEC`` (through the cloud client) and written to
``DATA_DIR/mirrored_schedules.json``, so a terminal that starts offline still runs what it
mirrored last. What to do with the list is the scheduler's business: it is handed to ``apply``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from errors import ConfigError
from schedules import Schedule, parse_schedules

log = logging.getLogger("local_cron")

FetchFn = Callable[[], Awaitable[list[dict[str, Any]]]]
ApplyFn = Callable[[list[Schedule]], None]


class ScheduleMirror:
    """Fetch, cache and hand over the cloud's mirrored schedules; one refresh at a time."""

    def __init__(
        self,
        *,
        fetch: FetchFn,
        apply: ApplyFn,
        cache_path: Path,
        clock: Callable[[], datetime],
        interval_s: float,
    ) -> None:
        self._fetch = fetch
        self._apply = apply
        self.cache_path = cache_path
        self._clock = clock
        self.interval_s = interval_s
        self.refreshed_at: datetime | None = None
        self.last_error: str | None = None
        self._lock = asyncio.Lock()

    async def load_cached(self) -> None:
        """Hand over the list mirrored last (empty if none, or unreadable)."""
        self._apply(await asyncio.to_thread(self._read_cache))

    async def refresh(self) -> int:
        """Fetch the cloud's schedules now; hand over and cache the ``mirror: true`` ones."""
        async with self._lock:  # one refresh at a time: an older list never wins
            fetched = await self._fetch()
            schedules = [s for s in parse_schedules(fetched, source="cloud schedules") if s.mirror]
            self._apply(schedules)
            await asyncio.to_thread(self._write_cache, schedules)
            self.refreshed_at = self._clock()
            self.last_error = None
        return len(schedules)

    async def run(self) -> None:
        """Refresh every ``interval_s`` until cancelled; a failure is kept for /status."""
        while True:
            try:
                count = await self.refresh()
                log.debug("LocalCron: mirrored %d cloud schedule(s)", count)
            except Exception as exc:  # offline is the normal case this exists for
                if self.last_error is None:
                    log.warning("LocalCron: cannot refresh the cloud's schedules: %s", exc)
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            await asyncio.sleep(self.interval_s)

    def _read_cache(self) -> list[Schedule]:
        try:
            data = json.loads(self.cache_path.read_text(encoding="utf-8"))
            return parse_schedules(data, source=str(self.cache_path))
        except FileNotFoundError:
            return []
        except (OSError, ValueError, ConfigError) as exc:
            log.warning("LocalCron: ignoring the mirrored-schedules cache: %s", exc)
            return []

    def _write_cache(self, schedules: list[Schedule]) -> None:
        path = self.cache_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # writers never share it
        tmp.write_text(json.dumps([s.to_dict() for s in schedules], indent=2), encoding="utf-8")
        tmp.replace(path)
