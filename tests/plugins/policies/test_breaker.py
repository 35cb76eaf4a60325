"""The breaker plugin through a gateway: open means fall back at once, one probe at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from llmgw.kernel import (
    Call,
    CallRefused,
    ConfigError,
    ErrorClass,
    Gateway,
    Outcome,
    ProviderRequest,
    Request,
    hookimpl,
)
from llmgw.kernel.testing import FakeClock, FakeProvider, gateway_from_yaml
from llmgw.plugins.policies.breaker import BreakerPlugin
from llmgw.plugins.policies.breaker_state import CircuitState


@dataclass
class Upstream(FakeProvider):
    """Fails with ``error`` while ``down``; ``gate`` (if set) holds each call until released."""

    down: bool = False
    error: ErrorClass = ErrorClass.OVERLOADED
    gate: asyncio.Event | None = None
    on_call: Callable[[], None] | None = None
    in_flight: int = 0
    states_seen: list[str] = field(default_factory=list)

    async def complete(self, request: ProviderRequest) -> Outcome:
        if self.on_call is not None:
            self.on_call()
        self.in_flight += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.down:
                self.received.append(request)
                return Outcome.failure(self.error, "fake upstream failure", sent=True)
            return await super().complete(request)
        finally:
            self.in_flight -= 1


YAML = """
plugins: [breaker, retry, fallback, router, fake]
task_classes:
  qa: {provider: a, model: m1, max_tokens: 64}
fallback:
  chains:
    qa: [{provider: b, model: m2}]
"""


def _breaker(gw: Gateway) -> BreakerPlugin:
    plugin = gw.pm.get_plugin("breaker")
    assert isinstance(plugin, BreakerPlugin)
    return plugin


@pytest.mark.anyio
async def test_dead_upstream_is_skipped_while_open_and_recovers() -> None:
    clock = FakeClock()
    a, b = Upstream("a", down=True), FakeProvider("b")
    gw = gateway_from_yaml(YAML, providers=[a, b], clock=clock)
    breaker = _breaker(gw)
    a.on_call = lambda: a.states_seen.append(breaker.circuit("a/m1").state(clock.monotonic()).value)

    requests = served = 0
    t0 = clock.monotonic()
    while clock.monotonic() - t0 < 120:  # 100 % 503 for two minutes, a request a second
        env = await gw.route(Request("qa", "hi"))
        requests, served = requests + 1, served + env.ok
        clock.advance(1.0)
    assert served == requests  # every request answered, by the fallback
    assert a.states_seen.count("open") == 0  # upstream calls while open: 0
    assert a.states_seen.count("half_open") == breaker.circuit("a/m1").total_trips - 1
    # open 30 s, then 60 s, then 120 s: each failed probe doubles the wait
    assert breaker.circuit("a/m1").trips == 3
    calls_down = len(a.states_seen)

    a.down = False
    recovered_at = clock.monotonic()
    next_probe_at = breaker.circuit("a/m1").open_until
    while True:
        env = await gw.route(Request("qa", "hi"))
        assert env.ok
        if breaker.circuit("a/m1").state(clock.monotonic()) is CircuitState.CLOSED:
            break
        clock.advance(1.0)
    time_to_recover = clock.monotonic() - recovered_at
    env = await gw.route(Request("qa", "hi"))
    assert env.meta["provider"] == "a" and "fallback_from" not in env.meta
    assert a.states_seen[calls_down:].count("open") == 0
    # recovery is noticed by the first probe after the open period (requests 1 s apart)
    assert 0 <= time_to_recover - (next_probe_at - recovered_at) <= 1.0
    assert time_to_recover <= 120  # the third open period: 4 x 30 s would be the fourth
    print(f"FIGURE breaker: upstream calls while open 0, time to recover {time_to_recover:.1f} s")
    info = gw.routing_info()["breaker"]["circuits"]["a/m1"]
    assert info["state"] == "closed" and info["trips"] == 0 and info["total_trips"] == 3
    await gw.aclose()


@pytest.mark.anyio
async def test_open_circuit_falls_back_at_once_without_sleeping() -> None:
    clock = FakeClock()
    a, b = Upstream("a", down=True), FakeProvider("b")
    gw = gateway_from_yaml(YAML, providers=[a, b], clock=clock)
    for _ in range(2):  # 3 + 2 failures: the fifth opens the circuit
        await gw.route(Request("qa", "hi"))
    assert _breaker(gw).circuit("a/m1").state(clock.monotonic()) is CircuitState.OPEN
    sent_before, sleeps_before = len(a.received), len(clock.sleeps)
    env = await gw.route(Request("qa", "hi"))
    assert env.ok and env.meta["fallback_from"] == "a/m1"
    first = env.meta["attempts"][0]
    assert first["stage"] == "rejected" and first["error_class"] == "circuit_open"
    assert first["by"] == "breaker"
    assert len(a.received) == sent_before and len(clock.sleeps) == sleeps_before
    info = gw.routing_info()["breaker"]["circuits"]["a/m1"]
    assert info["state"] == "open" and 0 < info["opens_until_s"] <= 30.0
    assert info["consecutive_failures"] == 0 and info["trips"] == 1
    await gw.aclose()


@pytest.mark.anyio
async def test_the_retry_after_a_trip_is_refused_and_falls_back() -> None:
    clock = FakeClock()
    a, b = Upstream("a", down=True), FakeProvider("b")
    gw = gateway_from_yaml(
        YAML + "breaker: {consecutive_failures: 2}\n", providers=[a, b], clock=clock
    )
    env = await gw.route(Request("qa", "hi"))
    stages = [(x["provider"], x["stage"], x.get("error_class")) for x in env.meta["attempts"]]
    # The kernel runs preflight again before a retry: the breaker the second failure
    # opened refuses at once, so the retry delay is never slept.
    assert stages == [
        ("a", "sent", "overloaded"),
        ("a", "sent", "overloaded"),
        ("a", "rejected", "circuit_open"),
        ("b", "sent", None),
    ]
    assert len(clock.sleeps) == 1  # only the delay before the second attempt
    await gw.aclose()


@pytest.mark.anyio
async def test_half_open_admits_exactly_one_concurrent_probe() -> None:
    clock = FakeClock()
    a, b = Upstream("a", down=True), FakeProvider("b")
    gw = gateway_from_yaml(YAML, providers=[a, b], clock=clock)
    for _ in range(2):
        await gw.route(Request("qa", "hi"))
    clock.advance(30.0)
    circuit = _breaker(gw).circuit("a/m1")
    assert circuit.state(clock.monotonic()) is CircuitState.HALF_OPEN
    a.down, a.gate = False, asyncio.Event()
    sent_before = len(a.received)

    tasks = [asyncio.create_task(gw.route(Request("qa", f"q{i}"))) for i in range(8)]
    for _ in range(50):
        await asyncio.sleep(0)
    assert a.in_flight == 1  # the probe, held by the gate
    assert circuit.probe_in_flight
    a.gate.set()
    envs = await asyncio.gather(*tasks)
    assert all(e.ok for e in envs)
    on_a = [e for e in envs if e.meta["provider"] == "a"]
    assert len(on_a) == 1 and len(a.received) == sent_before + 1
    for e in envs:
        if e.meta["provider"] == "b":
            assert e.meta["attempts"][0]["error_class"] == "circuit_open"
    assert circuit.state(clock.monotonic()) is CircuitState.CLOSED
    await gw.aclose()


class SlowPreflight:
    """A plugin after the breaker whose preflight yields: every caller passes the breaker's
    preflight before any reaches before_call, so only the claim there can stop them."""

    @hookimpl
    async def preflight(self, call: object) -> None:
        for _ in range(5):
            await asyncio.sleep(0)


@pytest.mark.anyio
async def test_the_probe_is_claimed_in_before_call_not_preflight() -> None:
    clock = FakeClock()
    a, b = Upstream("a", down=True), FakeProvider("b")
    gw = gateway_from_yaml(
        YAML.replace("[breaker, retry,", "[breaker, slow, retry,"),
        providers=[a, b],
        clock=clock,
        extra_plugins={"slow": SlowPreflight()},
    )
    for _ in range(2):
        await gw.route(Request("qa", "hi"))
    clock.advance(30.0)
    a.down, a.gate = False, asyncio.Event()
    sent_before = len(a.received)
    tasks = [asyncio.create_task(gw.route(Request("qa", f"q{i}"))) for i in range(6)]
    for _ in range(50):
        await asyncio.sleep(0)
    assert a.in_flight == 1
    a.gate.set()
    envs = await asyncio.gather(*tasks)
    assert len(a.received) == sent_before + 1
    refused = [e.meta["attempts"][0] for e in envs if e.meta["provider"] == "b"]
    assert len(refused) == 5
    assert all(x["stage"] == "refused" and x["error_class"] == "circuit_open" for x in refused)
    await gw.aclose()


class RefuseOnce:
    """A plugin after the breaker whose before_call refuses the next attempt (a cap)."""

    def __init__(self) -> None:
        self.armed = False

    @hookimpl
    def before_call(self, call: object) -> None:
        if self.armed:
            self.armed = False
            raise CallRefused(ErrorClass.BUDGET_EXCEEDED, "cap reached", fallback=True)


@pytest.mark.anyio
async def test_a_probe_refused_later_releases_the_probe_slot() -> None:
    clock = FakeClock()
    a, b = Upstream("a", down=True), FakeProvider("b")
    refuser = RefuseOnce()
    gw = gateway_from_yaml(
        YAML.replace("[breaker, retry,", "[breaker, refuse, retry,"),
        providers=[a, b],
        clock=clock,
        extra_plugins={"refuse": refuser},
    )
    for _ in range(2):
        await gw.route(Request("qa", "hi"))
    clock.advance(30.0)
    circuit = _breaker(gw).circuit("a/m1")
    refuser.armed = True
    env = await gw.route(Request("qa", "hi"))
    assert env.ok and env.meta["provider"] == "b"
    assert env.meta["attempts"][0]["by"] == "refuse"
    assert not circuit.probe_in_flight
    assert circuit.state(clock.monotonic()) is CircuitState.HALF_OPEN
    a.down = False
    env = await gw.route(Request("qa", "hi"))  # the next caller becomes the probe
    assert env.meta["provider"] == "a"
    assert circuit.state(clock.monotonic()) is CircuitState.CLOSED
    await gw.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "error",
    [
        ErrorClass.RATE_LIMITED,
        ErrorClass.AUTH_ERROR,
        ErrorClass.QUOTA_EXHAUSTED,
        ErrorClass.INVALID_REQUEST,
        ErrorClass.CONTENT_REFUSED,
        ErrorClass.CONTEXT_LENGTH_EXCEEDED,
    ],
)
async def test_classes_that_say_nothing_about_health_are_ignored(error: ErrorClass) -> None:
    clock = FakeClock()
    a = Upstream("a", down=True, error=error)
    gw = gateway_from_yaml(
        "plugins: [breaker, router, fake]\ntask_classes:\n  qa: {provider: a, model: m1}\n",
        providers=[a],
        clock=clock,
    )
    for _ in range(20):
        await gw.route(Request("qa", "hi"))
    circuit = _breaker(gw).circuit("a/m1")
    assert circuit.state(clock.monotonic()) is CircuitState.CLOSED
    assert circuit.consecutive == 0 and circuit.window_counts(clock.monotonic()) == (0, 0)
    assert len(a.received) == 20
    await gw.aclose()


@pytest.mark.anyio
async def test_an_upstream_that_cannot_be_reached_opens_the_circuit() -> None:
    # Connection refused: nothing was sent, yet it is the plainest sign of a dead host.
    clock = FakeClock()
    a = FakeProvider("a")
    for _ in range(5):
        a.fail_with(ErrorClass.CONNECTION_ERROR, sent=False)
    gw = gateway_from_yaml(
        "plugins: [breaker, router, fake]\ntask_classes:\n  qa: {provider: a, model: m1}\n",
        providers=[a],
        clock=clock,
    )
    for _ in range(5):
        await gw.route(Request("qa", "hi"))
    assert _breaker(gw).circuit("a/m1").state(clock.monotonic()) is CircuitState.OPEN
    env = await gw.route(Request("qa", "hi"))
    assert env.error_class == "circuit_open"
    assert len(a.received) == 5  # the sixth call never reached the provider
    await gw.aclose()


class RefuseWithAHealthClass:
    """A plugin refusing before the send with a health class: not the upstream's fault."""

    @hookimpl
    def before_call(self, call: Call) -> None:
        raise CallRefused(ErrorClass.SERVER_ERROR, "refused locally")


@pytest.mark.anyio
async def test_local_refusals_are_ignored_whatever_their_class() -> None:
    clock = FakeClock()
    a = FakeProvider("a")
    gw = gateway_from_yaml(
        "plugins: [breaker, refuser, router, fake]\n"
        "task_classes:\n  qa: {provider: a, model: m1}\n",
        providers=[a],
        clock=clock,
        extra_plugins={"refuser": RefuseWithAHealthClass()},
    )
    for _ in range(10):
        env = await gw.route(Request("qa", "hi"))
        assert env.error_class == "server_error"
    circuit = _breaker(gw).circuit("a/m1")
    assert circuit.state(clock.monotonic()) is CircuitState.CLOSED
    assert circuit.window_counts(clock.monotonic()) == (0, 0)
    assert a.received == []
    await gw.aclose()


@pytest.mark.anyio
async def test_panel_members_are_guarded_per_model() -> None:
    clock = FakeClock()
    a, b = Upstream("a", down=True), FakeProvider("b")
    gw = gateway_from_yaml(
        """
        plugins: [breaker, router, fake]
        task_classes:
          duo:
            members: [{provider: a, model: m1}, {provider: b, model: m2}]
            quorum: 1
        breaker: {consecutive_failures: 2}
        """,
        providers=[a, b],
        clock=clock,
    )
    for _ in range(3):
        env = await gw.route(Request("duo", "hi"))
        assert env.ok
    info = gw.routing_info()["breaker"]["circuits"]
    assert info["a/m1"]["state"] == "open" and info["b/m2"]["state"] == "closed"
    assert len(a.received) == 2  # the third request never reached a
    await gw.aclose()


def test_thresholds_come_from_the_breaker_section() -> None:
    gw = gateway_from_yaml(
        """
        plugins: [breaker, router, fake]
        task_classes: {qa: {provider: a, model: m1}}
        breaker: {consecutive_failures: 2, open_s: 10, max_open_s: 40, window_s: 5}
        """,
        providers=[FakeProvider("a")],
    )
    s = _breaker(gw).settings
    assert (s.consecutive_failures, s.open_s, s.max_open_s, s.window_s) == (2, 10, 40, 5)
    with pytest.raises(ConfigError, match=r"breaker: max_open_s .* shorter than open_s"):
        gateway_from_yaml(
            """
            plugins: [breaker, router, fake]
            task_classes: {qa: {provider: a, model: m1}}
            breaker: {open_s: 60, max_open_s: 30}
            """,
            providers=[FakeProvider("a")],
        )


@pytest.mark.anyio
async def test_without_the_breaker_every_request_hits_the_dead_upstream() -> None:
    clock = FakeClock()
    a, b = Upstream("a", down=True), FakeProvider("b")
    gw = gateway_from_yaml(YAML.replace("breaker, ", ""), providers=[a, b], clock=clock)
    for _ in range(20):
        env = await gw.route(Request("qa", "hi"))
        assert env.ok and env.meta["provider"] == "b"  # the gateway still serves
    # no circuit: every request reaches the dead upstream (the retry budget caps retries)
    assert len({r.request_id for r in a.received}) == 20
    assert "breaker" not in gw.routing_info()
    await gw.aclose()


@pytest.mark.anyio
async def test_a_host_that_refuses_connections_opens_the_circuit_through_the_real_provider() -> (
    None
):
    # The openai provider over httpx2 to a loopback port nobody listens on: connection
    # refused, nothing sent. After two of them the third call is not even tried.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nobody listens
    gw = gateway_from_yaml(
        "plugins: [breaker, router, openai]\n"
        f"providers:\n  openai: {{base_url: 'http://127.0.0.1:{port}/v1', timeout_s: 5}}\n"
        "task_classes:\n  qa: {provider: openai, model: gpt-4o-mini, max_tokens: 16}\n"
        "breaker: {consecutive_failures: 2}\n",
        env={"OPENAI_API_KEY": "sk-test-0123456789abcdef0123"},
    )
    try:
        first = [await gw.route(Request("qa", "hi")) for _ in range(2)]
        assert [e.error_class for e in first] == ["connection_error"] * 2
        assert all(a["sent"] is False for e in first for a in e.meta["attempts"])
        third = await gw.route(Request("qa", "hi"))
        assert third.error_class == "circuit_open"
        assert third.meta["attempts"][0]["stage"] == "rejected"
    finally:
        await gw.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize(("deadline_s", "state"), [(120, "open"), (2, "closed")])
async def test_a_timeout_the_deadline_cut_short_says_nothing_of_the_upstream(
    deadline_s: int, state: str
) -> None:
    """A retry left with little of the deadline timed out, and the breaker counted it as
    the upstream failing: the gateway, not the upstream, set that timeout."""
    a = FakeProvider("a")
    a.fail_with(ErrorClass.TIMEOUT)
    text = (
        "plugins: [breaker, router, fake]\n"
        "task_classes:\n  q: {provider: a, model: m1}\n"
        "providers: {a: {timeout_s: 60}}\n"
        "breaker: {consecutive_failures: 1}\n"
        f"gateway: {{deadline_s: {deadline_s}}}\n"
    )
    gw = gateway_from_yaml(text, providers=[a], clock=FakeClock())
    env = await gw.route(Request("q", "hi"))
    assert env.error_class == ErrorClass.TIMEOUT.value
    assert gw.routing_info()["breaker"]["circuits"]["a/m1"]["state"] == state
    await gw.aclose()
