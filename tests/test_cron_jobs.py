"""cron_jobs: a job's run history (record, inherit) and the view /status shows."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from apscheduler.triggers.interval import IntervalTrigger

from cron_jobs import CronJob, JobOutcome, iso_or_none, result_summary

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _job(job_id: str = "j1") -> CronJob:
    return CronJob(
        id=job_id,
        action="system.heartbeat",
        params={},
        trigger=IntervalTrigger(seconds=60, timezone=UTC),
        describe="every 60s",
        grace_s=30.0,
    )


def test_new_job_has_no_history() -> None:
    view = _job().view(None)
    assert view == {
        "id": "j1",
        "action": "system.heartbeat",
        "trigger": "every 60s",
        "next_run_time": None,
        "mirrored": False,
        "runs": 0,
        "skips": 0,
        "missed": 0,
        "last_fire_time": None,
        "last_outcome": None,
        "last_run_at": None,
        "last_result": None,
    }


def test_a_run_counts_and_keeps_its_time_and_result() -> None:
    job = _job()
    now = T0 + timedelta(seconds=2)
    job.record(T0, JobOutcome.RAN, {"action": "a.b", "ok": True}, now=now)
    assert (job.runs, job.skips, job.missed) == (1, 0, 0)
    assert job.last_fire_time == T0 and job.last_run_at == now
    assert job.last_outcome is JobOutcome.RAN
    assert job.last_result == {"action": "a.b", "ok": True}


@pytest.mark.parametrize(
    "outcome",
    [
        JobOutcome.SKIPPED_CLOUD_REACHABLE,
        JobOutcome.SKIPPED_CLOUD_INSTANCE,
        JobOutcome.SKIPPED_OTHER_REPLICA,
        JobOutcome.SKIPPED_STILL_RUNNING,
    ],
)
def test_every_skip_counts_as_a_skip_and_keeps_the_last_run(outcome: JobOutcome) -> None:
    job = _job()
    job.record(T0, JobOutcome.RAN, {"ok": True}, now=T0)
    later = T0 + timedelta(minutes=1)
    job.record(later, outcome, {"ignored": True}, now=later)
    assert (job.runs, job.skips, job.missed) == (1, 1, 0)
    assert job.last_fire_time == later and job.last_outcome is outcome
    assert job.last_run_at == T0 and job.last_result == {"ok": True}  # the run, not the skip


def test_a_missed_fire_time_counts_as_missed() -> None:
    job = _job()
    job.record(T0, JobOutcome.MISSED, None, now=T0)
    assert (job.runs, job.skips, job.missed) == (0, 0, 1)
    assert job.view(None)["last_outcome"] == "missed"
    assert job.last_run_at is None


async def test_inherit_keeps_the_history_and_the_running_task() -> None:
    old = _job()
    old.record(T0, JobOutcome.RAN, {"ok": True}, now=T0)
    old.record(T0 + timedelta(minutes=1), JobOutcome.MISSED, None, now=T0)
    old.record(T0 + timedelta(minutes=2), JobOutcome.SKIPPED_OTHER_REPLICA, None, now=T0)
    old.task = asyncio.get_running_loop().create_task(asyncio.sleep(0, result={}))
    new = _job()
    new.action = "system.echo"
    new.inherit(old)
    assert (new.runs, new.skips, new.missed) == (1, 1, 1)
    assert new.last_fire_time == T0 + timedelta(minutes=2)
    assert new.last_outcome is JobOutcome.SKIPPED_OTHER_REPLICA
    assert (new.last_run_at, new.last_result) == (T0, {"ok": True})
    assert new.task is old.task
    assert new.action == "system.echo"  # the definition is the new one
    await new.task


def test_view_shows_iso_times_and_the_outcome_value() -> None:
    job = _job()
    job.mirrored = True
    job.record(T0, JobOutcome.RAN, {"ok": True, "data": {"big": "x" * 100}}, now=T0)
    view = job.view(T0 + timedelta(minutes=1))
    assert view["next_run_time"] == "2026-01-02T03:05:05+00:00"
    assert view["last_fire_time"] == view["last_run_at"] == "2026-01-02T03:04:05+00:00"
    assert view["last_outcome"] == "ran"
    assert view["mirrored"] is True
    assert view["last_result"] == {"ok": True}  # not the payload


def test_result_summary_keeps_outcome_fields_and_summarises_steps() -> None:
    result = {
        "action": "a.b",
        "ok": False,
        "source": "local",
        "error": "HandlerError",
        "detail": "boom",
        "duration_ms": 12,
        "data": {"secret": 1},
        "steps": [{"action": "c.d", "ok": True, "data": [1, 2]}, {"ok": False, "extra": 1}],
    }
    assert result_summary(result) == {
        "action": "a.b",
        "ok": False,
        "source": "local",
        "error": "HandlerError",
        "detail": "boom",
        "duration_ms": 12,
        "steps": [{"action": "c.d", "ok": True}, {"ok": False}],
    }


def test_result_summary_of_nothing_is_none() -> None:
    assert result_summary(None) is None
    assert result_summary({}) == {}


def test_iso_or_none() -> None:
    assert iso_or_none(None) is None
    assert iso_or_none(T0) == "2026-01-02T03:04:05+00:00"


def test_outcomes_are_their_status_strings() -> None:
    assert {o.value for o in JobOutcome} == {
        "ran",
        "skipped_cloud_reachable",
        "skipped_cloud_instance",
        "skipped_other_replica",
        "skipped_still_running",
        "missed",
    }
