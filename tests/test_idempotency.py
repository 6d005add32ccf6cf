"""IdempotencyStore on real SQLite files: claim states, release, lease takeover, wait, reopen."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from idempotency import (
    Claim,
    ClaimState,
    Holder,
    IdempotencyStore,
    KeyState,
    _proc_start,
    current_holder,
)
from params_digest import params_hash
from tests.conftest import until

pytestmark = pytest.mark.prd200

LEASE_S = 600.0
HASH_A = params_hash({"to": "ann"})
HASH_B = params_hash({"to": "bob"})


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class CountingStore(IdempotencyStore):
    """Counts ``claim()`` calls, so a test can tell that a waiter has polled."""

    claims = 0

    async def claim(
        self, key: str, action: str, params_hash: str, rerun_if_dead: bool = False
    ) -> Claim:
        self.claims += 1
        return await super().claim(key, action, params_hash, rerun_if_dead)


OpenStore = Callable[..., Awaitable[CountingStore]]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def open_store(tmp_path: Path, clock: Clock) -> AsyncIterator[OpenStore]:
    """Open stores on one file (as separate server processes would); close them afterwards."""
    opened: list[IdempotencyStore] = []

    async def factory(**options: Any) -> CountingStore:
        options.setdefault("lease_s", LEASE_S)
        options.setdefault("clock", clock)
        store = CountingStore(tmp_path / "data" / "hybrid.sqlite3", **options)
        await store.open()
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()


async def test_a_new_key_is_claimed(open_store: OpenStore) -> None:
    store = await open_store()
    claim = await store.claim("k1", "dm.send", HASH_A)
    assert claim == Claim(ClaimState.NEW)
    assert await store.size() == 1


async def test_claims_made_at_once_share_a_transaction_and_still_give_one_key_once(
    open_store: OpenStore,
) -> None:
    first, second = await open_store(), await open_store()
    same = [store.claim("same-key", "dm.send", HASH_A) for store in (first, second) * 5]
    others = [first.claim(f"key-{i}", "dm.send", HASH_A) for i in range(40)]
    claims = await asyncio.gather(*same, *others)
    states = [claim.state for claim in claims[: len(same)]]
    assert states.count(ClaimState.NEW) == 1 and states.count(ClaimState.RUNNING) == 9
    assert all(claim.state is ClaimState.NEW for claim in claims[len(same) :])
    await asyncio.gather(*(first.complete(f"key-{i}", 200, {"n": i}) for i in range(40)))
    replays = await asyncio.gather(
        *(second.claim(f"key-{i}", "dm.send", HASH_A) for i in range(40))
    )
    assert [claim.body for claim in replays] == [{"n": i} for i in range(40)]


async def test_only_the_keys_of_actions_that_may_run_again_go_without_an_fsync(
    open_store: OpenStore,
) -> None:
    # A side effect's claim and answer are fsync'd before the handler runs and before the
    # answer goes out; an idempotent action's (claimed with rerun_if_dead) are not: losing
    # them to a power cut lets the read run again, which its key allows once its holder died.
    store = await open_store()
    statements: list[str] = []
    await store._db.run(lambda conn: conn.set_trace_callback(statements.append))

    async def relaxed(step: Awaitable[Any]) -> bool:
        statements.clear()
        await step
        return "PRAGMA synchronous=NORMAL" in statements

    assert await relaxed(store.claim("read", "research.keyword", HASH_A, rerun_if_dead=True))
    assert await relaxed(store.complete("read", 200, {"ok": True}))
    assert await relaxed(store.claim("read-2", "research.keyword", HASH_A, rerun_if_dead=True))
    assert await relaxed(store.release("read-2"))
    assert not await relaxed(store.claim("dm", "dm.send", HASH_A))
    assert not await relaxed(store.complete("dm", 200, {"ok": True}))
    assert not await relaxed(store.claim("dm-2", "dm.send", HASH_A))
    assert not await relaxed(store.release("dm-2"))
    assert store._rerunnable == set()  # nothing kept once each key's outcome is written
    replay = await store.claim("read", "research.keyword", HASH_A, rerun_if_dead=True)
    assert replay.state is ClaimState.DONE and replay.body == {"ok": True}


async def test_a_key_being_run_is_running_for_a_second_caller(open_store: OpenStore) -> None:
    first, second = await open_store(), await open_store()
    assert (await first.claim("k1", "dm.send", HASH_A)).state is ClaimState.NEW
    assert (await first.claim("k1", "dm.send", HASH_A)).state is ClaimState.RUNNING
    assert (await second.claim("k1", "dm.send", HASH_A)).state is ClaimState.RUNNING


async def test_a_completed_key_returns_the_stored_answer(open_store: OpenStore) -> None:
    store = await open_store()
    await store.claim("k1", "dm.send", HASH_A)
    await store.complete("k1", 200, {"ok": True, "result": {"sent": 1}})
    claim = await store.claim("k1", "dm.send", HASH_A)
    assert claim == Claim(ClaimState.DONE, 200, {"ok": True, "result": {"sent": 1}})


@pytest.mark.parametrize(
    ("action", "hash_"), [("dm.send", HASH_B), ("telegram.send", HASH_A)], ids=["params", "action"]
)
async def test_the_same_key_for_other_params_or_another_action_is_a_mismatch(
    open_store: OpenStore, action: str, hash_: str
) -> None:
    store = await open_store()
    await store.claim("k1", "dm.send", HASH_A)
    assert (await store.claim("k1", action, hash_)).state is ClaimState.MISMATCH
    await store.complete("k1", 200, {"ok": True})
    assert (await store.claim("k1", action, hash_)).state is ClaimState.MISMATCH


async def test_release_lets_a_retry_run(open_store: OpenStore) -> None:
    store = await open_store()
    await store.claim("k1", "dm.send", HASH_A)
    await store.release("k1")
    assert (await store.claim("k1", "dm.send", HASH_A)).state is ClaimState.NEW
    # a released key is free for other params too: the failed call changed nothing
    await store.release("k1")
    assert (await store.claim("k1", "dm.send", HASH_B)).state is ClaimState.NEW


async def test_release_never_forgets_a_completed_answer(open_store: OpenStore) -> None:
    store = await open_store()
    await store.claim("k1", "dm.send", HASH_A)
    await store.complete("k1", 200, {"ok": True})
    await store.release("k1")
    assert (await store.claim("k1", "dm.send", HASH_A)).state is ClaimState.DONE


def _other_machine(name: str) -> Holder:
    """A holder whose process this test cannot see: only its heartbeat tells it is alive."""
    return Holder(f"node-{name}", 4242, "1")


async def test_a_claim_whose_heartbeat_stopped_is_indeterminate_not_taken_over(
    open_store: OpenStore, clock: Clock
) -> None:
    # Changed behaviour: a dead holder's claim used to be taken over (and run again) after the
    # lease; it may have run, so it is now indeterminate unless the caller may re-run it.
    crashed = await open_store(holder=_other_machine("a"))
    survivor = await open_store(holder=_other_machine("b"))
    await crashed.claim("k1", "dm.send", HASH_A)
    clock.now += LEASE_S - 1
    assert (await survivor.claim("k1", "dm.send", HASH_A)).state is ClaimState.RUNNING
    clock.now += 1
    assert (await survivor.claim("k1", "dm.send", HASH_A)).state is ClaimState.INDETERMINATE
    assert await survivor.lookup("k1") is KeyState.INDETERMINATE
    assert (await crashed.claim("k1", "dm.send", HASH_A)).state is ClaimState.INDETERMINATE


async def test_an_idempotent_action_takes_a_dead_claim_over(
    open_store: OpenStore, clock: Clock
) -> None:
    crashed = await open_store(holder=_other_machine("a"))
    survivor = await open_store(holder=_other_machine("b"))
    await crashed.claim("k1", "system.echo", HASH_A)
    clock.now += LEASE_S
    claim = await survivor.claim("k1", "system.echo", HASH_A, rerun_if_dead=True)
    assert claim.state is ClaimState.NEW
    # the takeover renews the claim: the survivor holds it now
    assert (await crashed.claim("k1", "system.echo", HASH_A)).state is ClaimState.RUNNING


async def test_a_heartbeat_keeps_a_long_call_alive_past_the_lease(
    open_store: OpenStore, clock: Clock
) -> None:
    holder = await open_store(holder=_other_machine("a"))
    other = await open_store(holder=_other_machine("b"))
    await holder.claim("k1", "dm.send", HASH_A)
    for _ in range(3):
        clock.now += LEASE_S - 1
        await holder.renew()
        assert (await other.claim("k1", "dm.send", HASH_A)).state is ClaimState.RUNNING


def _dead_process() -> Holder:
    """A holder on this machine whose process has exited (as a killed server's would be)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    me = current_holder()
    start = _proc_start(proc.pid)
    proc.wait()
    return Holder(me.node, proc.pid, start or "1")


@pytest.mark.process
async def test_a_restarted_process_knows_the_claims_of_its_previous_life_are_dead_at_once(
    open_store: OpenStore,
) -> None:
    previous = await open_store(holder=_dead_process())
    restarted = await open_store()  # this process, same machine; no time passes
    await previous.claim("k1", "dm.send", HASH_A)
    assert (await restarted.claim("k1", "dm.send", HASH_A)).state is ClaimState.INDETERMINATE


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """Another live process on this machine (killed at the end)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


async def test_a_process_on_this_machine_that_exits_leaves_an_indeterminate_claim_at_once(
    open_store: OpenStore, clock: Clock, sleeper: subprocess.Popen[bytes]
) -> None:
    await until(lambda: _proc_start(sleeper.pid) is not None, what="the process started")
    live = Holder(current_holder().node, sleeper.pid, _proc_start(sleeper.pid) or "")
    owner, other = await open_store(holder=live), await open_store()
    await owner.claim("k1", "dm.send", HASH_A)
    assert (await other.claim("k1", "dm.send", HASH_A)).state is ClaimState.RUNNING
    sleeper.kill()
    await until(lambda: sleeper.poll() is not None, what="the process exited")
    # no time passed: its heartbeat is fresh, yet its process is gone
    assert (await other.claim("k1", "dm.send", HASH_A)).state is ClaimState.INDETERMINATE


async def test_lookup_says_whether_a_handler_ever_ran_a_key(open_store: OpenStore) -> None:
    store = await open_store()
    assert await store.lookup("never") is KeyState.UNKNOWN
    await store.claim("k1", "dm.send", HASH_A)
    assert await store.lookup("k1") is KeyState.RUNNING
    await store.complete("k1", 200, {"ok": True})
    assert await store.lookup("k1") is KeyState.DONE
    await store.claim("failed", "dm.send", HASH_A)
    await store.release("failed")  # the handler ran and failed
    assert await store.lookup("failed") is KeyState.DONE
    await store.claim("refused", "dm.send", HASH_A)
    await store.release("refused", ran=False)  # refused before any handler
    assert await store.lookup("refused") is KeyState.UNKNOWN


async def test_a_completed_answer_is_never_taken_over(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    await store.claim("k1", "dm.send", HASH_A)
    await store.complete("k1", 200, {"ok": True})
    clock.now += LEASE_S * 10
    assert (await store.claim("k1", "dm.send", HASH_A)).state is ClaimState.DONE


async def _waiting(open_store: OpenStore) -> tuple[IdempotencyStore, asyncio.Task[Claim]]:
    """An owner holding ``k1`` and a task (another instance) that waits for it and has polled."""
    owner, other = await open_store(), await open_store()
    await owner.claim("k1", "dm.send", HASH_A)
    waiter = asyncio.create_task(other.wait("k1", "dm.send", HASH_A, timeout_s=30.0))
    await until(lambda: other.claims >= 2, what="the waiter saw the key running")
    assert not waiter.done()
    return owner, waiter


async def test_wait_returns_done_once_another_task_completes_the_key(
    open_store: OpenStore,
) -> None:
    owner, waiter = await _waiting(open_store)
    await owner.complete("k1", 200, {"ok": True, "result": "sent once"})
    claim = await asyncio.wait_for(waiter, timeout=30.0)
    assert claim == Claim(ClaimState.DONE, 200, {"ok": True, "result": "sent once"})


async def test_wait_takes_the_key_when_the_first_call_releases_it(
    open_store: OpenStore,
) -> None:
    owner, waiter = await _waiting(open_store)
    await owner.release("k1")
    claim = await asyncio.wait_for(waiter, timeout=30.0)
    assert claim.state is ClaimState.NEW
    assert (await owner.claim("k1", "dm.send", HASH_A)).state is ClaimState.RUNNING


async def test_wait_gives_up_running_after_its_timeout(open_store: OpenStore) -> None:
    store = await open_store()
    await store.claim("k1", "dm.send", HASH_A)
    claim = await store.wait("k1", "dm.send", HASH_A, timeout_s=0.0)
    assert claim.state is ClaimState.RUNNING  # the server answers 409 then


async def test_wait_returns_at_once_for_a_new_key(open_store: OpenStore) -> None:
    store = await open_store()
    claim = await store.wait("fresh", "dm.send", HASH_A, timeout_s=30.0)
    assert claim.state is ClaimState.NEW
    assert store.claims == 1


async def test_answers_survive_closing_and_reopening_the_file(open_store: OpenStore) -> None:
    store = await open_store()
    await store.claim("k1", "dm.send", HASH_A)
    await store.complete("k1", 201, {"ok": True, "result": [1, 2]})
    await store.claim("k2", "dm.send", HASH_B)
    await store.close()
    reopened = await open_store()
    assert await reopened.claim("k1", "dm.send", HASH_A) == Claim(
        ClaimState.DONE, 201, {"ok": True, "result": [1, 2]}
    )
    assert (await reopened.claim("k2", "dm.send", HASH_B)).state is ClaimState.RUNNING


async def test_completed_keys_are_pruned_after_keep_s(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store(keep_s=86400.0)
    await store.claim("old", "dm.send", HASH_A)
    await store.complete("old", 200, {"ok": True})
    clock.now += 86400.0 + 3601  # past keep_s, and past the hourly prune interval
    await store.claim("other", "dm.send", HASH_A)  # any claim runs the prune
    assert (await store.claim("old", "dm.send", HASH_A)).state is ClaimState.NEW


async def test_for_data_dir_uses_the_shared_hybrid_file(tmp_path: Path) -> None:
    store = IdempotencyStore.for_data_dir(tmp_path)
    await store.open()
    try:
        await store.claim("k", "dm.send", HASH_A)
    finally:
        await store.close()
    assert (tmp_path / "hybrid.sqlite3").is_file()


async def test_a_holder_that_lost_its_claim_cannot_overwrite_the_new_holders(
    open_store: OpenStore, clock: Clock
) -> None:
    stalled = await open_store(holder=_other_machine("a"))
    survivor = await open_store(holder=_other_machine("b"))
    await stalled.claim("k1", "system.echo", HASH_A)
    clock.now += LEASE_S
    assert (await survivor.claim("k1", "system.echo", HASH_A, True)).state is ClaimState.NEW
    await stalled.complete("k1", 200, {"ok": True, "result": "late"})
    await stalled.release("k1")
    assert await survivor.lookup("k1") is KeyState.RUNNING
    await survivor.complete("k1", 200, {"ok": True, "result": "mine"})
    claim = await stalled.claim("k1", "system.echo", HASH_A)
    assert claim.body == {"ok": True, "result": "mine"}
