"""CloudExecutor against ``httpx.MockTransport``: URL, headers, retries, backoff, breaker.

No test waits for real: ``sleep`` records the delays it is asked for, ``rng`` fixes the jitter
and the breaker runs on a hand-moved clock.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest

from circuit_breaker import BreakerState, CircuitBreaker
from cloud_executor import CloudExecutor, RetryPolicy
from errors import (
    CircuitOpen,
    CloudTimeout,
    CloudUnavailable,
    CostLimitExceeded,
    ErrorCode,
    HandlerError,
    Indeterminate,
    InvalidParams,
    KeyBusy,
    Source,
    Unauthorized,
    UnknownAction,
)

pytestmark = pytest.mark.prd200

ENDPOINT = "http://cloud.test"
KEY = "cloud-key-123"

Answer = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


def ok(result: Any = None, **extra: Any) -> httpx.Response:
    """A cloud success answer: the serving side's envelope."""
    return httpx.Response(200, json={"ok": True, "result": result, **extra})


def status(code: int, body: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
    """An error answer with an envelope-like JSON body."""
    if body is None:
        body = {"ok": False, "error": "cloud_unavailable", "detail": f"status {code}"}
    return httpx.Response(code, json=body, headers=headers)


class FakeCloud:
    """MockTransport handler answering from a script; the last answer repeats."""

    def __init__(self, *answers: Answer) -> None:
        self.answers: list[Answer] = list(answers) or [ok({"done": True})]
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, httpx.Response):
            return answer
        return answer(request)

    @property
    def keys(self) -> list[str | None]:
        return [r.headers.get("Idempotency-Key") for r in self.requests]


class Sleeps:
    """A fake ``asyncio.sleep`` that records the delays."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay_s: float) -> None:
        self.delays.append(delay_s)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


MakeExecutor = Callable[..., CloudExecutor]


@pytest.fixture
async def make_executor() -> AsyncIterator[MakeExecutor]:
    """Build executors whose network is a ``FakeCloud``; close their clients afterwards."""
    clients: list[httpx.AsyncClient] = []

    def make(cloud: FakeCloud, **options: Any) -> CloudExecutor:
        client = httpx.AsyncClient(transport=httpx.MockTransport(cloud))
        clients.append(client)
        options.setdefault("endpoint", ENDPOINT)
        options.setdefault("api_key", KEY)
        options.setdefault("sleep", Sleeps())
        options.setdefault("rng", lambda: 0.5)  # no jitter: exact delays
        return CloudExecutor(client=client, **options)

    yield make
    for client in clients:
        await client.aclose()


def _sleeps(executor: CloudExecutor) -> list[float]:
    sleep = executor._sleep
    assert isinstance(sleep, Sleeps)
    return sleep.delays


# -- the request ----------------------------------------------------------------------------------


async def test_posts_the_params_to_the_service_topic_url_under_the_endpoint(
    make_executor: MakeExecutor,
) -> None:
    cloud = FakeCloud(ok({"sent": True}))
    executor = make_executor(cloud, endpoint=ENDPOINT + "/")
    await executor.call("dm.send", {"to": "ann", "text": "hi"}, request_id="r1")
    (request,) = cloud.requests
    assert request.method == "POST"
    assert str(request.url) == f"{ENDPOINT}/api/services/dm/send"
    assert request.read() == b'{"params":{"to":"ann","text":"hi"}}'


async def test_sends_the_bearer_key_and_the_idempotency_key(make_executor: MakeExecutor) -> None:
    cloud = FakeCloud()
    await make_executor(cloud).call("research.keyword", {}, request_id="req-42")
    (request,) = cloud.requests
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.headers["Idempotency-Key"] == "req-42"


async def test_execute_without_a_request_id_sends_the_envelopes_request_id_as_the_key(
    make_executor: MakeExecutor,
) -> None:
    cloud = FakeCloud()
    envelope = await make_executor(cloud).execute("research.keyword", {})
    assert len(envelope.request_id) == 32
    assert cloud.keys == [envelope.request_id]


async def test_keeps_the_same_idempotency_key_and_auth_on_every_retry(
    make_executor: MakeExecutor,
) -> None:
    cloud = FakeCloud(status(503), httpx.ReadTimeout("slow"), status(502), ok("finally"))
    done = await make_executor(cloud).call("dm.send", {"to": "bo"}, request_id="same-key")
    assert done.result == "finally"
    assert cloud.keys == ["same-key"] * 4
    assert {r.headers["Authorization"] for r in cloud.requests} == {f"Bearer {KEY}"}


async def test_sends_no_authorization_header_without_a_key(make_executor: MakeExecutor) -> None:
    cloud = FakeCloud()
    await make_executor(cloud, api_key=None).call("system.echo", {}, request_id="k")
    assert "Authorization" not in cloud.requests[0].headers


async def test_every_attempt_carries_the_per_attempt_timeout(make_executor: MakeExecutor) -> None:
    cloud = FakeCloud()
    await make_executor(cloud, timeout_s=12.0).call("system.echo", {}, request_id="k")
    timeout = cloud.requests[0].extensions["timeout"]
    assert timeout["read"] == 12.0
    assert timeout["write"] == 12.0
    assert timeout["connect"] == 5.0  # a connection is refused fast, or not at all


async def test_an_invalid_action_name_sends_nothing(make_executor: MakeExecutor) -> None:
    cloud = FakeCloud()
    with pytest.raises(InvalidParams):
        await make_executor(cloud).call("../../admin", {}, request_id="k")
    assert cloud.requests == []


@pytest.mark.parametrize("key", ["key\r\nX-Evil: 1", "key\x00zero", "clé-00000", "with space"])
async def test_a_request_id_that_cannot_be_a_header_sends_nothing_and_is_not_retried(
    make_executor: MakeExecutor, key: str
) -> None:
    cloud = FakeCloud()
    with pytest.raises(InvalidParams) as refused:
        await make_executor(cloud).call("dm.send", {}, request_id=key)
    assert refused.value.never_ran and cloud.requests == []


# -- success ----------------------------------------------------------------------------------


async def test_execute_returns_a_cloud_envelope_with_result_attempts_and_cost(
    make_executor: MakeExecutor,
) -> None:
    cloud = FakeCloud(status(500), ok({"rank": 3}, cost_usd=0.0042))
    envelope = await make_executor(cloud).execute("research.keyword", {"q": "x"})
    assert envelope.ok is True
    assert envelope.source is Source.CLOUD
    assert envelope.result == {"rank": 3}
    assert envelope.attempts == 2
    assert envelope.cost_usd == Decimal("0.0042")
    assert envelope.error is None
    assert envelope.http_status == 200


@pytest.mark.parametrize(
    ("reported", "parsed"),
    [
        (0.0042, Decimal("0.0042")),
        ("0.5", Decimal("0.5")),
        (0, Decimal("0")),
        (None, None),
        (-1, None),
        (True, None),
        ("lots", None),
        ("NaN", None),
        ("1e999", None),  # no call costs that: junk, not a number to record
        (1000000, Decimal("1000000")),
    ],
)
async def test_cost_usd_is_parsed_exactly_from_the_answer(
    make_executor: MakeExecutor, reported: Any, parsed: Decimal | None
) -> None:
    extra = {} if reported is None else {"cost_usd": reported}
    done = await make_executor(FakeCloud(ok("r", **extra))).call(
        "claude.generate", {}, request_id="k"
    )
    assert done.cost_usd == parsed


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, text="<html>proxy login</html>"),
        httpx.Response(200, json={"ok": False, "error": "handler_error"}),
        httpx.Response(200, json={"ok": True}),
        httpx.Response(200, json=["not", "an", "envelope"]),
        httpx.Response(204),
    ],
    ids=["html", "ok-false", "no-result", "list", "empty"],
)
async def test_a_malformed_2xx_answer_is_cloud_unavailable_and_not_retried(
    make_executor: MakeExecutor, answer: httpx.Response
) -> None:
    cloud = FakeCloud(answer)
    with pytest.raises(CloudUnavailable) as caught:
        await make_executor(cloud).call("research.keyword", {}, request_id="k")
    assert type(caught.value) is CloudUnavailable
    assert caught.value.never_ran is False  # the cloud answered 2xx: it may well have run it
    assert len(cloud.requests) == 1


# -- retries ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "transient",
    [
        status(500),
        status(502),
        status(503),
        status(429),
        status(409),
        httpx.ReadTimeout("read timed out"),
        httpx.ConnectError("connection refused"),
        httpx.ConnectTimeout("connect timed out"),
        httpx.RemoteProtocolError("server disconnected"),
    ],
    ids=[
        "500",
        "502",
        "503",
        "429",
        "409",
        "read-timeout",
        "connect-error",
        "connect-timeout",
        "disconnected",
    ],
)
async def test_a_transient_failure_is_retried(
    make_executor: MakeExecutor, transient: Answer
) -> None:
    cloud = FakeCloud(transient, ok("second time"))
    done = await make_executor(cloud).call("research.keyword", {}, request_id="k")
    assert done.result == "second time"
    assert done.attempts == 2
    assert len(cloud.requests) == 2


async def test_gives_up_after_the_configured_retries_with_the_final_error(
    make_executor: MakeExecutor,
) -> None:
    cloud = FakeCloud(status(503))
    executor = make_executor(cloud)
    envelope = await executor.execute("research.keyword", {})
    assert len(cloud.requests) == 4  # one try + CLOUD_RETRIES (3)
    assert envelope.ok is False
    assert envelope.error is ErrorCode.CLOUD_UNAVAILABLE
    assert envelope.attempts == 4
    assert envelope.source is Source.CLOUD
    assert envelope.http_status == 502
    assert "503" in (envelope.detail or "")


@pytest.mark.parametrize("retries", [0, 1, 5])
async def test_the_number_of_attempts_is_one_plus_retries(
    make_executor: MakeExecutor, retries: int
) -> None:
    cloud = FakeCloud(status(503))
    executor = make_executor(
        cloud,
        policy=RetryPolicy(retries=retries),
        breaker=CircuitBreaker(failure_threshold=100),
    )
    with pytest.raises(CloudUnavailable) as caught:
        await executor.call("research.keyword", {}, request_id="k")
    assert len(cloud.requests) == retries + 1
    assert caught.value.attempts == retries + 1
    assert len(_sleeps(executor)) == retries


async def test_a_refused_connection_gets_one_quick_retry_and_no_backoff(
    make_executor: MakeExecutor,
) -> None:
    cloud = FakeCloud(httpx.ConnectError("connection refused"))
    executor = make_executor(cloud, breaker=CircuitBreaker(failure_threshold=100))
    with pytest.raises(CloudUnavailable) as caught:
        await executor.call("research.keyword", {}, request_id="k")
    assert len(cloud.requests) == 2 and caught.value.attempts == 2
    assert caught.value.never_ran is True
    assert _sleeps(executor) == [0.2]


async def test_a_refusal_after_a_5xx_still_gets_only_its_quick_retry(
    make_executor: MakeExecutor,
) -> None:
    cloud = FakeCloud(status(500), httpx.ConnectError("refused"))
    executor = make_executor(cloud, breaker=CircuitBreaker(failure_threshold=100))
    with pytest.raises(CloudUnavailable):
        await executor.call("research.keyword", {}, request_id="k")
    assert len(cloud.requests) == 3
    assert _sleeps(executor) == [1.0, 0.2]


async def test_a_cloud_that_died_answers_the_first_call_within_a_second(
    make_executor: MakeExecutor,
) -> None:
    from tests.conftest import free_port

    sleeps = Sleeps()
    async with httpx.AsyncClient() as client:  # a real socket: nothing listens on the port
        executor = CloudExecutor(
            endpoint=f"http://127.0.0.1:{free_port()}", api_key=KEY, client=client, sleep=sleeps
        )
        envelope = await executor.execute("research.keyword", {})
    assert envelope.error is ErrorCode.CLOUD_UNAVAILABLE
    assert envelope.attempts == 2
    assert len(sleeps.delays) == 1 and sum(sleeps.delays) < 1.0


async def test_the_backoff_schedule_is_1_3_9_seconds(make_executor: MakeExecutor) -> None:
    executor = make_executor(FakeCloud(status(500)))
    with pytest.raises(CloudUnavailable):
        await executor.call("research.keyword", {}, request_id="k")
    assert _sleeps(executor) == [1.0, 3.0, 9.0]


@pytest.mark.parametrize(
    ("rng_value", "expected"),
    [(0.0, [0.9, 2.7, 8.1]), (1.0, [1.1, 3.3, 9.9]), (0.75, [1.05, 3.15, 9.45])],
)
async def test_jitter_stays_within_ten_percent(
    make_executor: MakeExecutor, rng_value: float, expected: list[float]
) -> None:
    executor = make_executor(FakeCloud(httpx.ReadTimeout("slow")), rng=lambda: rng_value)
    with pytest.raises(CloudTimeout):
        await executor.call("research.keyword", {}, request_id="k")
    assert _sleeps(executor) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("policy", "index", "delay_s"),
    [
        (RetryPolicy(), 0, 1.0),
        (RetryPolicy(), 1, 3.0),
        (RetryPolicy(), 2, 9.0),
        (RetryPolicy(), 3, 27.0),
        (RetryPolicy(backoff_s=2.0), 1, 6.0),
        (RetryPolicy(backoff_s=0.0), 2, 0.0),
        (RetryPolicy(multiplier=2.0), 2, 4.0),
        (RetryPolicy(jitter_ratio=0.0), 1, 3.0),
    ],
)
def test_retry_policy_delay_table(policy: RetryPolicy, index: int, delay_s: float) -> None:
    assert policy.delay_s(index, lambda: 0.5) == pytest.approx(delay_s)


def test_retry_policy_jitter_bounds_over_many_draws() -> None:
    import random

    rng = random.Random(7).random
    delays = [RetryPolicy().delay_s(1, rng) for _ in range(2000)]
    assert min(delays) >= 2.7
    assert max(delays) <= 3.3
    assert max(delays) - min(delays) > 0.5  # it does jitter


@pytest.mark.parametrize(
    ("retry_after", "first_delay_s"),
    [("7", 7.0), ("0", 1.0), ("2.5", 2.5), ("3600", 60.0), ("soon", 1.0)],
    ids=["seconds", "shorter-than-backoff", "fraction", "capped", "garbage"],
)
async def test_retry_after_seconds_is_honoured_and_capped(
    make_executor: MakeExecutor, retry_after: str, first_delay_s: float
) -> None:
    cloud = FakeCloud(status(429, headers={"Retry-After": retry_after}), ok("r"))
    executor = make_executor(cloud)
    await executor.call("research.keyword", {}, request_id="k")
    assert _sleeps(executor) == [first_delay_s]


async def test_retry_after_cap_is_the_policys(make_executor: MakeExecutor) -> None:
    cloud = FakeCloud(status(503, headers={"Retry-After": "100"}), ok("r"))
    executor = make_executor(cloud, policy=RetryPolicy(max_retry_after_s=15.0))
    await executor.call("research.keyword", {}, request_id="k")
    assert _sleeps(executor) == [15.0]


def _http_date(offset_s: float) -> str:
    return email.utils.formatdate(time.time() + offset_s, usegmt=True)


async def test_retry_after_as_an_http_date_is_honoured(make_executor: MakeExecutor) -> None:
    cloud = FakeCloud(status(503, headers={"Retry-After": _http_date(30)}), ok("r"))
    executor = make_executor(cloud)
    await executor.call("research.keyword", {}, request_id="k")
    (delay,) = _sleeps(executor)
    assert 28.0 <= delay <= 30.0  # the date has one-second resolution


@pytest.mark.parametrize(("offset_s", "delay_s"), [(86400, 60.0), (-600, 1.0)])
async def test_retry_after_http_date_far_ahead_is_capped_and_past_means_backoff(
    make_executor: MakeExecutor, offset_s: float, delay_s: float
) -> None:
    cloud = FakeCloud(status(429, headers={"Retry-After": _http_date(offset_s)}), ok("r"))
    executor = make_executor(cloud)
    await executor.call("research.keyword", {}, request_id="k")
    assert _sleeps(executor) == [delay_s]


# -- definite answers: never retried ------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (400, InvalidParams),
        (401, Unauthorized),
        (403, Unauthorized),
        (404, UnknownAction),
        (413, InvalidParams),
        (422, InvalidParams),
    ],
)
async def test_a_client_error_is_not_retried(
    make_executor: MakeExecutor, code: int, error: type[Exception]
) -> None:
    retried: list[str] = []
    cloud = FakeCloud(status(code), ok("never reached"))
    executor = make_executor(cloud, on_retry=retried.append)
    with pytest.raises(error) as caught:
        await executor.call("dm.send", {}, request_id="k")
    assert len(cloud.requests) == 1
    assert retried == []
    assert _sleeps(executor) == []
    assert getattr(caught.value, "attempts", None) == 1


async def test_unauthorized_does_not_leak_the_key(make_executor: MakeExecutor) -> None:
    envelope = await make_executor(FakeCloud(status(401))).execute("dm.send", {})
    assert envelope.error is ErrorCode.UNAUTHORIZED
    assert envelope.http_status == 401
    assert KEY not in (envelope.detail or "")


async def test_a_5xx_saying_handler_error_is_a_handler_error_and_not_retried(
    make_executor: MakeExecutor,
) -> None:
    body = {"ok": False, "error": "handler_error", "detail": "ValueError: bad video"}
    cloud = FakeCloud(status(500, body))
    executor = make_executor(cloud)
    with pytest.raises(HandlerError) as caught:
        await executor.call("content.analyze_video", {}, request_id="k")
    assert len(cloud.requests) == 1
    assert caught.value.never_ran is False
    assert "bad video" in caught.value.detail
    envelope = await executor.execute("content.analyze_video", {})
    assert envelope.error is ErrorCode.HANDLER_ERROR


# -- timeouts and never_ran -------------------------------------------------------------------


async def test_a_timeout_gives_the_timeout_envelope(make_executor: MakeExecutor) -> None:
    cloud = FakeCloud(httpx.ReadTimeout("no answer"))
    envelope = await make_executor(cloud, timeout_s=2.0).execute("research.keyword", {})
    body = envelope.to_dict()
    assert body["ok"] is False
    assert body["error"] == "timeout"
    assert body["source"] == "cloud"
    assert isinstance(body["duration_ms"], float) and body["duration_ms"] >= 0
    assert body["attempts"] == 4
    assert "2 s" in body["detail"]
    assert envelope.http_status == 504


@pytest.mark.parametrize(
    ("answers", "never_ran"),
    [
        ([httpx.ConnectError("refused")], True),
        ([httpx.ConnectTimeout("connect")], True),
        ([httpx.PoolTimeout("pool")], True),
        ([status(429)], True),
        ([status(503, {"ok": False, "error": "circuit_open"})], True),
        ([status(503, {"ok": False, "error": "offline"})], True),
        ([httpx.ReadTimeout("read")], False),
        ([httpx.WriteTimeout("write")], False),
        ([status(500)], False),
        ([status(502)], False),
        ([status(409)], False),
        ([httpx.RemoteProtocolError("cut")], False),
        ([httpx.ReadTimeout("read"), httpx.ConnectError("refused")], False),
        ([status(500), httpx.ConnectError("refused")], False),
        ([httpx.ConnectError("refused"), status(500)], False),
        ([status(429), httpx.ConnectError("refused")], True),
    ],
    ids=[
        "connect-error",
        "connect-timeout",
        "pool-timeout",
        "429",
        "503-circuit-open",
        "503-offline",
        "read-timeout",
        "write-timeout",
        "500",
        "502",
        "409",
        "disconnected",
        "read-timeout-then-refused",
        "500-then-refused",
        "refused-then-500",
        "429-then-refused",
    ],
)
async def test_never_ran_is_true_only_when_no_attempt_may_have_run(
    make_executor: MakeExecutor, answers: list[Answer], never_ran: bool
) -> None:
    cloud = FakeCloud(*answers)
    executor = make_executor(cloud, breaker=CircuitBreaker(failure_threshold=100))
    with pytest.raises(CloudUnavailable) as caught:
        await executor.call("dm.send", {}, request_id="k")
    # the last answer repeats; a repeated refusal ends the call after its one quick retry
    refused_last = isinstance(answers[-1], httpx.ConnectError)
    assert len(cloud.requests) == (len(answers) + 1 if refused_last else 4)
    assert caught.value.never_ran is never_ran


async def test_a_definite_answer_after_an_ambiguous_attempt_is_not_never_ran(
    make_executor: MakeExecutor,
) -> None:
    cloud = FakeCloud(httpx.ReadTimeout("read"), status(401))
    with pytest.raises(Unauthorized) as caught:
        await make_executor(cloud).call("dm.send", {}, request_id="k")
    assert caught.value.never_ran is False
    assert caught.value.attempts == 2


async def test_an_undecodable_answer_is_a_retried_ambiguous_failure(
    make_executor: MakeExecutor,
) -> None:
    def garbled(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            stream=httpx.ByteStream(b"not gzip at all"),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    cloud = FakeCloud(garbled)
    envelope = await make_executor(cloud).execute("dm.send", {})
    assert len(cloud.requests) == 4
    assert envelope.error is ErrorCode.CLOUD_UNAVAILABLE
    with pytest.raises(CloudUnavailable) as caught:
        await make_executor(FakeCloud(garbled)).call("dm.send", {}, request_id="k")
    assert caught.value.never_ran is False


# -- the circuit breaker ----------------------------------------------------------------------


def _breaker(clock: Clock, threshold: int = 2) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=threshold, reset_after_s=30.0, clock=clock)


async def _tripped(make_executor: MakeExecutor, cloud: FakeCloud, clock: Clock) -> CloudExecutor:
    """An executor (no retries, breaker threshold 2) whose first two calls failed."""
    executor = make_executor(cloud, policy=RetryPolicy(retries=0), breaker=_breaker(clock))
    for _ in range(2):
        with pytest.raises(CloudUnavailable):
            await executor.call("research.keyword", {}, request_id="k")
    return executor


async def test_the_breaker_opens_after_repeated_failures_and_then_fails_fast(
    make_executor: MakeExecutor,
) -> None:
    clock = Clock()
    cloud = FakeCloud(httpx.ConnectError("refused"))
    executor = await _tripped(make_executor, cloud, clock)
    assert executor.breaker.state is BreakerState.OPEN
    sent = len(cloud.requests)
    with pytest.raises(CircuitOpen) as caught:
        await executor.call("research.keyword", {}, request_id="k2")
    assert len(cloud.requests) == sent  # zero requests while open
    assert caught.value.never_ran is True
    assert caught.value.attempts == 0
    envelope = await executor.execute("research.keyword", {})
    assert envelope.error is ErrorCode.CIRCUIT_OPEN
    assert envelope.http_status == 503
    assert len(cloud.requests) == sent


async def test_a_dead_cloud_stops_retrying_once_the_breaker_opens(
    make_executor: MakeExecutor,
) -> None:
    cloud = FakeCloud(status(503))
    executor = make_executor(cloud, breaker=_breaker(Clock()))
    with pytest.raises(CloudUnavailable):
        await executor.call("research.keyword", {}, request_id="k")
    assert len(cloud.requests) == 2  # not 4: the second failure opened the circuit
    assert _sleeps(executor) == [1.0]


async def test_the_breaker_half_opens_after_the_cool_down_and_closes_on_success(
    make_executor: MakeExecutor,
) -> None:
    clock = Clock()
    cloud = FakeCloud(httpx.ConnectError("refused"), httpx.ConnectError("refused"), ok("back"))
    executor = await _tripped(make_executor, cloud, clock)
    clock.now += 29.9
    with pytest.raises(CircuitOpen):
        await executor.call("research.keyword", {}, request_id="k")
    clock.now += 0.1
    assert executor.breaker.state is BreakerState.HALF_OPEN
    done = await executor.call("research.keyword", {}, request_id="k")
    assert done.result == "back"
    assert len(cloud.requests) == 3
    assert executor.breaker.state is BreakerState.CLOSED


async def test_a_failed_half_open_trial_opens_the_breaker_for_another_cool_down(
    make_executor: MakeExecutor,
) -> None:
    clock = Clock()
    cloud = FakeCloud(httpx.ConnectError("refused"))
    executor = await _tripped(make_executor, cloud, clock)
    clock.now += 30
    with pytest.raises(CloudUnavailable) as caught:  # the trial goes out and fails
        await executor.call("research.keyword", {}, request_id="k")
    assert not isinstance(caught.value, CircuitOpen)
    assert len(cloud.requests) == 3
    assert executor.breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen):
        await executor.call("research.keyword", {}, request_id="k")
    assert len(cloud.requests) == 3


# -- callbacks --------------------------------------------------------------------------------


async def test_on_outcome_and_on_retry_report_every_attempt(make_executor: MakeExecutor) -> None:
    outcomes: list[bool] = []
    retried: list[str] = []
    cloud = FakeCloud(httpx.ConnectError("refused"), status(500), ok("r"))
    executor = make_executor(cloud, on_outcome=outcomes.append, on_retry=retried.append)
    await executor.call("research.keyword", {}, request_id="k")
    assert outcomes == [False, False, True]
    assert retried == ["research.keyword", "research.keyword"]


async def test_a_definite_4xx_counts_as_the_cloud_being_up(make_executor: MakeExecutor) -> None:
    outcomes: list[bool] = []
    executor = make_executor(FakeCloud(status(422)), on_outcome=outcomes.append)
    with pytest.raises(InvalidParams):
        await executor.call("dm.send", {}, request_id="k")
    assert outcomes == [True]
    assert executor.breaker.failures == 0


# -- Cost-Limit and what cannot be sent -----------------------------------------------------------


async def test_the_cost_limit_goes_out_as_an_exact_decimal_header(
    make_executor: MakeExecutor,
) -> None:
    cloud = FakeCloud(ok({"sent": True}))
    await make_executor(cloud).call(
        "dm.send", {}, request_id="r1", cost_limit_usd=Decimal("0.010000")
    )
    assert cloud.requests[0].headers["Cost-Limit"] == "0.01"


async def test_a_price_refusal_is_cost_limit_exceeded_and_not_retried(
    make_executor: MakeExecutor,
) -> None:
    refusal = {"ok": False, "error": "cost_limit_exceeded", "detail": "dear", "price_usd": "0.05"}
    cloud = FakeCloud(httpx.Response(402, json=refusal))
    with pytest.raises(CostLimitExceeded) as info:
        await make_executor(cloud).call(
            "dm.send", {}, request_id="r1", cost_limit_usd=Decimal("0.01")
        )
    assert info.value.price_usd == Decimal("0.05") and info.value.never_ran
    assert len(cloud.requests) == 1


@pytest.mark.parametrize(
    "params",
    [{"x": float("nan")}, {"x": float("-inf")}, {"x": "\ud800"}, {"x": object()}],
    ids=["nan", "infinity", "lone-surrogate", "not-json"],
)
async def test_params_that_cannot_be_encoded_never_leave(
    make_executor: MakeExecutor, params: dict[str, Any]
) -> None:
    cloud = FakeCloud(ok({"sent": True}))
    with pytest.raises(InvalidParams) as info:
        await make_executor(cloud).call("dm.send", params, request_id="r1")
    assert info.value.never_ran and cloud.requests == []


async def test_a_key_with_a_line_break_never_leaves(make_executor: MakeExecutor) -> None:
    cloud = FakeCloud(ok({"sent": True}))
    with pytest.raises(InvalidParams):
        await make_executor(cloud).call("dm.send", {}, request_id="key\r\nX-Evil: 1")
    assert cloud.requests == []


@pytest.mark.parametrize(
    "fault",
    [httpx.LocalProtocolError("bad header"), UnicodeEncodeError("ascii", "é", 0, 1, "no")],
    ids=["h11-refused", "encoding"],
)
async def test_a_request_that_cannot_be_written_is_invalid_params_not_retried(
    make_executor: MakeExecutor, fault: Exception
) -> None:
    cloud = FakeCloud(fault)
    outcomes: list[bool] = []
    executor = make_executor(cloud, on_outcome=outcomes.append)
    with pytest.raises(InvalidParams) as info:
        await executor.call("dm.send", {}, request_id="r1")
    assert info.value.never_ran and len(cloud.requests) == 1
    assert outcomes == []  # the cloud said nothing: neither up nor down


# -- 409: a busy key is no cloud failure; a key that may have run is a definite answer --------


def busy() -> httpx.Response:
    body = {"ok": False, "error": "conflict", "detail": "still running"}
    return status(409, body, {"Retry-After": "1"})


async def test_a_busy_key_never_counts_against_the_breaker(make_executor: MakeExecutor) -> None:
    cloud = FakeCloud(busy())
    breaker = CircuitBreaker(failure_threshold=2, reset_after_s=3600)
    outcomes: list[bool] = []
    executor = make_executor(cloud, breaker=breaker, on_outcome=outcomes.append)
    for _ in range(3):
        with pytest.raises(KeyBusy) as caught:
            await executor.call("dm.send", {}, request_id="busy-key-1")
        assert caught.value.never_ran is False
    assert breaker.state is BreakerState.CLOSED
    assert False not in outcomes  # the connectivity checker hears "up", never "failed"


async def test_without_busy_retries_a_busy_key_raises_at_once(make_executor: MakeExecutor) -> None:
    cloud = FakeCloud(busy())
    sleeps = Sleeps()
    executor = make_executor(cloud, sleep=sleeps)
    with pytest.raises(KeyBusy):
        await executor.call("dm.send", {}, request_id="busy-key-1", retry_busy=False)
    assert len(cloud.requests) == 1 and sleeps.delays == []


async def test_a_key_that_may_have_run_is_not_retried(make_executor: MakeExecutor) -> None:
    body = {"ok": False, "error": "indeterminate", "detail": "dm.send may have run"}
    cloud = FakeCloud(status(409, body))
    breaker = CircuitBreaker(failure_threshold=1, reset_after_s=3600)
    executor = make_executor(cloud, breaker=breaker)
    with pytest.raises(Indeterminate) as caught:
        await executor.call("dm.send", {}, request_id="dead-key-1")
    assert caught.value.code is ErrorCode.INDETERMINATE
    assert len(cloud.requests) == 1
    assert breaker.state is BreakerState.CLOSED
