"""CronJob: one scheduled job of ``LocalCron`` and its run history, as /status shows it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from apscheduler.triggers.base import BaseTrigger

from schedules import Schedule


class JobOutcome(StrEnum):
    """What happened at one fire time of a job."""

    RAN = "ran"
    SKIPPED_CLOUD_REACHABLE = "skipped_cloud_reachable"  # mirrored job; the cloud runs it
    SKIPPED_CLOUD_INSTANCE = "skipped_cloud_instance"  # mirrored job on an env=cloud instance
    SKIPPED_OTHER_REPLICA = "skipped_other_replica"  # another instance holds the fire-time lock
    SKIPPED_STILL_RUNNING = "skipped_still_running"  # the previous run has not finished
    MISSED = "missed"  # the machine was away longer than the grace time


@dataclass(eq=False)
class CronJob:
    """A job's definition (trigger, grace time) and what its fire times did so far."""

    id: str
    action: str
    params: dict[str, Any]
    trigger: BaseTrigger
    describe: str
    grace_s: float
    mirrored: bool = False
    schedule: Schedule | None = None
    runs: int = 0
    skips: int = 0
    missed: int = 0
    last_fire_time: datetime | None = None
    last_outcome: JobOutcome | None = None
    last_run_at: datetime | None = None
    last_result: dict[str, Any] | None = None
    task: asyncio.Task[dict[str, Any]] | None = field(default=None, repr=False)

    def inherit(self, old: CronJob) -> None:
        """Keep the history (and running task) of ``old``, whose definition this replaces."""
        self.runs, self.skips, self.missed = old.runs, old.skips, old.missed
        self.last_fire_time, self.last_outcome = old.last_fire_time, old.last_outcome
        self.last_run_at, self.last_result, self.task = old.last_run_at, old.last_result, old.task

    def record(
        self,
        fire_time: datetime,
        outcome: JobOutcome,
        result: dict[str, Any] | None,
        *,
        now: datetime,
    ) -> None:
        """Count what fire time ``fire_time`` did."""
        self.last_fire_time, self.last_outcome = fire_time, outcome
        if outcome is JobOutcome.RAN:
            self.runs += 1
            self.last_run_at, self.last_result = now, result
        elif outcome is JobOutcome.MISSED:
            self.missed += 1
        else:
            self.skips += 1

    def view(self, next_run_time: datetime | None) -> dict[str, Any]:
        """The job as /status lists it."""
        return {
            "id": self.id,
            "action": self.action,
            "trigger": self.describe,
            "next_run_time": iso_or_none(next_run_time),
            "mirrored": self.mirrored,
            "runs": self.runs,
            "skips": self.skips,
            "missed": self.missed,
            "last_fire_time": iso_or_none(self.last_fire_time),
            "last_outcome": self.last_outcome.value if self.last_outcome else None,
            "last_run_at": iso_or_none(self.last_run_at),
            "last_result": result_summary(self.last_result),
        }


def iso_or_none(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def result_summary(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of a run's result /status shows: outcome fields, not the payload."""
    if result is None:
        return None
    keys = ("action", "ok", "source", "error", "detail", "duration_ms")
    summary = {key: result[key] for key in keys if key in result}
    if "steps" in result:
        summary["steps"] = [result_summary(step) for step in result["steps"]]
    return summary
