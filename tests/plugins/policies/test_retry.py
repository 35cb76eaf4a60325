"""The retry plugin through a gateway: which classes retry, how long it waits, its budget."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

from llmgw.kernel import (
    TRANSIENT,
    ConfigError,
    ErrorClass,
    Outcome,
    ProviderRequest,
    Rejection,
    Request,
    hookimpl,
)
from llmgw.kernel.testing import FakeClock, FakeProvider, gateway_from_yaml
from llmgw.plugins.policies.retry import RetryPlugin
from llmgw.plugins.policies.retry_budget import RetryBudget


@dataclass
class Failing(FakeProvider):
    """Always fails with ``error`` (and ``hint`` as its retry-after)."""

    error: ErrorClass = ErrorClass.OVERLOADED
    hint: float | None = None

    async def complete(self, request: ProviderRequest) -> Outcome:
        self.received.append(request)
        if self.script:
            item = self.script.popleft()
            return item(request) if callable(item) else item
        return Outcome.failure(self.error, "fake failure", sent=True, retry_after_s=self.hint)


def _yaml(retry: str = "", extra: str = "", plugins: str = "retry, router, fake") -> str:
    return (
        f"plugins: [{plugins}]\n"
        "task_classes:\n  qa: {provider: a, model: m1, max_tokens: 64}\n"
        f"retry: {{budget_min_retries: 100000{', ' + retry if retry else ''}}}\n{extra}"
    )


def _expected_attempts(error: ErrorClass) -> int:
    if error is ErrorClass.MALFORMED_RESPONSE:
        return 2  # retried once only
    return 3 if error in TRANSIENT else 1


@pytest.mark.anyio
async def test_attempts_per_error_class() -> None:
    table: list[tuple[str, int]] = []
    for error in ErrorClass:
        clock = FakeClock()
        a = Failing("a", error=error)
        gw = gateway_from_yaml(_yaml(), providers=[a], clock=clock)
        env = await gw.route(Request("qa", "hi"))
        assert not env.ok and env.meta["error_class"] == error.value
        table.append((error.value, len(a.received)))
        assert len(a.received) == _expected_attempts(error), error
        assert len(clock.sleeps) == len(a.received) - 1
        await gw.aclose()
    print("FIGURE retry attempts per class:", dict(table))
    assert sum(n > 1 for _, n in table) == len(TRANSIENT)


@pytest.mark.anyio
async def test_full_jitter_delays_come_from_the_injected_rng() -> None:
    clock = FakeClock()
    a = Failing("a", error=ErrorClass.SERVER_ERROR)
    gw = gateway_from_yaml(
        _yaml("max_attempts: 5, base_delay_s: 1, max_delay_s: 3"),
        providers=[a],
        clock=clock,
        seed=7,
    )
    await gw.route(Request("qa", "hi"))
    rng = random.Random(7)
    # uniform(0, min(max_delay_s, base_delay_s * 2**(attempt-1))) for attempts 1..4
    assert clock.sleeps == [rng.uniform(0, high) for high in (1, 2, 3, 3)]
    await gw.aclose()


@pytest.mark.anyio
async def test_a_long_server_hint_is_obeyed_exactly() -> None:
    clock = FakeClock()
    a = Failing("a", error=ErrorClass.RATE_LIMITED, hint=5.0)
    gw = gateway_from_yaml(_yaml("max_delay_s: 1"), providers=[a], clock=clock)
    await gw.route(Request("qa", "hi"))
    assert clock.sleeps == [5.0, 5.0]
    assert len(a.received) == 3
    await gw.aclose()


@pytest.mark.anyio
async def test_a_short_hint_is_a_floor_under_the_jitter() -> None:
    clock = FakeClock()
    a = Failing("a", error=ErrorClass.OVERLOADED, hint=0.3)
    gw = gateway_from_yaml(_yaml(), providers=[a], clock=clock, seed=3)
    await gw.route(Request("qa", "hi"))
    rng = random.Random(3)
    assert clock.sleeps == [max(0.3, rng.uniform(0, 0.5)), max(0.3, rng.uniform(0, 1.0))]
    await gw.aclose()


@pytest.mark.anyio
async def test_a_hint_above_max_hint_falls_back_at_once() -> None:
    clock = FakeClock()
    a, b = Failing("a", error=ErrorClass.RATE_LIMITED, hint=90.0), FakeProvider("b")
    gw = gateway_from_yaml(
        _yaml(
            "max_hint_s: 30",
            "fallback: {chains: {qa: [{provider: b, model: m2}]}}\n",
            "retry, fallback, router, fake",
        ),
        providers=[a, b],
        clock=clock,
    )
    env = await gw.route(Request("qa", "hi"))
    assert env.ok and env.meta["provider"] == "b" and env.meta["fallback_from"] == "a/m1"
    assert clock.sleeps == [] and len(a.received) == 1
    assert "max_hint_s" in env.meta["retry_skipped"]
    await gw.aclose()


@pytest.mark.anyio
async def test_a_hint_that_would_cross_the_deadline_is_not_waited_for() -> None:
    clock = FakeClock()
    a = Failing("a", error=ErrorClass.RATE_LIMITED, hint=12.0)
    gw = gateway_from_yaml(_yaml(extra="gateway: {deadline_s: 10}\n"), providers=[a], clock=clock)
    env = await gw.route(Request("qa", "hi"))
    assert clock.sleeps == [] and len(a.received) == 1
    assert "deadline" in env.meta["retry_skipped"]
    await gw.aclose()


@pytest.mark.anyio
async def test_one_deadline_over_all_attempts() -> None:
    clock = FakeClock()
    a = Failing("a", error=ErrorClass.OVERLOADED, hint=2.0)
    gw = gateway_from_yaml(
        _yaml("max_attempts: 10, max_delay_s: 0.5, min_attempt_s: 0", "gateway: {deadline_s: 5}\n"),
        providers=[a],
        clock=clock,
    )
    await gw.route(Request("qa", "hi"))
    # t=0 fail, wait 2; t=2 fail, wait 2; t=4 fail: 2 s more would reach the deadline
    assert clock.sleeps == [2.0, 2.0] and len(a.received) == 3
    await gw.aclose()


@pytest.mark.anyio
async def test_a_retry_left_with_no_time_to_answer_falls_back_instead() -> None:
    """Waiting out a hint that leaves ~17 ms of the deadline sent a retry that timed out:
    paid for, counted against a healthy upstream's breaker, and the fallback never ran."""
    clock = FakeClock()
    a = Failing("a", error=ErrorClass.RATE_LIMITED, hint=2.0)
    b = FakeProvider("b")
    gw = gateway_from_yaml(
        _yaml(
            "max_attempts: 10",
            "gateway: {deadline_s: 4.5}\n"
            "fallback:\n  chains:\n    qa: [{provider: b, model: m2}]\n",
            plugins="retry, fallback, router, fake",
        ),
        providers=[a, b],
        clock=clock,
    )
    env = await gw.route(Request("qa", "hi"))
    # t=0 fail, wait 2 (2.5 s left after it); t=2 fail: waiting 2 s would leave 0.5 s,
    # under min_attempt_s (1 s): straight to the fallback.
    assert clock.sleeps == [2.0] and len(a.received) == 2
    assert env.ok and env.meta["provider"] == "b"
    assert "min_attempt_s" in env.meta["retry_skipped"]
    await gw.aclose()


@pytest.mark.anyio
async def test_malformed_response_is_retried_once_only() -> None:
    clock = FakeClock()
    a = Failing("a", error=ErrorClass.OVERLOADED)
    a.fail_with(ErrorClass.MALFORMED_RESPONSE).fail_with(ErrorClass.OVERLOADED)
    a.fail_with(ErrorClass.MALFORMED_RESPONSE)
    gw = gateway_from_yaml(_yaml("max_attempts: 6"), providers=[a], clock=clock)
    env = await gw.route(Request("qa", "hi"))
    assert env.meta["error_class"] == "malformed_response"
    assert len(a.received) == 3  # the second malformed answer ends it
    await gw.aclose()


@pytest.mark.anyio
async def test_a_success_after_a_retry_is_returned() -> None:
    clock = FakeClock()
    a = FakeProvider("a").fail_with(ErrorClass.TIMEOUT)
    gw = gateway_from_yaml(_yaml(), providers=[a], clock=clock)
    env = await gw.route(Request("qa", "hi"))
    assert env.ok and [x["attempt"] for x in env.meta["attempts"]] == [1, 2]
    assert "fallback_from" not in env.meta
    await gw.aclose()


@pytest.mark.anyio
async def test_retries_under_a_dead_upstream_stay_within_the_budget() -> None:
    clock = FakeClock()
    a = Failing("a", error=ErrorClass.OVERLOADED)
    gw = gateway_from_yaml(
        "plugins: [retry, router, fake]\n"
        "task_classes:\n  qa: {provider: a, model: m1}\n"
        "retry: {budget_ratio: 0.2, budget_min_retries: 5, budget_window_s: 10}\n",
        providers=[a],
        clock=clock,
    )
    requests = 400
    starts: list[float] = []
    retries_at: list[float] = []
    for _ in range(requests):
        starts.append(clock.monotonic())
        env = await gw.route(Request("qa", "hi"))
        t = starts[-1]
        for attempt in env.meta["attempts"][1:]:
            assert attempt["attempt"] > 1
            retries_at.append(t)
        clock.advance(0.05)  # a busy gateway: 20 requests a second
    retries = len(a.received) - requests
    ratio = retries / requests
    print(f"FIGURE retry: dead upstream, {requests} requests, {retries} retries, ratio {ratio:.3f}")
    elapsed = clock.monotonic() - starts[0]
    windows = elapsed / 10 + 1
    assert ratio <= 0.2 + 5 * windows / requests
    assert ratio < 0.35  # without a budget it would be 2.0
    info = gw.routing_info()["retry"]["budgets"]["a"]
    assert info["denied_total"] > 0 and info["remaining"] >= 0
    await gw.aclose()


def test_budget_allows_the_floor_plus_a_share_of_recent_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_retries=2, window_s=10)
    assert budget.try_withdraw(0.0) and budget.try_withdraw(0.0)
    assert not budget.try_withdraw(0.0)  # floor spent, nothing earned yet
    for _ in range(5):
        budget.note_request(1.0)
    assert budget.try_withdraw(1.0)  # 5 requests x 0.2 = one more
    assert not budget.try_withdraw(1.0)
    assert budget.snapshot(1.0) == {
        "window_s": 10,
        "requests": 5,
        "retries": 3,
        "allowed": 3,
        "remaining": 0,
        "denied_total": 2,
    }
    # ten seconds later the window has forgotten everything
    assert budget.try_withdraw(11.5)
    assert budget.snapshot(11.5)["requests"] == 0


@pytest.mark.anyio
async def test_without_the_retry_plugin_nothing_is_retried() -> None:
    clock = FakeClock()
    a, b = Failing("a", error=ErrorClass.OVERLOADED), FakeProvider("b")
    gw = gateway_from_yaml(
        "plugins: [fallback, router, fake]\n"
        "task_classes:\n  qa: {provider: a, model: m1}\n"
        "fallback: {chains: {qa: [{provider: b, model: m2}]}}\n",
        providers=[a, b],
        clock=clock,
    )
    env = await gw.route(Request("qa", "hi"))
    assert env.ok and env.meta["provider"] == "b"  # the gateway still serves
    assert len(a.received) == 1 and clock.sleeps == []
    await gw.aclose()


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"retry: max_delay_s .* shorter than base_delay_s"):
        gateway_from_yaml(_yaml("base_delay_s: 5, max_delay_s: 1"), providers=[FakeProvider("a")])
    with pytest.raises(ConfigError, match=r"retry\.max_attempts"):
        gateway_from_yaml(_yaml("max_attempts: 0"), providers=[FakeProvider("a")])


def test_report_info_shows_settings_and_budgets() -> None:
    gw = gateway_from_yaml(_yaml(), providers=[FakeProvider("a")])
    plugin = gw.pm.get_plugin("retry")
    assert isinstance(plugin, RetryPlugin)
    plugin.budget("a").note_request(0.0)
    info = gw.routing_info()["retry"]
    assert info["max_attempts"] == 3 and info["budgets"]["a"]["retries"] == 0


LAZY_TENACITY = """
import asyncio, json, sys
from llmgw.kernel import ErrorClass, Outcome, Request
from llmgw.kernel.testing import FakeClock, FakeProvider, gateway_from_yaml

yaml = '''
plugins: [retry, router, fake]
task_classes:
  qa: {provider: a, model: m1, max_tokens: 64}
'''
a = FakeProvider("a")
gw = gateway_from_yaml(yaml, providers=[a], clock=FakeClock())
seen = {"build": "tenacity" in sys.modules}
env = asyncio.run(gw.route(Request("qa", "hi")))
seen["success"] = ["tenacity" in sys.modules, env.ok]
a.script.append(Outcome.failure(ErrorClass.OVERLOADED, "busy", sent=True))
env = asyncio.run(gw.route(Request("qa", "hi")))
seen["retried"] = ["tenacity" in sys.modules, env.ok, len(a.received)]
print(json.dumps(seen))
"""


def test_tenacity_is_loaded_by_the_first_failure_not_at_start() -> None:
    """A gateway whose calls succeed never imports tenacity (a cold-start cost); the
    first transient failure does, and is retried as before."""
    import json
    import subprocess
    import sys
    import textwrap

    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LAZY_TENACITY)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"build": False, "success": [False, True], "retried": [True, True, 3]}


class RefuseRetriesOfQa:
    """Refuses every retry of class qa in preflight, as an open circuit would."""

    @hookimpl
    def preflight(self, call: Any) -> Rejection | None:
        if call.task_class == "qa" and call.attempt > 1:
            return Rejection(ErrorClass.CIRCUIT_OPEN, "refused", fallback=True)
        return None


@pytest.mark.anyio
async def test_a_retry_the_kernel_never_makes_spends_no_budget() -> None:
    """The budget was spent when a retry was advised; when the retry's preflight was then
    refused (this very failure opened the breaker), the retry never went out and the
    budget was gone for the provider's other models."""
    clock = FakeClock()
    a = Failing("a", error=ErrorClass.SERVER_ERROR)
    text = (
        "plugins: [refuse, retry, router, fake]\n"
        "task_classes:\n"
        "  qa: {provider: a, model: m1, max_tokens: 64}\n"
        "  qb: {provider: a, model: m2, max_tokens: 64}\n"
        "retry: {budget_min_retries: 1, budget_ratio: 0}\n"
    )
    gw = gateway_from_yaml(
        text, providers=[a], clock=clock, extra_plugins={"refuse": RefuseRetriesOfQa()}
    )
    await gw.route(Request("qa", "hi"))  # fails; its retry is refused: nothing goes out
    assert len(a.received) == 1
    assert gw.routing_info()["retry"]["budgets"]["a"]["remaining"] == 1
    a.script.append(Outcome.failure(ErrorClass.SERVER_ERROR, "once", sent=True))
    a.script.append(Outcome.success("second", None))
    env = await gw.route(Request("qb", "hi"))  # another model: its retry still has budget
    assert env.ok and env.text == "second" and len(a.received) == 3
    assert gw.routing_info()["retry"]["budgets"]["a"]["remaining"] == 0  # spent when sent
    await gw.aclose()


@pytest.mark.anyio
async def test_an_error_refused_locally_still_names_what_the_upstream_answered() -> None:
    """The first failure opened the breaker, which refused the retry: the error read
    only "circuit open", though the upstream had answered server_error; and a target
    that was never sent to was listed under "also tried"."""
    clock = FakeClock()
    a = Failing("a", error=ErrorClass.SERVER_ERROR)
    text = (
        "plugins: [breaker, retry, fallback, router, fake]\n"
        "task_classes:\n"
        "  qa: {provider: a, model: m1, max_tokens: 64}\n"
        "  qb: {provider: a, model: m2, max_tokens: 64}\n"
        "breaker: {consecutive_failures: 1}\n"
        "fallback:\n  chains:\n    qb: [{provider: a, model: m1}]\n"
    )
    gw = gateway_from_yaml(text, providers=[a], clock=clock)
    env = await gw.route(Request("qa", "hi"))
    assert env.error_class == ErrorClass.CIRCUIT_OPEN.value
    assert "(after a/m1 answered server_error)" in (env.error or "")
    env = await gw.route(Request("qb", "hi"))  # m2 fails; its fallback a/m1 is open
    error = env.error or ""
    assert error.endswith("; also tried: a/m2 (server_error)")  # a/m1 was never sent to
    await gw.aclose()
