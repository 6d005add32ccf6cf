"""plan() and admits(): the routing ladder as one table, with no parts and no I/O."""

from __future__ import annotations

from dataclasses import replace

import pytest

from action_classifier import ActionKind
from errors import (
    ActionError,
    CircuitOpen,
    CloudTimeout,
    CloudUnavailable,
    CostCapReached,
    Env,
    HandlerError,
    Indeterminate,
    InvalidParams,
    Offline,
    Unauthorized,
    UnknownAction,
)
from route_plan import After, RouteState, StepKind, admits, carries_stale, plan
from route_table import Fallback, Preferred, Route

# Routes by what matters to the ladder: where they prefer to run, their fallback, side effects.
CLOUD_READ = Route(Preferred.CLOUD, Fallback.LOCAL, side_effect=False)
CLOUD_SEND = Route(Preferred.CLOUD, Fallback.LOCAL, side_effect=True)
CLOUD_ONLY = Route(Preferred.CLOUD, Fallback.NONE, side_effect=True)
LOCAL_READ = Route(Preferred.LOCAL, Fallback.CLOUD, side_effect=False)
LOCAL_ONLY = Route(Preferred.LOCAL, Fallback.NONE, side_effect=False)
AUTO_READ = Route(Preferred.AUTO, Fallback.LOCAL, side_effect=False)

HYBRID = RouteState(env=Env.HYBRID, has_local=True, cloud=True, cache=True, outbox=True)
OFFLINE = replace(HYBRID, offline_reason="OFFLINE_MODE=true")

L, C, S = StepKind.LOCAL, StepKind.CLOUD, StepKind.SERVE
LF, CA, OB = StepKind.LOCAL_FALLBACK, StepKind.CACHE, StepKind.OUTBOX

# (name, route, state, env, ladder, cost_guard_triggered, offline, stale_ok)
CASES = [
    ("hybrid read goes to the cloud, then falls back", CLOUD_READ, HYBRID, Env.CLOUD,
     (C, L, LF, CA), False, False, True),
    ("hybrid side effect: cloud, hard-cap local, fallback, outbox", CLOUD_SEND, HYBRID, Env.CLOUD,
     (C, L, LF, OB), False, False, False),
    ("no fallback_env: no local fallback", CLOUD_ONLY, HYBRID, Env.CLOUD,
     (C, L, OB), False, False, False),
    ("no local handler: cloud, then cache", CLOUD_READ, replace(HYBRID, has_local=False),
     Env.CLOUD, (C, CA), False, False, True),
    ("local-preferred may go to the cloud, then cache", LOCAL_READ, HYBRID, Env.LOCAL,
     (L, C, CA), False, False, True),
    ("local-preferred offline: local only", LOCAL_READ, OFFLINE, Env.LOCAL,
     (L,), False, False, False),
    ("local-only action: local only", LOCAL_ONLY, HYBRID, Env.LOCAL, (L,), False, False, False),
    ("auto + compute: local", AUTO_READ, replace(HYBRID, kind=ActionKind.COMPUTE), Env.LOCAL,
     (L,), False, False, False),
    ("auto + api: cloud", AUTO_READ, replace(HYBRID, kind=ActionKind.API), Env.CLOUD,
     (C, L, LF, CA), False, False, True),
    ("soft cap with a local handler: local", CLOUD_READ, replace(HYBRID, soft_cap=True),
     Env.LOCAL, (L,), True, False, False),
    ("soft cap without a local handler: cloud",
     CLOUD_READ, replace(HYBRID, soft_cap=True, has_local=False), Env.CLOUD, (C, CA),
     False, False, True),
    ("offline read: fallback, then cache", CLOUD_READ, OFFLINE, Env.CLOUD, (LF, CA),
     False, True, True),
    ("offline side effect: fallback, then outbox", CLOUD_SEND, OFFLINE, Env.CLOUD, (LF, OB),
     False, True, False),
    ("force_env local in hybrid: local, no cloud after it", LOCAL_READ,
     replace(HYBRID, force_env="local"), Env.LOCAL, (L,), False, False, False),
    ("force_env cloud in hybrid: still falls back, never hard-cap local", CLOUD_READ,
     replace(HYBRID, force_env="cloud"), Env.CLOUD, (C, LF, CA), False, False, True),
    ("env=cloud with an endpoint: the cloud alone", CLOUD_READ, replace(HYBRID, env=Env.CLOUD),
     Env.CLOUD, (C,), False, False, False),
    ("env=cloud with an endpoint, offline: fallbacks", CLOUD_READ,
     replace(OFFLINE, env=Env.CLOUD), Env.CLOUD, (LF, CA), False, True, True),
    ("the cloud itself serves", CLOUD_READ,
     RouteState(env=Env.CLOUD, has_local=True, serving_cloud=True), Env.CLOUD, (S,),
     False, False, False),
    ("env=local: local whatever the table says", CLOUD_SEND,
     RouteState(env=Env.LOCAL, has_local=True), Env.LOCAL, (L,), False, False, False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("route", "state", "env", "ladder", "triggered", "offline", "stale_ok"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_plan_gives_the_ladder_of_the_rules(
    route: Route,
    state: RouteState,
    env: Env,
    ladder: tuple[StepKind, ...],
    triggered: bool,
    offline: bool,
    stale_ok: bool,
) -> None:
    got = plan("some.action", route, state)
    assert got.env is env
    assert tuple(step.kind for step in got.steps) == ladder
    assert got.cost_guard_triggered is triggered
    assert (got.offline_detail is not None) is offline
    assert got.stale_ok is stale_ok
    assert all(step.reason for step in got.steps)
    assert got.steps[0].after is (After.CLOUD_FAILED if offline else After.START)


def test_offline_detail_names_the_reason_and_the_action() -> None:
    assert plan("dm.send", CLOUD_SEND, OFFLINE).offline_detail == (
        "OFFLINE_MODE=true; dm.send needs the cloud"
    )


@pytest.mark.parametrize("force_env", ["both", "", "LOCAL"])
def test_a_bad_force_env_is_invalid_params(force_env: str) -> None:
    with pytest.raises(InvalidParams, match="force_env"):
        plan("dm.send", CLOUD_SEND, replace(HYBRID, force_env=force_env))


def test_force_env_cloud_without_a_cloud_is_invalid_params() -> None:
    state = RouteState(env=Env.LOCAL, has_local=True, force_env="cloud")
    with pytest.raises(InvalidParams, match="no cloud is configured"):
        plan("dm.send", CLOUD_SEND, state)


# (step kind, step after, route, cause, cause kind, admitted)
ADMITS = [
    (L, After.START, CLOUD_READ, None, None, True),
    (L, After.START, CLOUD_READ, HandlerError("x"), L, False),
    (C, After.LOCAL_FAILED, LOCAL_READ, HandlerError("x"), L, True),
    (C, After.LOCAL_FAILED, CLOUD_SEND, HandlerError("x"), L, False),
    (C, After.LOCAL_FAILED, CLOUD_SEND, CircuitOpen("x"), L, True),
    (L, After.COST_CAP, CLOUD_READ, CostCapReached("x"), C, True),
    (L, After.COST_CAP, CLOUD_READ, CloudTimeout("x"), C, False),
    (L, After.COST_CAP, CLOUD_READ, CostCapReached("x"), L, False),
    (LF, After.CLOUD_FAILED, CLOUD_READ, CloudTimeout("x"), C, True),
    (LF, After.CLOUD_FAILED, CLOUD_SEND, CloudTimeout("x"), C, False),
    (LF, After.CLOUD_FAILED, CLOUD_SEND, CloudUnavailable("x", never_ran=True), C, True),
    (LF, After.CLOUD_FAILED, CLOUD_SEND, Offline("x"), C, True),
    (LF, After.CLOUD_FAILED, CLOUD_READ, Unauthorized("x"), C, False),
    (LF, After.CLOUD_FAILED, CLOUD_READ, InvalidParams("x"), C, False),
    (LF, After.CLOUD_FAILED, CLOUD_READ, CostCapReached("x"), C, False),
    (LF, After.CLOUD_FAILED, LOCAL_READ, HandlerError("x"), L, False),
    (CA, After.CLOUD_FAILED, CLOUD_READ, CloudTimeout("x"), C, True),
    (CA, After.CLOUD_FAILED, CLOUD_READ, Unauthorized("x"), C, False),
    (OB, After.CLOUD_FAILED, CLOUD_SEND, CloudTimeout("x"), C, True),
    (OB, After.CLOUD_FAILED, CLOUD_SEND, Indeterminate("x"), C, True),
    (OB, After.CLOUD_FAILED, CLOUD_SEND, UnknownAction("x"), C, False),
    (OB, After.CLOUD_FAILED, CLOUD_SEND, HandlerError("x"), C, False),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "after", "route", "cause", "cause_kind", "admitted"), ADMITS)
def test_admits_lets_a_step_answer_only_its_own_failure(
    kind: StepKind,
    after: After,
    route: Route,
    cause: ActionError | None,
    cause_kind: StepKind | None,
    admitted: bool,
) -> None:
    step = plan("x.y", CLOUD_READ, HYBRID).steps[0]
    step = replace(step, kind=kind, after=after)
    assert admits(step, route, cause, cause_kind) is admitted


@pytest.mark.parametrize(
    ("cause", "cause_kind", "carries"),
    [
        (CloudTimeout("x"), C, True),
        (Offline("x"), C, True),
        (Unauthorized("x"), C, False),
        (CostCapReached("x"), C, False),
        (HandlerError("x"), L, False),
    ],
)
def test_only_a_cloud_failure_carries_the_stale_entry(
    cause: ActionError, cause_kind: StepKind, carries: bool
) -> None:
    assert carries_stale(plan("x.y", CLOUD_READ, HYBRID), cause, cause_kind) is carries


def test_a_plan_asked_again_is_the_same_and_a_refusal_raises_again() -> None:
    import route_plan

    for route, state in [(CLOUD_READ, HYBRID), (CLOUD_SEND, OFFLINE), (LOCAL_READ, HYBRID)]:
        first = plan("again.read", route, replace(state))
        assert plan("again.read", route, replace(state)) == first
        assert first == route_plan._plan("again.read", route, state)
    # the offline detail names the action it was planned for, not one planned before
    assert plan("again.other", CLOUD_SEND, OFFLINE).offline_detail == (
        "OFFLINE_MODE=true; again.other needs the cloud"
    )
    for _ in range(2):
        with pytest.raises(InvalidParams, match="force_env"):
            plan("again.read", CLOUD_READ, replace(HYBRID, force_env="moon"))
