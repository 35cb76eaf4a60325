"""A cancelled tool call aborts the upstream request, runs every after_call, leaves no task."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from llmgw.kernel import Call, ErrorClass, Gateway, Outcome, ProviderRequest, Request, hookimpl
from llmgw.kernel.testing import FakeClock, FakeProvider, gateway_from_yaml
from llmgw.plugins.policies.breaker import BreakerPlugin
from llmgw.plugins.policies.breaker_state import CircuitState
from llmgw.plugins.policies.fallback import FallbackPlugin
from llmgw.plugins.policies.retry import RetryPlugin


@dataclass
class Blocking(FakeProvider):
    """``complete`` waits on ``release``; records that it started and how it ended."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: int = 0

    async def complete(self, request: ProviderRequest) -> Outcome:
        self.received.append(request)
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return Outcome.success("late", None)


SEEN: dict[str, list[tuple[str, ErrorClass | None]]] = {}


def _spy(cls: type) -> type:
    """A subclass of a policy plugin that records each after_call it receives."""

    class Spy(cls):  # type: ignore[valid-type, misc]
        @hookimpl
        def after_call(self, call: Call, outcome: Outcome) -> object:
            SEEN.setdefault(self.ctx.name, []).append(
                (call.target.key if call.target else "panel", outcome.error_class)
            )
            return super().after_call(call, outcome)

    return Spy


YAML = """
plugins: [breaker, retry, fallback, router, fake]
task_classes:
  qa: {provider: a, model: m1}
  duo:
    members: [{provider: a, model: m1}, {provider: b, model: m2}]
fallback:
  chains:
    qa: [{provider: b, model: m2}]
"""


def _gateway(a: FakeProvider, b: FakeProvider, clock: FakeClock) -> Gateway:
    SEEN.clear()
    return gateway_from_yaml(
        YAML,
        providers=[a, b],
        clock=clock,
        extra_plugins={
            "breaker": _spy(BreakerPlugin),
            "retry": _spy(RetryPlugin),
            "fallback": _spy(FallbackPlugin),
        },
    )


def _new_tasks(before: set[asyncio.Task[object]]) -> set[asyncio.Task[object]]:
    """Tasks alive now that were not alive before the route started (orphans)."""
    current = asyncio.current_task()
    return {t for t in asyncio.all_tasks() - before if t is not current}


@pytest.mark.anyio
async def test_cancelling_a_route_aborts_upstream_and_unwinds_every_plugin() -> None:
    clock = FakeClock()
    a, b = Blocking("a"), FakeProvider("b")
    gw = _gateway(a, b, clock)
    before = asyncio.all_tasks()
    task = asyncio.create_task(gw.route(Request("qa", "hi")))
    await asyncio.wait_for(a.started.wait(), 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert a.cancelled == 1  # the upstream request was aborted, not left running
    for name in ("breaker", "retry", "fallback"):
        assert SEEN[name] == [("a/m1", ErrorClass.CANCELLED)], name
    assert not b.received  # a cancel is not a reason to fall back
    assert _new_tasks(before) == set()
    await gw.aclose()


@pytest.mark.anyio
async def test_a_cancelled_probe_frees_the_probe_slot() -> None:
    clock = FakeClock()
    a, b = Blocking("a"), FakeProvider("b")
    gw = _gateway(a, b, clock)
    breaker = gw.pm.get_plugin("breaker")
    circuit = breaker.circuit("a/m1")
    for _ in range(5):  # trip the circuit directly: five failures in a row
        ticket = circuit.admit(clock.monotonic())
        circuit.record(ticket, "failure", clock.monotonic())
    clock.advance(30.0)
    before = asyncio.all_tasks()
    task = asyncio.create_task(gw.route(Request("qa", "hi")))
    await asyncio.wait_for(a.started.wait(), 1)
    assert circuit.probe_in_flight
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not circuit.probe_in_flight
    assert circuit.state(clock.monotonic()) is CircuitState.HALF_OPEN
    assert _new_tasks(before) == set()
    a.release.set()
    env = await gw.route(Request("qa", "again"))
    assert env.ok and env.meta["provider"] == "a"  # the next caller was the probe
    assert circuit.state(clock.monotonic()) is CircuitState.CLOSED
    await gw.aclose()


@pytest.mark.anyio
async def test_cancelling_a_panel_aborts_every_member() -> None:
    clock = FakeClock()
    a, b = Blocking("a"), Blocking("b")
    gw = _gateway(a, b, clock)
    before = asyncio.all_tasks()
    task = asyncio.create_task(gw.route(Request("duo", "hi")))
    await asyncio.wait_for(asyncio.gather(a.started.wait(), b.started.wait()), 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (a.cancelled, b.cancelled) == (1, 1)
    for name in ("breaker", "retry", "fallback"):
        member_calls = sorted(k for k, _ in SEEN[name] if k != "panel")
        assert member_calls == ["a/m1", "b/m2"], name
        assert all(cls is ErrorClass.CANCELLED for _, cls in SEEN[name]), name
    assert _new_tasks(before) == set()
    await gw.aclose()
