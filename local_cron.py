"""LocalCron: the built-in daily routine, this instance's schedules and the cloud's mirrored ones.

Jobs run on an APScheduler ``AsyncIOScheduler`` in ``EVERREACH_TZ`` (empty: the machine's zone)
and always go through ``route()``, so routing, fallback and the cost guard apply.

- ``daily_routine`` at ``DAILY_ROUTINE_TIME``: system.heartbeat, feedback.twitter_cycle,
  revenue.dashboard, system.heartbeat (the PRD's "heartbeat" first, to record that the run
  started, and "system.heartbeat" last, to record that it finished); a failing step does not stop
  the others. The result is published on the bus (``cron.daily_routine``) and kept for /status.
- Own schedules from ``SCHEDULES_PATH`` always fire. Mirrored schedules (the cloud's entries with
  ``"mirror": true``, fetched every ``SYNC_INTERVAL_SEC`` and cached on disk) fire in local mode
  always, in hybrid mode only while the cloud is unreachable, in cloud mode never.
- Replicas: a job fires once per fire time across all instances sharing Redis (``SET NX PX`` on
  ``everreach:cron:<job>:<fire time>``). ``interval_sec`` jobs fire on multiples of the interval
  since the Unix epoch, so every replica computes the same fire times.
- Missed runs (machine asleep): coalesced into one run if the newest missed fire time is within
  the grace time (daily routine 12 h, cron entries 1 h, interval entries one interval), else
  skipped and counted as missed. A watchdog wakes the scheduler every 30 s, because asyncio's
  timers run on the monotonic clock, which stands still while the machine sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from apscheduler.events import (
    EVENT_JOB_MISSED,
    EVENT_JOB_SUBMITTED,
    JobExecutionEvent,
    JobSubmissionEvent,
)
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

from cron_jobs import CronJob, JobOutcome, iso_or_none
from cron_lock import LOCK_PREFIX, FireTimeLock, lock_key
from envelope import Envelope, new_request_id
from errors import Env, HandlerError
from schedule_mirror import ScheduleMirror
from schedules import (
    DAILY_ROUTINE_ID,
    Schedule,
    aligned_interval_trigger,
    load_schedules,
    parse_schedules,
    schedule_trigger,
)
from sync_bus import SyncBus

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from config.hybrid_config import HybridConfig

log = logging.getLogger(__name__)

RouteFn = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]

__all__ = [
    "DAILY_ROUTINE_ID",
    "DAILY_ROUTINE_STEPS",
    "LOCK_PREFIX",
    "JobOutcome",
    "LocalCron",
    "RouteFn",
    "Schedule",
    "aligned_interval_trigger",
    "load_schedules",
    "lock_key",
    "parse_schedules",
]

DAILY_ROUTINE_STEPS = (
    "system.heartbeat",
    "feedback.twitter_cycle",
    "revenue.dashboard",
    "system.heartbeat",
)
TOPIC_DAILY_ROUTINE = "cron.daily_routine"
TOPIC_JOB_RESULT = "cron.job_result"
MIRROR_PREFIX = "cloud:"


class LocalCron:
    """Run the daily routine and the schedules through ``route()``; see the module docstring."""

    def __init__(
        self,
        config: HybridConfig,
        *,
        route: RouteFn,
        bus: SyncBus | None,
        is_cloud_reachable: Callable[[], bool],
        fetch_cloud_schedules: Callable[[], Awaitable[list[dict[str, Any]]]] | None = None,
        redis_url: str | None = None,
        redis: aioredis.Redis | None = None,
        instance_id: str | None = None,
        clock: Callable[[], datetime] | None = None,
        daily_grace_s: float = 12 * 3600.0,
        cron_grace_s: float = 3600.0,
        wake_check_s: float = 30.0,
    ) -> None:
        self.config = config
        self._route = route
        self._bus = bus
        self._is_cloud_reachable = is_cloud_reachable
        self.redis_url = redis_url or config.redis_url
        self.instance_id = instance_id or f"{socket.gethostname()}:{os.getpid()}"
        self._lock = FireTimeLock(
            instance_id=self.instance_id, redis_url=self.redis_url, redis=redis
        )
        self.tz = config.timezone()
        self._clock = clock or (lambda: datetime.now(self.tz))
        self.daily_grace_s = daily_grace_s
        self.cron_grace_s = cron_grace_s
        self.wake_check_s = wake_check_s
        self._mirror = (
            ScheduleMirror(
                fetch=fetch_cloud_schedules,
                apply=self._apply_mirrored,
                cache_path=config.data_dir / "mirrored_schedules.json",
                clock=self._clock,
                interval_s=config.sync_interval_sec,
            )
            if fetch_cloud_schedules is not None
            else None
        )
        self._jobs: dict[str, CronJob] = {}
        self._submitted: dict[str, datetime] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._scheduler: AsyncIOScheduler | None = None
        self._last_routine: dict[str, Any] | None = None
        self._closed = False
        hour, minute = (int(part) for part in config.daily_routine_time.split(":"))
        self._add(
            CronJob(
                id=DAILY_ROUTINE_ID,
                action=DAILY_ROUTINE_ID,
                params={},
                trigger=CronTrigger(hour=hour, minute=minute, timezone=self.tz),
                describe=f"daily at {config.daily_routine_time} ({self.tz})",
                grace_s=daily_grace_s,
            )
        )

    @property
    def mirroring(self) -> bool:
        """True when this instance mirrors the cloud's schedules (not on a cloud instance)."""
        return self._mirror is not None and self.config.everreach_env is not Env.CLOUD

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the schedules (a malformed file stops start-up) and start the scheduler."""
        own = await asyncio.to_thread(load_schedules, self.config.schedules_path)
        for schedule in own:
            self._add(self._job_from(schedule, mirrored=False))
        if self.mirroring and self._mirror is not None:
            await self._mirror.load_cached()
        self._lock.open()
        self._scheduler = AsyncIOScheduler(timezone=self.tz)
        self._scheduler.add_listener(self._on_event, EVENT_JOB_SUBMITTED | EVENT_JOB_MISSED)
        for job in self._jobs.values():
            self._schedule(job)
        self._scheduler.start()
        self._spawn(self._wake_loop(), "cron-wake")
        if self.mirroring and self._mirror is not None:
            self._spawn(self._mirror.run(), "cron-mirror")
        log.info("LocalCron: %d job(s), time zone %s", len(self._jobs), self.tz)

    async def close(self) -> None:
        """Stop the scheduler, cancel and await running jobs; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._lock.close()

    # -- running jobs ---------------------------------------------------------------------------

    async def daily_routine(self) -> dict[str, Any]:
        """Run the routine's steps now (each through route()) and publish the result."""
        started = self._clock()
        steps = [await self._call(action, {}) for action in DAILY_ROUTINE_STEPS]
        result = {
            "job_id": DAILY_ROUTINE_ID,
            "ok": all(step.get("ok") is True for step in steps),
            "started_at": started.isoformat(),
            "finished_at": self._clock().isoformat(),
            "steps": steps,
        }
        self._last_routine = result
        await self._publish(TOPIC_DAILY_ROUTINE, result)
        return result

    async def run_job(self, job_id: str, *, fire_time: datetime | None = None) -> dict[str, Any]:
        """Run ``job_id`` for ``fire_time`` if the mirror rule and the replica lock allow it."""
        job = self._jobs.get(job_id)
        if job is None:
            raise KeyError(f"no job {job_id!r}; jobs: {sorted(self._jobs)}")
        fire_time = fire_time or self._default_fire_time(job)
        outcome = await self._gate(job, fire_time)
        record: dict[str, Any] = {
            "job_id": job_id,
            "fire_time": fire_time.isoformat(),
            "outcome": outcome.value,
            "instance": self.instance_id,
        }
        if outcome is JobOutcome.RAN:
            if job.id == DAILY_ROUTINE_ID:
                record["result"] = await self.daily_routine()
            else:
                record["result"] = await self._call(job.action, dict(job.params))
                await self._publish(TOPIC_JOB_RESULT, record)
        self._record(job, fire_time, outcome, record.get("result"))
        return record

    async def refresh_mirrored(self) -> int:
        """Fetch the cloud's schedules now and mirror its ``mirror: true`` entries."""
        return await self._mirror.refresh() if self._mirror is not None else 0

    def snapshot(self) -> dict[str, Any]:
        """Jobs, their next run times and last results, for /status."""
        now = self._clock()
        jobs = [job.view(self._next_run_time(job, now)) for job in self._jobs.values()]
        return {
            "timezone": str(self.tz),
            "running": bool(self._scheduler and self._scheduler.running),
            "replica_lock": self._lock.kind,
            "jobs": jobs,
            "daily_routine": self._last_routine,
            "mirror": {
                "enabled": self.mirroring,
                "last_refresh_at": iso_or_none(self._mirror.refreshed_at if self._mirror else None),
                "last_error": self._mirror.last_error if self._mirror else None,
                "count": sum(1 for job in self._jobs.values() if job.mirrored),
            },
        }

    # -- internals ------------------------------------------------------------------------------

    def _job_from(self, schedule: Schedule, *, mirrored: bool) -> CronJob:
        if schedule.cron is not None:
            describe, grace_s = f"cron {schedule.cron} ({self.tz})", self.cron_grace_s
        else:
            assert schedule.interval_sec is not None
            describe = f"every {schedule.interval_sec:g} s"
            grace_s = min(schedule.interval_sec, self.cron_grace_s)
        return CronJob(
            id=(MIRROR_PREFIX if mirrored else "") + schedule.id,
            action=schedule.action,
            params=schedule.params,
            trigger=schedule_trigger(schedule, self.tz),
            describe=describe,
            grace_s=grace_s,
            mirrored=mirrored,
            schedule=schedule,
        )

    def _add(self, job: CronJob) -> None:
        old = self._jobs.get(job.id)
        if old is not None:  # keep the history of a job whose definition changed
            job.inherit(old)
        self._jobs[job.id] = job

    def _schedule(self, job: CronJob) -> None:
        if self._scheduler is None:
            return
        self._scheduler.add_job(
            self._on_fire,
            trigger=job.trigger,
            args=[job.id],
            id=job.id,
            name=job.id,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=max(1, int(job.grace_s)),
            replace_existing=True,
        )

    def _apply_mirrored(self, schedules: list[Schedule]) -> None:
        wanted = {MIRROR_PREFIX + s.id: s for s in schedules}
        for job_id in [j.id for j in self._jobs.values() if j.mirrored and j.id not in wanted]:
            del self._jobs[job_id]
            if self._scheduler is not None and self._scheduler.get_job(job_id):
                self._scheduler.remove_job(job_id)
        for job_id, schedule in wanted.items():
            current = self._jobs.get(job_id)
            if current is not None and current.schedule == schedule:
                continue
            job = self._job_from(schedule, mirrored=True)
            self._add(job)
            self._schedule(job)

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _on_event(self, event: JobSubmissionEvent | JobExecutionEvent) -> None:
        if isinstance(event, JobSubmissionEvent):
            # Dispatched after submit, before the job's coroutine first runs: its fire time.
            self._submitted[event.job_id] = event.scheduled_run_times[-1]
            return
        job = self._jobs.get(event.job_id)
        if job is not None:
            self._record(job, event.scheduled_run_time, JobOutcome.MISSED, None)
            log.warning("LocalCron: %s missed its run at %s", job.id, event.scheduled_run_time)

    async def _on_fire(self, job_id: str) -> None:
        """Called by APScheduler: hand the run to a task of ours and return at once."""
        job = self._jobs.get(job_id)
        if job is None or self._closed:
            return
        fire_time = self._submitted.pop(job_id, None) or self._default_fire_time(job)
        if job.task is not None and not job.task.done():
            self._record(job, fire_time, JobOutcome.SKIPPED_STILL_RUNNING, None)
            return
        job.task = self._spawn(self._run_logged(job_id, fire_time), f"cron:{job_id}")

    async def _run_logged(self, job_id: str, fire_time: datetime) -> dict[str, Any]:
        try:
            return await self.run_job(job_id, fire_time=fire_time)
        except Exception as exc:  # nobody awaits this task: say it here
            log.exception("LocalCron: job %s failed at %s", job_id, fire_time)
            return {"job_id": job_id, "fire_time": fire_time.isoformat(), "error": repr(exc)}

    async def _gate(self, job: CronJob, fire_time: datetime) -> JobOutcome:
        if job.mirrored:
            if self.config.everreach_env is Env.CLOUD:
                return JobOutcome.SKIPPED_CLOUD_INSTANCE
            if self.config.everreach_env is Env.HYBRID and self._is_cloud_reachable():
                return JobOutcome.SKIPPED_CLOUD_REACHABLE
        # The lock outlives the latest a replica may still fire.
        taken = await self._lock.take(job.id, fire_time, ttl_s=job.grace_s + 60)
        return JobOutcome.RAN if taken else JobOutcome.SKIPPED_OTHER_REPLICA

    async def _call(self, action: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._route(action, params)
        except Exception as exc:  # route() returns envelopes; a raise is a bug, not a stop
            log.exception("LocalCron: route(%s) raised", action)
            fault = HandlerError(f"{type(exc).__name__}: {exc}"[:300])
            return Envelope.failure(
                action, fault, source=None, request_id=new_request_id()
            ).to_dict()

    async def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        if self._bus is None:
            return
        try:
            await self._bus.publish(topic, payload)
        except Exception as exc:  # the run happened; a lost notice must not undo it
            log.warning("LocalCron: could not publish %s: %s", topic, exc)

    def _record(
        self,
        job: CronJob,
        fire_time: datetime,
        outcome: JobOutcome,
        result: dict[str, Any] | None,
    ) -> None:
        job.record(fire_time, outcome, result, now=self._clock())

    def _default_fire_time(self, job: CronJob) -> datetime:
        """The fire time a direct call stands for: the interval slot, or the current minute."""
        now = self._clock()
        schedule = job.schedule
        if schedule is not None and schedule.interval_sec is not None:
            slot = math.floor(now.timestamp() / schedule.interval_sec) * schedule.interval_sec
            return datetime.fromtimestamp(slot, self.tz)
        return now.replace(second=0, microsecond=0)

    def _next_run_time(self, job: CronJob, now: datetime) -> datetime | None:
        if self._scheduler is not None and self._scheduler.running:
            scheduled = self._scheduler.get_job(job.id)
            return scheduled.next_run_time if scheduled is not None else None
        next_time: datetime | None = job.trigger.get_next_fire_time(None, now)
        return next_time

    async def _wake_loop(self) -> None:
        while True:
            await asyncio.sleep(self.wake_check_s)
            if self._scheduler is not None and self._scheduler.running:
                self._scheduler.wakeup()
