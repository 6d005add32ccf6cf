"""The routing ladder of one call: which steps to try, in which order, and why.

``plan(action, route, state)`` is pure: it reads the action's route-table entry and a snapshot of
the instance (``RouteState``) and returns a ``Plan``, an ordered ladder drawn from
local -> cloud -> local_fallback -> cache -> outbox. The orchestrator walks it once, top to
bottom; each step names the failure it answers (``After``), and ``admits`` says whether the
failure at hand is that one. The rules:

1. ``force_env`` ('local' | 'cloud') wins; anything else is ``invalid_params``.
2. ``EVERREACH_ENV`` local or cloud: that env, always.
3. hybrid: the route table's ``preferred_env``; ``auto`` asks the classifier.
4. at the soft cap, hybrid actions with a local handler go local (``cost_guard_triggered``);
   at the hard cap no cloud call is made: a hybrid action with a local handler runs here.
5. offline: local handler, else a fresh cache entry, else the outbox for side effects, else
   ``offline`` with the stale entry under ``cached``.
6. cloud failure (hybrid): read-only actions fall back like rule 5; a side-effect action runs
   locally only when the failure proves the cloud never ran it, else it goes to the outbox.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from action_classifier import ActionKind
from errors import (
    ActionError,
    CostCapReached,
    Env,
    HandlerError,
    InvalidParams,
    RateLimited,
    Source,
    Unauthorized,
    UnknownAction,
)
from frozen_init import fast_init
from route_table import Fallback, Preferred, Route

# Answers that are definite: replaying them from the outbox would only fail the same way.
_DEFINITE = (UnknownAction, InvalidParams, Unauthorized, HandlerError)
# A wrong key, or params the cloud refused: a configuration error to see now, not to paper
# over with a local run, a cache entry or the outbox.
_NO_FALLBACK = (Unauthorized, InvalidParams, CostCapReached)


class StepKind(StrEnum):
    """What a step of the ladder does."""

    LOCAL = "local"  # run the local handler
    SERVE = "serve"  # run the local handler as the cloud (this instance is the cloud)
    CLOUD = "cloud"  # call the cloud, inside the cost cap
    LOCAL_FALLBACK = "local_fallback"  # the cloud failed or is offline: run the local handler
    CACHE = "cache"  # the cloud failed or is offline: a fresh cache entry
    OUTBOX = "outbox"  # the cloud failed or is offline: queue the side effect for later


class After(StrEnum):
    """The failure a step answers; the first step answers none."""

    START = "start"
    LOCAL_FAILED = "local_failed"  # the local handler failed without a side effect done
    COST_CAP = "cost_cap"  # the cloud call was refused by the cost cap
    CLOUD_FAILED = "cloud_failed"  # the cloud failed, or is offline


@fast_init
@dataclass(frozen=True, slots=True)
class Step:
    """One rung of the ladder: what to do, the envelope source it gives, and why it is here."""

    kind: StepKind
    source: Source
    after: After
    reason: str


@fast_init
@dataclass(frozen=True, slots=True)
class RouteState:
    """What ``plan`` needs to know about the instance at the time of the call."""

    env: Env
    force_env: str | None = None
    kind: ActionKind | None = None  # the classifier's answer, for ``auto`` routes
    has_local: bool = False
    cloud: bool = False  # a cloud is configured
    serving_cloud: bool = False  # this instance is the cloud (env=cloud, no CLOUD_ENDPOINT)
    offline_reason: str | None = None  # why the cloud cannot be used now; None when online
    soft_cap: bool = False
    cache: bool = False
    outbox: bool = False


@fast_init
@dataclass(frozen=True, slots=True)
class Plan:
    """Where the call goes (``env``) and the ladder of steps that serve it."""

    env: Env
    steps: tuple[Step, ...]
    cost_guard_triggered: bool = False
    # Set when the cloud is skipped up front: the ladder starts from this Offline detail.
    offline_detail: str | None = None
    # A final cloud failure carries the stale cache entry, if there is one.
    stale_ok: bool = False


def select_env(route: Route, state: RouteState) -> tuple[Env, bool]:
    """(env, cost_guard_triggered) by rules 1-4."""
    force_env = state.force_env
    if force_env is not None:
        if force_env not in ("local", "cloud"):
            raise InvalidParams(
                f"force_env must be 'local' or 'cloud' (or left out); got {force_env!r}"
            )
        return Env(force_env), False
    if state.env is not Env.HYBRID:
        return state.env, False
    if route.preferred_env is Preferred.LOCAL:
        return Env.LOCAL, False
    if route.preferred_env is Preferred.AUTO and state.kind is ActionKind.COMPUTE:
        return Env.LOCAL, False
    if state.soft_cap and state.has_local:
        return Env.LOCAL, True
    return Env.CLOUD, False


def plan(action: str, route: Route, state: RouteState) -> Plan:
    """The ladder for one call of ``action``; raises ``InvalidParams`` for a call that cannot go."""
    # A plan depends on nothing but these three, all immutable, and an instance sees few
    # combinations of them: each is worked out once (a lookup of ~1.2 µs instead of ~2.8 µs of
    # steps and text per call, timeit). A refusal is not kept: it raises every time.
    key = (action, route, state)
    found = _PLANS.get(key)
    if found is None:
        found = _plan(action, route, state)
        if len(_PLANS) < _MAX_PLANS:
            _PLANS[key] = found
    return found


_PLANS: dict[tuple[str, Route, RouteState], Plan] = {}
_MAX_PLANS = 4096


def _plan(action: str, route: Route, state: RouteState) -> Plan:
    env, triggered = select_env(route, state)
    hybrid = state.env is Env.HYBRID and state.force_env is None
    if env is Env.LOCAL:
        steps = [Step(StepKind.LOCAL, Source.LOCAL, After.START, f"{env_reason(state)}: local")]
        if (
            hybrid
            and route.fallback_env is Fallback.CLOUD
            and state.cloud
            and not state.offline_reason
        ):
            steps.append(
                Step(StepKind.CLOUD, Source.CLOUD, After.LOCAL_FAILED, "fallback_env is cloud")
            )
            steps += _without_cloud(route, state, local_tried=True)
        return Plan(env, tuple(steps), triggered, stale_ok=_stale_ok(route, state, len(steps) > 1))
    if not state.cloud:
        if state.serving_cloud:
            serve = Step(StepKind.SERVE, Source.CLOUD, After.START, "this instance is the cloud")
            return Plan(env, (serve,), triggered)
        # Only force_env='cloud' gets here: the caller asked for what this instance lacks.
        raise InvalidParams(
            "no cloud is configured: set CLOUD_ENDPOINT and EVERREACH_CLOUD_KEY, or run "
            "the action with force_env='local'"
        )
    if state.offline_reason:
        steps = _without_cloud(route, state, local_tried=False)
        detail = f"{state.offline_reason}; {action} needs the cloud"
        return Plan(env, tuple(steps), triggered, detail, _stale_ok(route, state, True))
    steps = [Step(StepKind.CLOUD, Source.CLOUD, After.START, f"{env_reason(state)}: cloud")]
    if hybrid and state.has_local:
        steps.append(Step(StepKind.LOCAL, Source.LOCAL, After.COST_CAP, "the hard cap is reached"))
    if state.env is Env.HYBRID:
        steps += _without_cloud(route, state, local_tried=False)
    return Plan(env, tuple(steps), triggered, stale_ok=_stale_ok(route, state, len(steps) > 1))


def env_reason(state: RouteState) -> str:
    """Why the call goes where it goes, in a few words (rules 1-3)."""
    if state.force_env is not None:
        return "force_env"
    if state.env is not Env.HYBRID:
        return "EVERREACH_ENV"
    return "route table"


def _without_cloud(route: Route, state: RouteState, *, local_tried: bool) -> list[Step]:
    """Rules 5 and 6: the steps after a cloud failure (or with the cloud offline)."""
    steps: list[Step] = []
    if not local_tried and route.fallback_env is not Fallback.NONE and state.has_local:
        steps.append(
            Step(
                StepKind.LOCAL_FALLBACK, Source.LOCAL_FALLBACK, After.CLOUD_FAILED, "local handler"
            )
        )
    if not route.side_effect and state.cache:
        steps.append(Step(StepKind.CACHE, Source.CACHE, After.CLOUD_FAILED, "read-only: cache"))
    if route.side_effect and state.outbox:
        steps.append(
            Step(StepKind.OUTBOX, Source.OUTBOX, After.CLOUD_FAILED, "side effect: outbox")
        )
    return steps


def _stale_ok(route: Route, state: RouteState, fallbacks: bool) -> bool:
    return fallbacks and not route.side_effect and state.cache


def admits(
    step: Step, route: Route, cause: ActionError | None, cause_kind: StepKind | None
) -> bool:
    """Does ``step`` answer the failure at hand (``cause``, raised by a ``cause_kind`` step)?"""
    if step.after is After.START:
        return cause is None
    if cause is None:
        return False
    if step.after is After.LOCAL_FAILED:
        return cause_kind is StepKind.LOCAL and (cause.never_ran or not route.side_effect)
    if cause_kind is not StepKind.CLOUD:
        return False
    if step.after is After.COST_CAP:
        return isinstance(cause, CostCapReached)
    if isinstance(cause, _NO_FALLBACK):
        return False
    if step.kind is StepKind.LOCAL_FALLBACK:
        # Over the cloud's rate limit, a side effect waits for its slot: running it here
        # instead would pass the limit the cloud keeps.
        limited = isinstance(cause, RateLimited)
        return (cause.never_ran and not limited) or not route.side_effect
    if step.kind is StepKind.OUTBOX:
        return not isinstance(cause, _DEFINITE)
    return True


def carries_stale(plan: Plan, cause: ActionError, cause_kind: StepKind | None) -> bool:
    """Does the final failure carry the stale cache entry?"""
    return plan.stale_ok and cause_kind is StepKind.CLOUD and not isinstance(cause, _NO_FALLBACK)
